"""bench/pretrain_backbone.py --quick (CI dry run of the pretraining recipe) and
bench/ablation.py --quick --pretrained (CI dry run of the table): the saved backbone is
what the run's checkpoint holds, --weights=<that file> loads it, and every run of the table
starts from it; the table's rows, records and attention map ranges parse, and a rerun
trains nothing.

Each subprocess builds and traces ResNet50 (~20 s on 2 idle CPUs, minutes when other jobs
load them).
"""

import hashlib
import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from test_bench_ablation import _rows

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "bench" / "pretrain_backbone.py"
_MEAN_STD = re.compile(r"^\d+\.\d\d ± \d+\.\d\d$")
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


def test_quick_table_from_the_pretrained_file(pretrained, tmp_path):
    work_dir, _, _ = pretrained
    weights = work_dir / "backbone.weights.h5"
    command = [sys.executable, str(ABLATION), f"--work_dir={tmp_path}", "--quick",
               "--variants=baseline,global+local", "--seeds=0", "--split=val",
               f"--pretrained={weights}"]
    proc = subprocess.run(["timeout", "-k", "10", "480"] + command, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    # The table: one row per variant, mAP as mean ± std, fusion weights and GeM p.
    rows = _rows(proc.stdout)
    assert [r[0] for r in rows] == [
        "baseline", "global+local",
        "pretrained backbone + GeM, no fine-tuning (baseline at step 0)",
        "colour histogram, whole photo (no learning)",
        "colour histogram, central half (no learning)"]
    # The reference rows: step 0 over the baseline's seed, the histogram's single values.
    assert _MEAN_STD.match(rows[2][2]) and rows[2][1] == "1"
    for row in rows[3:]:
        assert row[1] == "—" and all(0.0 <= float(c) <= 100.0 for c in row[2:5]), row
    for variant, seeds, easy, medium, hard, fusion, gem_p, stuck, wall in rows[:2]:
        assert seeds == "1"
        assert stuck in ("—", "seed 0"), stuck  # 2 steps may not leave ln(4)
        for cell in (easy, medium, hard):
            assert _MEAN_STD.match(cell), cell
        assert float(gem_p) >= 1.0
        assert re.match(r"^\d+ s$", wall), wall
        if variant == "baseline":
            assert fusion == "—"
        else:
            weights_ = dict(part.split() for part in fusion.split(", "))
            assert set(weights_) == {"global", "local", "identity"}
            assert abs(sum(float(w) for w in weights_.values()) - 1.0) < 2e-3
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert len(saved["records"]) == 2
    # Under it, the paired table: Medium step 0 -> end, and global+local - baseline of seed 0.
    medium = {r["variant"]: (r["mAP_step0"]["medium"], r["mAP"]["medium"])
              for r in saved["records"]}
    diff = medium["global+local"][1] - medium["baseline"][1]
    assert (f"| global+local | {medium['global+local'][0]:.2f} -> "
            f"{medium['global+local'][1]:.2f} | {diff:+.2f} | {diff:+.2f} ± 0.00 |"
            in proc.stdout.splitlines())
    # Scored on the validation split (at step 0 and at the end), never the test split.
    assert {r["split"] for r in saved["records"]} == {"val"}
    for r in saved["records"]:
        for step in (0, r["final_step"]):
            found = (pathlib.Path(r["train_dir"]) / "eval" / f"step_{step}").glob("results-*")
            assert sorted(p.name for p in found) == ["results-synth_val.json"]
    assert len({r["data_manifest"] for r in saved["records"]}) == 1
    # Attention map ranges at step 0 and at the end; none for the baseline.
    by_variant = {r["variant"]: r["map_ranges"] for r in saved["records"]}
    assert by_variant["baseline"] == {"start": None, "end": None}
    for when in ("start", "end"):
        maps = by_variant["global+local"][when]
        assert set(maps) == {"local_channel", "local_spatial", "global_channel",
                             "global_spatial"}
        assert all(lo <= hi for lo, hi in maps.values())
    assert "- global+local, step 0: local_channel [" in proc.stdout
    spreads = {r["variant"]: r["global_spatial_spread"] for r in saved["records"]}
    assert spreads["baseline"] == {"start": None, "end": None}
    for spread in spreads["global+local"].values():
        assert 1.0 <= spread["effective_positions"] <= spread["positions"]
    assert "- global+local, global spatial attention, effective positions" in proc.stdout
    assert "- global+local, end: " in proc.stdout and "- baseline" not in proc.stdout
    # Every run started from the file, its hash recorded; the new layers from their init.
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()[:16]
    for variant in ("baseline", "global_local"):
        record = json.loads((tmp_path / variant / "seed_0" / "ablation_run.json").read_text())
        assert record["pretrained"] == sha
        config = json.loads((tmp_path / variant / "seed_0" / "train_config.json").read_text())
        assert config["model"]["weights"] == str(weights)
        assert not config["model"]["zero_init_residual"]
    assert f"backbone from {weights} (sha256 {sha})" in proc.stdout
    # Rerun: every run is recorded, nothing is trained again.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rows(again.stdout) == rows
    # The same runs are not read as test-split results, nor as runs of another backbone.
    test = subprocess.run(command[:-2] + ["--split=test", command[-1]], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert test.returncode != 0 and "evaluated on the val split, not test" in test.stderr
    other = subprocess.run(command[:-1], cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert other.returncode != 0 and f"started from backbone {sha}" in other.stderr
    missing = subprocess.run(command[:-1] + [f"--pretrained={tmp_path / 'none.weights.h5'}"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "none.weights.h5': no such file" in missing.stderr
