"""Pretrains a backbone for the pretrained regime: the baseline on a synthetic set of its own.

    python bench/pretrain_backbone.py --work_dir=runs/pretrain        # configs/pretrain.flags
    python bench/pretrain_backbone.py --work_dir=runs/pre_quick --quick # CI: tiny, < 1 min
    python train_main.py --flagfile=configs/street160.flags \
        --weights=runs/pretrain/backbone.weights.h5 ...               # start from it

ImageNet weights cannot be downloaded everywhere; a backbone pretrained here stands in for
them (docs/ablation.md, "The pretrained regime"). The recipe is `train_main.py
--flagfile=configs/pretrain.flags`: the baseline (ResNet50 + GeM + head, ArcFace) from
random init on 100 synthetic street buildings (12 photos each) drawn from generator seed
1, none of them an evaluation landmark (the evaluation sets are drawn from seed 0), at the
photo size of configs/street160.flags (conv5 at least 5 x 5). It runs in its own process with train_dir
<work_dir>/train and the set in <work_dir>/data/synth_pretrain, so it is train_main's run:
deterministic (--deterministic_data, one seed), resumable (rerunning this command resumes
from the newest checkpoint; SIGTERM checkpoints), progress lines with rate and ETA on
stderr.

When training has finished, the backbone is restored from the last checkpoint and written to
<work_dir>/backbone.weights.h5 (Keras' weights format; `--weights=<that file>` loads it), and
<work_dir>/pretrain.json records the run: steps, tail loss, classes, wall time, the
SHA-256 of the weights file and of the synthetic set's manifest, the command. A run stopped
by SIGTERM (train_main checkpoints) still writes the backbone of that checkpoint, recorded
as partial; rerunning the command continues the run. A work_dir whose record reached the
last step is done: the command says so and trains nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as `python bench/pretrain_backbone.py`
    sys.path.insert(0, ROOT)

WEIGHTS_FILE = "backbone.weights.h5"
RECORD_FILE = "pretrain.json"
TRAIN_SUBDIR = "train"

# --quick: a set and a run small enough for CI (one building of the ResNet50 graph, two
# steps); the weights mean nothing, the file and its loading are what is checked.
QUICK_FLAGS = (
    "--synthetic_num_train_landmarks=4", "--synthetic_images_per_landmark=2",
    "--synthetic_image_size=64", "--bucket_sizes=64x64,64x64,64x64,64x64,64x64",
    "--global_batch_size=4", "--train_steps=2", "--warmup_steps=0", "--checkpoint_every=2",
    "--log_every=1", "--summary_every=1",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", required=True,
                        help="Folder of the run (train/), its set (data/) and the weights.")
    parser.add_argument("--flagfile", default=os.path.join(ROOT, "configs", "pretrain.flags"),
                        help="The train_main recipe (must train --variant=baseline).")
    parser.add_argument("--quick", action="store_true",
                        help="Tiny set and 2 steps (CI): checks the machinery.")
    parser.add_argument("--extra_flag", action="append", default=[],
                        help="More train_main flags (repeatable), e.g. "
                        "--extra_flag=--train_steps=400.")
    parser.add_argument("--python", default=sys.executable, help="Interpreter of the run.")
    return parser.parse_args(argv)


def data_root(work_dir: str) -> str:
    return os.path.join(work_dir, "data", "synth_pretrain")


def train_dir(work_dir: str) -> str:
    return os.path.join(work_dir, TRAIN_SUBDIR)


def train_command(args) -> list:
    return ([args.python, os.path.join(ROOT, "train_main.py"), f"--flagfile={args.flagfile}",
             f"--train_dir={train_dir(args.work_dir)}",
             f"--synthetic_root={data_root(args.work_dir)}"]
            + (list(QUICK_FLAGS) if args.quick else []) + list(args.extra_flag))


def _sha256(path: str) -> str:
    from glam_tf import files  # noqa: PLC0415 (after the training process has run)

    digest = hashlib.sha256()
    with files.open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _train_result(stdout: str) -> dict:
    for line in reversed(stdout.splitlines()):
        if line.startswith("TRAIN_RESULT "):
            return json.loads(line[len("TRAIN_RESULT "):])
    raise RuntimeError("train_main printed no TRAIN_RESULT line.")


def save_backbone(run_dir: str, path: str) -> dict:
    """Restores the run's last checkpoint and writes its backbone's weights to `path`
    (`.weights.h5`, through a temporary file: a reader never sees half a file).

    Returns:
        {"backbone": name, "variant": the run's variant, "checkpoint": prefix}.
    """
    from glam_tf import files  # noqa: PLC0415
    from glam_tf.export.checkpoint import restore_descriptor_model  # noqa: PLC0415

    model, config, prefix = restore_descriptor_model(run_dir)
    if config.variant != "baseline":
        raise ValueError(f"{run_dir} trained --variant={config.variant}; the pretraining "
                         "recipe trains the baseline (backbone + GeM + head) only.")
    tmp = files.temporary_path(path[:-len(".weights.h5")]) + ".weights.h5"
    try:
        model.get_layer("backbone").save_weights(tmp)
        files.rename(tmp, path)
    finally:
        if files.exists(tmp):
            files.remove(tmp)
    return {"backbone": config.backbone, "variant": config.variant, "checkpoint": prefix}


def main(argv=None) -> int:
    args = parse_args(argv)
    weights_path = os.path.join(args.work_dir, WEIGHTS_FILE)
    record_path = os.path.join(args.work_dir, RECORD_FILE)
    if os.path.isfile(record_path) and os.path.isfile(weights_path):
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        if record["final_step"] == record["total_steps"]:
            print(f"Already pretrained: {weights_path} ({record['final_step']} steps); "
                  f"delete {record_path} to redo.", flush=True)
            return 0
    os.makedirs(args.work_dir, exist_ok=True)
    command = train_command(args)
    print("Pretraining: " + " ".join(command), flush=True)
    start = time.monotonic()
    # stderr (absl's progress lines: step, loss, img/s, ETA) goes where this process's goes.
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        sys.stdout.write(proc.stdout)
        raise RuntimeError(f"train_main exited {proc.returncode} (its log is above); rerun "
                           "the same command to resume from the newest checkpoint.")
    summary = _train_result(proc.stdout)
    # Stopped by SIGTERM, the run's checkpoint is saved: its backbone is written too,
    # marked partial (final_step < total_steps); rerunning continues the run.
    saved = save_backbone(train_dir(args.work_dir), weights_path)
    wall = time.monotonic() - start
    manifest = os.path.join(data_root(args.work_dir), "synthetic_manifest.json")
    record = {
        **saved, "weights": weights_path, "weights_sha256": _sha256(weights_path),
        "final_step": summary["final_step"], "start_step": summary["start_step"],
        "total_steps": summary["total_steps"], "partial": summary["stopped_by_signal"],
        "tail_loss": summary["tail_loss"], "num_classes": summary["num_classes"],
        "train_wall_s": summary["wall_time_s"], "wall_s": round(wall, 1),
        "data_manifest_sha256": _sha256(manifest), "quick": args.quick, "command": command,
    }
    with open(record_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(record_path + ".tmp", record_path)
    print(f"Backbone weights: {weights_path} (steps {summary['start_step']} -> "
          f"{summary['final_step']} of {summary['total_steps']} in this call"
          f"{', stopped by a signal: rerun to continue' if record['partial'] else ''}; tail "
          f"loss {summary['tail_loss'] or math.nan:.4f}, ln(classes) {math.log(summary['num_classes']):.4f};"
          f" {wall:.0f} s). Start a run from it with --weights={weights_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
