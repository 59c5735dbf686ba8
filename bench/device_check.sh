#!/usr/bin/env bash
# One GPU check of glam-tf, under 8 minutes on one GPU, ending in ONE markdown table:
#   1. training step, GLAM vs baseline, float32 and mixed_float16 (loss-scaled, as
#      training runs it): ResNet101, 512x512 batches (bench/train_step.py);
#   2. export latency per precision at 1024 px (bench/export_precision.py; a "not
#      available" row when that bench is absent from the tree);
#   3. batched vs one-at-a-time descriptor extraction (bench/extract.py).
#
#   bench/device_check.sh          # GPU machine: venv + requirements, nvidia-smi, benches
#   bench/device_check.sh --cpu    # CI dry run: same pipeline, tiny sizes, existing venv
#
# GPU mode: Python is $VENV/bin/python (VENV defaults to .venv-gpu in the repository);
# when it cannot import tensorflow, the venv is created and requirements.txt installed
# with tensorflow[and-cuda] in place of tensorflow (requirements.txt's comment). CPU
# mode: Python is $PYTHON, else .venv/bin/python, else python3; nothing is installed.
# Every step runs under `timeout`, bounded by what is left of DEVICE_CHECK_BUDGET_S
# (default 450 s in GPU mode, 170 s with --cpu) and by its own limit times
# DEVICE_CHECK_LIMIT_SCALE (default 1; the CI dry run raises it: on a loaded machine the
# ResNet50 traces alone can take minutes); a step that fails or times out becomes a
# row saying so, and the table is printed whatever happened. Per-step logs stay in
# $DEVICE_CHECK_LOGS (a temporary folder by default). Exit status: 0 when every step
# produced its figures, 1 otherwise.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: bench/device_check.sh [--cpu]" >&2; exit 2 ;;
esac
START=$SECONDS
LOGS="${DEVICE_CHECK_LOGS:-$(mktemp -d -t device_check.XXXXXX)}"
mkdir -p "$LOGS"
: > "$LOGS/steps.tsv"   # name <TAB> status <TAB> seconds <TAB> log file

if [[ $MODE == cpu ]]; then
  BUDGET_S="${DEVICE_CHECK_BUDGET_S:-170}"
  PY="${PYTHON:-}"
  [[ -z $PY && -x "$REPO/.venv/bin/python" ]] && PY="$REPO/.venv/bin/python"
  [[ -z $PY ]] && PY=python3
  # Tiny sizes: the pipeline, not the numbers, is under test.
  TRAIN_ARGS=(--backbone=resnet50 --image_size=64 --batch_size=2 --steps=2 --rounds=2
              --num_classes=10)
  EXPORT_ARGS=(--backbone=resnet50 --long_side=96 --precisions=float32,bfloat16 --reps=1
               --warmup=0)
  EXTRACT_ARGS=(--backbone=resnet50 --max_image_size=96 --batch_size=2 --num_images=4
                --num_real=0 --repeats=1 --beam_images=0)
  export CUDA_VISIBLE_DEVICES=""
else
  BUDGET_S="${DEVICE_CHECK_BUDGET_S:-450}"
  VENV="${VENV:-$REPO/.venv-gpu}"
  PY="$VENV/bin/python"
  TRAIN_ARGS=(--backbone=resnet101 --image_size=512 --batch_size=16 --steps=3 --rounds=2
              --num_classes=1000)
  EXPORT_ARGS=(--backbone=resnet101 --long_side=1024 --precisions=float32,bfloat16,float16
               --reps=5 --warmup=1)
  EXTRACT_ARGS=(--backbone=resnet101 --max_image_size=1024 --batch_size=8 --num_images=24
                --num_real=0 --repeats=2 --beam_images=0)
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

left() { echo $(( BUDGET_S - (SECONDS - START) )); }

# step NAME LIMIT_S CMD...: runs CMD under timeout min(LIMIT_S x DEVICE_CHECK_LIMIT_SCALE,
# budget left - 10 s).
step() {
  local name=$1 limit=$(( $2 * ${DEVICE_CHECK_LIMIT_SCALE:-1} )); shift 2
  local log="$LOGS/$name.log" t0=$SECONDS rc
  local remaining=$(( $(left) - 10 ))
  (( remaining < limit )) && limit=$remaining
  if (( limit < 5 )); then
    printf '%s\tskipped (time budget spent)\t0\t%s\n' "$name" "$log" >> "$LOGS/steps.tsv"
    return
  fi
  echo "== $name (limit ${limit}s): $*" >&2
  (cd "$REPO" && timeout -k 10 "$limit" "$@") > "$log" 2>&1
  rc=$?
  local status=ok
  (( rc == 124 || rc == 137 )) && status="timed out after ${limit}s"
  (( rc != 0 && rc != 124 && rc != 137 )) && status="failed (exit $rc)"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( SECONDS - t0 ))" "$log" >> "$LOGS/steps.tsv"
  [[ $status == ok ]] || tail -n 5 "$log" >&2
}

if [[ $MODE == gpu ]]; then
  if ! command -v nvidia-smi > /dev/null || ! nvidia-smi > "$LOGS/nvidia-smi.log" 2>&1; then
    echo "nvidia-smi is missing or failed: no usable NVIDIA GPU here (use --cpu for the" \
         "dry run)." >&2
    cat "$LOGS/nvidia-smi.log" >&2 2>/dev/null
    exit 1
  fi
  if ! "$PY" -c "import tensorflow" > /dev/null 2>&1; then
    echo "== installing requirements into $VENV (tensorflow[and-cuda])" >&2
    python3 -m venv "$VENV" || exit 1
    sed 's/^tensorflow==/tensorflow[and-cuda]==/' "$REPO/requirements.txt" \
      > "$LOGS/requirements-gpu.txt"
    if ! timeout -k 10 240 "$PY" -m pip install -q -r "$LOGS/requirements-gpu.txt" \
        > "$LOGS/pip.log" 2>&1; then
      tail -n 20 "$LOGS/pip.log" >&2
      echo "pip install failed or timed out (log: $LOGS/pip.log)." >&2
      exit 1
    fi
  fi
  "$PY" -c "import tensorflow as tf; gpus = tf.config.list_physical_devices('GPU'); \
print('TensorFlow', tf.__version__, 'GPUs:', gpus); assert gpus, 'TensorFlow sees no GPU'" \
    > "$LOGS/tf_gpu.log" 2>&1 || { cat "$LOGS/tf_gpu.log" >&2; exit 1; }
fi

# GPU limits: the ResNet101 traces take most of each training step's time.
step train_float32 130 "$PY" bench/train_step.py "${TRAIN_ARGS[@]}" --precision=float32
step train_mixed_float16 130 "$PY" bench/train_step.py "${TRAIN_ARGS[@]}" \
  --precision=mixed_float16
if [[ -f "$REPO/bench/export_precision.py" ]]; then
  step export_precision 100 "$PY" bench/export_precision.py "${EXPORT_ARGS[@]}"
else
  printf '%s\t%s\t0\t-\n' export_precision \
    "not available (bench/export_precision.py is not in this tree)" >> "$LOGS/steps.tsv"
fi
step extract 90 "$PY" bench/extract.py "${EXTRACT_ARGS[@]}"

# The one table: every step's figures from its last JSON line ("JSON {...}" or "{...}").
"$PY" - "$LOGS/steps.tsv" "$MODE" "$(( SECONDS - START ))" <<'PYEOF'
import json
import sys

steps_file, mode, total_s = sys.argv[1], sys.argv[2], sys.argv[3]
steps = [line.rstrip("\n").split("\t") for line in open(steps_file) if line.strip()]


def last_json(path):
    found = None
    try:
        for line in open(path, errors="replace"):
            line = line.strip()
            if line.startswith("JSON "):
                line = line[5:]
            if line.startswith("{"):
                try:
                    found = json.loads(line)
                except ValueError:
                    pass
    except OSError:
        pass
    return found


rows, complete = [], True


def row(check, setting, measure, value):
    rows.append(f"| {check} | {setting} | {measure} | {value} |")


for name, status, seconds, log in steps:
    if status.startswith("not available"):
        row(name, "-", "status", status)   # an optional bench: not a failure
        continue
    data = last_json(log) if status == "ok" else None
    if data is None:
        complete = False
        why = status if status != "ok" else "no JSON line in the output"
        row(name, "-", "status", f"{why} (log: {log})")
        continue
    try:
        if name.startswith("train_"):
            setting = (f"{data['precision']}, {data['backbone']}, {data['image_size']} px, "
                       f"batch {data['batch_size']}, {data['device']}")
            ref = data["reference"]
            for variant, v in data["variants"].items():
                row("train step", setting, f"{variant} s/step", f"{v['s_per_step']:.4f}")
                if variant != ref:
                    row("train step", setting, f"{variant} / {ref}", f"{v['ratio']:.3f}")
        elif name == "export_precision":
            lat = data.get("latency", data)
            setting = (f"{lat.get('backbone', '?')}, {'x'.join(map(str, lat.get('image', [])))}"
                       " px")
            for precision, v in lat.get("precisions", {}).items():
                row("export latency", f"{precision}, {setting}", "median s/image",
                    f"{v['median_s']:.4f}")
                row("export latency", f"{precision}, {setting}", "speed-up over float32",
                    f"{v['speedup']:.3f}")
        elif name == "extract":
            setting = (f"{data.get('backbone', 'resnet50')}, max {data['max_image_size']} px, "
                       f"batch {data['batch_size']}, {data['device']}")
            for tag in ("oxford-like", "real-crops"):
                if tag in data:
                    v = data[tag]
                    row("extraction", f"{tag}, {setting}", "batched images/s",
                        f"{v['batched_images_per_s']:.2f}")
                    row("extraction", f"{tag}, {setting}", "one-at-a-time images/s",
                        f"{v['single_images_per_s']:.2f}")
                    row("extraction", f"{tag}, {setting}", "batched / one-at-a-time",
                        f"{v['speedup_batched_over_single']:.2f}")
        else:
            row(name, "-", "status", status)
    except (KeyError, TypeError, ValueError) as e:   # a bench whose JSON changed shape
        complete = False
        row(name, "-", "status", f"unexpected JSON ({type(e).__name__}: {e}; log: {log})")
        continue
    if status == "ok":
        row(name, "-", "wall s", seconds)

print(f"\n## device_check ({mode}, {total_s} s)\n")
print("| check | setting | measure | value |")
print("|---|---|---|---|")
print("\n".join(rows))
sys.exit(0 if complete else 1)
PYEOF
