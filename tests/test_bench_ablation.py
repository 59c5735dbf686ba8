"""bench/ablation.py: the pooling over seeds (mean, sample std, one shared synthetic set,
plateaued runs apart) on made-up records, and its refusals. Its --quick runs (the table
printed, the records, the map ranges, a rerun that trains nothing) are checked from the
pretrained backbone in tests/test_bench_pretrain_backbone.py, where one set of runs serves
both (each run builds and traces ResNet50).
"""

import itertools
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "ablation.py"


def _rows(stdout):
    """The table's rows, cells stripped, from a bench's output (up to its first other line)."""
    lines = stdout[stdout.index("| variant | seeds |"):].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in itertools.takewhile(lambda line: line.startswith("|"), lines)]


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


def test_map_ranges_span_the_seeds_at_start_and_end():
    bench = _load_bench()
    records = [{"variant": "global+local", "map_ranges": {
                   "start": {"local_spatial": [-400.0 + s, 390.0], "global_channel": [0.1, 0.9]},
                   "end": {"local_spatial": [-2.0, 3.0 + s], "global_channel": [0.2, 0.8]}}}
               for s in (0, 1)]
    records.append({"variant": "baseline", "map_ranges": {"start": None, "end": None}})
    assert bench.format_ranges(records).splitlines() == [
        "Attention map ranges (first evaluation queries, over the seeds):",
        "- global+local, step 0: local_spatial [-400, 390], global_channel [0.1, 0.9]",
        "- global+local, end: local_spatial [-2, 4], global_channel [0.2, 0.8]"]
    assert bench.format_ranges(records[2:]) == ""
    # The global spatial map's spread per seed, when every run of the variant has it.
    for s, r in enumerate(records[:2]):
        r["global_spatial_spread"] = {
            "start": {"positions": 30.0, "top_weight": 1.0, "effective_positions": 1.0 + s},
            "end": {"positions": 30.0, "top_weight": 0.9, "effective_positions": 1.25}}
    assert bench.format_ranges(records).splitlines()[-1] == (
        "- global+local, global spatial attention, effective positions attended (exp "
        "entropy of a[:, n]) of hw, step 0 -> end, per seed: 1.00 -> 1.25 of 30.0; "
        "2.00 -> 1.25 of 30.0")


def test_reference_rows_under_the_variants():
    """The baseline at step 0 (mean ± std over its seeds) and the colour histogram's rows
    (one value each) follow the variants, their other cells empty."""
    bench = _load_bench()
    records = [{"variant": v, "seed": s, "wall_s": 10.0, "attention": {},
                "mAP": {"easy": 30.0, "medium": 30.0, "hard": 30.0},
                "mAP_step0": {"easy": 4.0 + 2 * s, "medium": 5.0 + 2 * s, "hard": 1.0}}
               for v in ("baseline", "global") for s in (0, 1)]
    histogram = {"colour histogram, whole photo (no learning)":
                 {"easy": 12.345, "medium": 6.1, "hard": 2.0}}
    for pretrained, label in (
            (True, "pretrained backbone + GeM, no fine-tuning (baseline at step 0)"),
            (False, "untrained baseline (step 0, random init)")):
        references = bench.reference_rows(records, histogram, pretrained)
        rows = _rows(bench.format_table(bench.summarize(records), references))
        assert [r[0] for r in rows] == ["baseline", "global", label,
                                        "colour histogram, whole photo (no learning)"]
        assert rows[2] == [label, "2", "5.00 ± 1.41", "6.00 ± 1.41", "1.00 ± 0.00", "—", "—",
                           "—", "—"]
        assert rows[3][1:] == ["—", "12.35", "6.10", "2.00", "—", "—", "—", "—"]
    # Records written before step 0 was kept, and no histogram: no reference rows.
    old = [{k: v for k, v in r.items() if k != "mAP_step0"} for r in records]
    assert bench.reference_rows(old, None, False) == {}


def test_paired_differences_per_seed_and_plateaued_pretrained_runs_averaged_in():
    """Each variant's Medium per seed (step 0 -> end) and its difference from the baseline
    run of the same seed; from a pretrained backbone, plateaued runs count in the means."""
    bench = _load_bench()
    ends = {"baseline": (12.0, 10.0, 14.0), "global+local": (15.0, 11.5, 13.0)}
    records = [{"variant": v, "seed": s, "wall_s": 10.0, "attention": {},
                "tail_loss": 3.9 if s == 1 else 2.0, "num_classes": 50,
                "mAP": {"easy": m, "medium": m, "hard": m},
                "mAP_step0": {"easy": 12.5, "medium": 12.5 + s, "hard": 1.0}}
               for v, values in ends.items() for s, m in enumerate(values)]
    records.append(dict(records[-1], seed=7))  # no baseline for seed 7: no difference
    lines = bench.format_paired(records).splitlines()
    assert lines[2] == ("| baseline | 12.50 -> 12.00, 13.50 -> 10.00, 14.50 -> 14.00 | — | — |")
    diffs = [3.0, 1.5, -1.0]
    assert lines[3] == ("| global+local | 12.50 -> 15.00, 13.50 -> 11.50, 14.50 -> 13.00, "
                        "14.50 -> 13.00 | +3.00, +1.50, -1.00 | "
                        f"{np.mean(diffs):+.2f} ± {np.std(diffs, ddof=1):.2f} |")
    assert bench.format_paired([r for r in records if r["variant"] != "baseline"]) == ""
    # Seed 1 sits on the plateau (ln 50 = 3.91): set apart from scratch, averaged in from
    # a pretrained backbone, listed in its column either way.
    apart = bench.summarize(records)["baseline"]
    together = bench.summarize(records, set_apart=False)["baseline"]
    assert apart["seeds"] == [0, 2] and apart["plateaued_seeds"] == [1]
    assert together["seeds"] == [0, 1, 2] and together["plateaued_seeds"] == [1]
    assert together["mAP"]["medium"] == [12.0, 10.0, 14.0]
