"""bench/pretrain_backbone.py --quick (CI dry run of the pretraining recipe) and
bench/ablation.py --pretrained: the saved backbone is what the run's checkpoint holds, and
--weights=<that file> loads it.

Each subprocess builds and traces ResNet50 (~20 s on 2 idle CPUs, minutes when other jobs
load them).
"""

import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "bench" / "pretrain_backbone.py"
ABLATION = REPO / "bench" / "ablation.py"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("pretrain")
    command = [sys.executable, str(PRETRAIN), f"--work_dir={work_dir}", "--quick"]
    proc = subprocess.run(["timeout", "-k", "10", "480"] + command, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return work_dir, command, proc


def test_quick_pretraining_saves_the_checkpoints_backbone(pretrained):
    work_dir, command, proc = pretrained
    weights = work_dir / "backbone.weights.h5"
    record = json.loads((work_dir / "pretrain.json").read_text())
    assert record["final_step"] == record["total_steps"] == 2 and not record["partial"]
    assert record["variant"] == "baseline" and record["backbone"] == "resnet50"
    assert record["num_classes"] == 4
    assert record["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert f"--weights={weights}" in proc.stdout
    assert "step 2/2 (100.0%)" in proc.stderr and "ETA" in proc.stderr  # progress lines
    # Its set is drawn from generator seed 1 (the evaluation sets' is 0).
    manifest = json.loads((work_dir / "data" / "synth_pretrain" /
                           "synthetic_manifest.json").read_text())
    assert manifest["params"]["seed"] == 1

    from glam_tf.export.checkpoint import restore_descriptor_model
    from glam_tf.model.backbone import build_backbone

    model, _, prefix = restore_descriptor_model(str(work_dir / "train"))
    assert prefix.endswith("ckpt-2")
    loaded = build_backbone("resnet50", str(weights))
    expected = model.get_layer("backbone").weights
    assert len(loaded.weights) == len(expected) == 318
    for a, b in zip(loaded.weights, expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Done: a rerun trains nothing.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.startswith("Already pretrained: ")


def test_ablation_starts_every_run_from_the_pretrained_file(pretrained, tmp_path):
    work_dir, _, _ = pretrained
    weights = work_dir / "backbone.weights.h5"
    command = [sys.executable, str(ABLATION), f"--work_dir={tmp_path}", "--quick",
               "--variants=global+local", "--seeds=0", "--split=val",
               f"--pretrained={weights}"]
    proc = subprocess.run(["timeout", "-k", "10", "480"] + command, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    record = json.loads((tmp_path / "global_local" / "seed_0" / "ablation_run.json")
                        .read_text())
    assert record["pretrained"] == sha
    config = json.loads((tmp_path / "global_local" / "seed_0" / "train_config.json")
                        .read_text())
    assert config["model"]["weights"] == str(weights)
    assert not config["model"]["zero_init_residual"]
    assert f"backbone from {weights} (sha256 {sha})" in proc.stdout
    # The same runs are not read as runs of another starting backbone.
    other = subprocess.run(command[:-1], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert other.returncode != 0 and f"started from backbone {sha}" in other.stderr
    missing = subprocess.run(command[:-1] + [f"--pretrained={tmp_path / 'none.weights.h5'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "none.weights.h5': no such file" in missing.stderr
