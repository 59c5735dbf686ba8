"""eval_main.py: flag checks before any heavy work, the flagfiles in configs/, and a
two-host run (extract shard 0, shard 1, then merge + score) through the command line."""

import json
import os
import subprocess
import sys

import pytest

from helpers import MAX_SIZE, SCALES, write_tiny_revisited

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("eval_roxford5k", "eval_rparis6k", "eval_roxford5k_1m", "eval_rparis6k_1m",
           "eval_oxford5k", "eval_paris6k", "eval_synth")


def _run(args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(REPO, "eval_main.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("args,expect", [
    (["--dataset=holidays"], "--dataset must be one of roxford5k, rparis6k, synth, synth_val, "
                             "oxford5k, paris6k; received --dataset='holidays'"),
    (["--dataset=roxford5k", "--model=/no/such/model"],
     "model: model directory '/no/such/model' does not exist"),
    (["--dataset=roxford5k", "--model={fake}", "--scales=0.7,abc"],
     "--scales must be a comma-separated list like 0.70710678,1,1.41421356; received "
     "--scales=0.7,abc"),
    (["--dataset=roxford5k", "--model={fake}", "--scales=0.7,-1"], "finite numbers > 0"),
    (["--dataset=roxford5k", "--model={fake}", "--train_dir={fake}"], "exactly one of --model"),
    (["--dataset=roxford5k", "--model={fake}", "--num_shards=2", "--shard_index=2"],
     "--shard_index must be in [0, --num_shards=2)"),
    (["--dataset=roxford5k", "--model={fake}", "--batch_size=0"],
     "--batch_size must be a positive integer; received --batch_size=0"),
])
def test_bad_flags_fail_fast_naming_the_flag(tmp_path, args, expect):
    fake = tmp_path / "model" / "1"
    fake.mkdir(parents=True)
    (fake / "saved_model.pb").write_bytes(b"")
    args = [a.format(fake=tmp_path / "model") for a in args]
    res = _run([*args, f"--data_root={tmp_path}", f"--output_dir={tmp_path / 'out'}"], 60)
    assert res.returncode == 2
    assert expect in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) <= 2    # no page of flag help
    assert not (tmp_path / "out").exists()


def test_missing_data_lists_files_and_sources(tmp_path):
    res = _run(["--dataset=rparis6k", "--distractors", "--stage=evaluate",
                f"--data_root={tmp_path}", f"--output_dir={tmp_path / 'out'}"], 60)
    assert res.returncode == 2
    for part in ("4 required", "rparis6k/jpg", "gnd_rparis6k.pkl", "revisitop1m.txt",
                 "http://cmp.felk.cvut.cz/revisitop/"):
        assert part in res.stderr


def test_flagfiles_parse(tmp_path):
    fake = tmp_path / "model" / "7"
    fake.mkdir(parents=True)
    (fake / "saved_model.pb").write_bytes(b"")
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {REPO!r})\n"
        "import eval_main\n"
        "out = {}\n"
        f"for name in {CONFIGS!r}:\n"
        "    F = eval_main.FLAGS\n"
        "    F.unparse_flags()\n"
        "    F(['eval_main', f'--flagfile=configs/{name}.flags',\n"
        f"       '--model={tmp_path / 'model'}'])\n"
        "    out[name] = {k: F[k].value for k in ('dataset', 'distractors', 'scales',\n"
        "                 'max_image_size', 'shard_size', 'data_root')}\n"
        "print(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert res.returncode == 0, res.stderr
    values = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(values) == set(CONFIGS)
    for name, v in values.items():
        expected = name[len("eval_"):].replace("_1m", "")
        assert v["dataset"] == expected
        assert v["distractors"] == name.endswith("_1m")
    assert values["eval_roxford5k"]["scales"] == ["0.70710678", "1.0", "1.41421356"]
    assert values["eval_roxford5k"]["max_image_size"] == 1024
    assert values["eval_roxford5k_1m"]["shard_size"] == values["eval_rparis6k_1m"]["shard_size"]
    # eval_synth reads what the README's demo command writes, at the demo's evaluation size.
    with open(os.path.join(REPO, "configs", "demo.flags"), encoding="utf-8") as f:
        demo = dict(line.strip()[2:].split("=", 1) for line in f
                    if line.startswith("--") and "=" in line)
    assert values["eval_synth"]["data_root"] == demo["synthetic_root"] == demo["eval_root"]
    assert values["eval_synth"]["max_image_size"] == int(demo["eval_max_image_size"])


def test_two_hosts_then_merge_from_the_command_line(tmp_path):
    from glam_tf.export import export_saved_model  # pylint: disable=import-outside-toplevel
    from keras_helpers import tiny_keras_model  # pylint: disable=import-outside-toplevel

    write_tiny_revisited(tmp_path / "data")
    export_saved_model(tiny_keras_model(), str(tmp_path / "glam"), version=1,
                       scales=SCALES, max_image_size=MAX_SIZE)
    common = ["--flagfile=configs/eval_roxford5k_1m.flags", f"--data_root={tmp_path / 'data'}",
              f"--output_dir={tmp_path / 'out'}", "--max_image_size=64", "--shard_size=2",
              f"--scales={','.join(map(str, SCALES))}",
              "--num_shards=2", "--visualize=q1"]
    res = _run([*common, f"--model={tmp_path / 'glam'}", "--stage=extract", "--shard_index=0"])
    assert res.returncode == 0, res.stderr
    assert "features extracted" in res.stdout
    # the merge step refuses while host 1's shards are missing, and says which host owes them
    res = _run([*common, "--stage=evaluate"], 60)
    assert res.returncode == 2
    assert "shards not extracted yet" in res.stderr and "--shard_index [1]" in res.stderr
    res = _run([*common, f"--model={tmp_path / 'glam'}", "--shard_index=1"])
    assert res.returncode == 0, res.stderr  # stage all: host 1 finishes last and scores
    assert "| ROxf+1M" in res.stdout and "M mAP" in res.stdout
    results = json.loads((tmp_path / "out" / "results-roxford5k+1m.json").read_text())
    assert results["counts"]["undecodable_database"] == 2
    assert results["model"]["signature"] == "batched_global_descriptors"
    assert results["settings"]["scales"] == list(SCALES)
    assert os.path.isfile(results["outputs"]["png"])
    # scoring again needs no model: the evaluate stage alone gives the same numbers
    res = _run([*common, "--stage=evaluate"], 60)
    assert res.returncode == 0, res.stderr
    again = json.loads((tmp_path / "out" / "results-roxford5k+1m.json").read_text())
    assert again["metrics"] == results["metrics"]
