"""bench/device_check.sh --cpu: the GPU check's pipeline on tiny sizes (CI dry run).

Runs the script with this interpreter, then checks its one markdown table: a training-step
row set for float32 and for mixed_float16 (GLAM and baseline s/step and their ratio), the
export-latency rows (or the "not available" row when bench/export_precision.py is absent)
and the extraction rows, every value a number.
"""

import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "device_check.sh"


def _table(stdout):
    lines = stdout[stdout.index("| check | setting | measure | value |"):].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]
            if line.startswith("|")]
    assert rows and all(len(r) == 4 for r in rows), lines
    return rows


def test_cpu_dry_run_prints_one_table_of_numbers(tmp_path):
    # The pipeline, not the speed, is under test: limits wide enough for a machine that a
    # parallel test worker and other jobs load (each step takes 30-50 s on 2 idle cores).
    env = dict(os.environ, PYTHON=sys.executable, DEVICE_CHECK_LOGS=str(tmp_path),
               DEVICE_CHECK_BUDGET_S="840", DEVICE_CHECK_LIMIT_SCALE="4")
    proc = subprocess.run(["timeout", "-k", "10", "900", "bash", str(SCRIPT), "--cpu"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.stdout.count("| check | setting | measure | value |") == 1
    rows = _table(proc.stdout)
    by_key = {}
    for check, setting, measure, value in rows:
        by_key.setdefault((check, measure), []).append((setting, value))
    for precision in ("float32", "mixed_float16"):
        for measure in ("baseline s/step", "global+local s/step",
                        "global+local / baseline"):
            hits = [v for s, v in by_key[("train step", measure)]
                    if s.startswith(precision + ",")]
            assert len(hits) == 1 and float(hits[0]) > 0, (precision, measure, rows)
    if (REPO / "bench" / "export_precision.py").exists():
        for precision in ("float32", "bfloat16"):
            hits = [v for s, v in by_key[("export latency", "median s/image")]
                    if s.startswith(precision + ",")]
            assert len(hits) == 1 and float(hits[0]) > 0, (precision, rows)
    else:
        assert [v for _, v in by_key[("export_precision", "status")]] == [
            "not available (bench/export_precision.py is not in this tree)"]
    for measure in ("batched images/s", "one-at-a-time images/s",
                    "batched / one-at-a-time"):
        (setting, value), = by_key[("extraction", measure)]
        assert setting.startswith("oxford-like, resnet50, max 96 px") and float(value) > 0
    # Every value is a number, except the status of a bench absent from the tree.
    for check, _, measure, value in rows:
        if measure != "status":
            assert re.fullmatch(r"\d+(\.\d+)?", value), (check, measure, value)


def test_bad_argument_is_a_usage_error():
    proc = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "usage: bench/device_check.sh [--cpu]" in proc.stderr
