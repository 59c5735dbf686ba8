"""bench/ablation.py --quick: the Table 5 bench on tiny sizes (CI dry run).

Two variants x one seed of 2 training steps each, scored on the validation split
(ResNet50 built and traced per run: ~20 s a run on 2 idle CPUs, up to ~2 min when other
jobs load them 5x): the table has one
row per variant whose mAP cells parse as `mean ± std`, the fusion weights of the
variant's branches and GeM p; a rerun reads the records instead of training again. The
pooling over seeds (mean, sample std, one shared synthetic set) is checked on made-up
records.
"""

import json
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "ablation.py"
_MEAN_STD = re.compile(r"^\d+\.\d\d ± \d+\.\d\d$")


def _rows(stdout):
    lines = stdout[stdout.index("| variant | seeds |"):].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]
            if line.startswith("|")]


def test_quick_table_rows_parse(tmp_path):
    command = [sys.executable, str(SCRIPT), f"--work_dir={tmp_path}", "--quick",
               "--variants=baseline,global+local", "--seeds=0", "--split=val"]
    proc = subprocess.run(["timeout", "-k", "10", "480"] + command, cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    rows = _rows(proc.stdout)
    assert [r[0] for r in rows] == ["baseline", "global+local"]
    for variant, seeds, easy, medium, hard, fusion, gem_p, stuck, wall in rows:
        assert seeds == "1"
        assert stuck in ("—", "seed 0"), stuck  # 2 steps may not leave ln(4)
        for cell in (easy, medium, hard):
            assert _MEAN_STD.match(cell), cell
        assert float(gem_p) >= 1.0
        assert re.match(r"^\d+ s$", wall), wall
        if variant == "baseline":
            assert fusion == "—"
        else:
            weights = dict(part.split() for part in fusion.split(", "))
            assert set(weights) == {"global", "local", "identity"}
            assert abs(sum(float(w) for w in weights.values()) - 1.0) < 2e-3
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert len(saved["records"]) == 2
    # Scored on the validation split, never the test split.
    assert {r["split"] for r in saved["records"]} == {"val"}
    for r in saved["records"]:
        step = pathlib.Path(r["train_dir"]) / "eval" / f"step_{r['final_step']}"
        assert sorted(p.name for p in step.glob("results-*.json")) == ["results-synth_val.json"]
    assert len({r["data_manifest"] for r in saved["records"]}) == 1
    # Attention map ranges at step 0 (the untrained evaluation) and at the end; none for
    # the baseline.
    by_variant = {r["variant"]: r["map_ranges"] for r in saved["records"]}
    assert by_variant["baseline"] == {"start": None, "end": None}
    for when in ("start", "end"):
        maps = by_variant["global+local"][when]
        assert set(maps) == {"local_channel", "local_spatial", "global_channel",
                             "global_spatial"}
        assert all(lo <= hi for lo, hi in maps.values())
    assert "- global+local, step 0: local_channel [" in proc.stdout
    assert "- global+local, end: " in proc.stdout and "- baseline" not in proc.stdout
    # Rerun: every run is recorded, nothing is trained again.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rows(again.stdout) == rows
    # The same runs cannot be read as test-split results.
    test = subprocess.run(command[:-1] + ["--split=test"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert test.returncode != 0 and "evaluated on the val split, not test" in test.stderr


def _load_bench():
    import importlib.util
    spec = importlib.util.spec_from_file_location("ablation_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rows_pool_seeds_as_mean_and_sample_std_and_set_plateaued_runs_apart():
    bench = _load_bench()
    records = [{"variant": "global+local", "seed": s, "wall_s": 100.0 + s,
                "mAP": {"easy": e, "medium": e + 1, "hard": e - 1},
                "tail_loss": 1.2, "num_classes": 50,
                "attention": {"gem_p": 3.0 + s, "fusion/local": 0.2, "fusion/global": 0.3,
                              "fusion/identity": 0.5}}
               for s, e in zip((0, 1, 2), (10.0, 20.0, 30.0))]
    # Seed 3 never left ln(50) = 3.91: counted apart, not averaged in.
    records.append({"variant": "global+local", "seed": 3, "wall_s": 104.0,
                    "mAP": {"easy": 1.0, "medium": 1.0, "hard": 1.0},
                    "tail_loss": 3.8, "num_classes": 50,
                    "attention": {"gem_p": 9.0, "fusion/local": 0.9, "fusion/global": 0.0,
                                  "fusion/identity": 0.1}})
    # A record from before tail losses were kept counts as trained.
    records.append({"variant": "baseline", "seed": 0, "wall_s": 50.0,
                    "mAP": {"easy": 5.0, "medium": 6.0, "hard": 7.0},
                    "attention": {"gem_p": 2.5}})
    rows = _rows(bench.format_table(bench.summarize(records)))
    assert rows[0] == ["global+local", "3", "20.00 ± 10.00", "21.00 ± 10.00",
                       "19.00 ± 10.00", "global 0.300, identity 0.500, local 0.200",
                       "4.000", "seed 3", "102 s"]
    assert rows[1] == ["baseline", "1", "5.00 ± 0.00", "6.00 ± 0.00", "7.00 ± 0.00", "—",
                       "2.500", "—", "50 s"]
    assert bench.plateaued({"tail_loss": 3.67, "num_classes": 50})
    assert not bench.plateaued({"tail_loss": 3.65, "num_classes": 50})


@pytest.mark.parametrize("argv", [["--variants=nope"], ["--seeds="]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        _load_bench().parse_args(["--work_dir=x"] + argv)
