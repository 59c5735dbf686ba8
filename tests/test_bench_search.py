"""bench/search.py: the --tracked=whole shorthand (both kinds of data, both ratios, the spot
check) and a bad --cases, on a small database (the ratios themselves are the benchmark's,
not checked here)."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*flags):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "search.py"), "--num_db=6000",
                           "--num_queries=4", "--num_tracked=30", "--k=10", "--rounds=1",
                           "--num_clusters=20", *flags],
                          capture_output=True, text=True, timeout=300, check=False)


def test_tracked_whole_runs_both_kinds_of_data_and_prints_both_ratios():
    done = _run("--tracked=whole")
    assert done.returncode == 0, done.stderr[-2000:]
    cases = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(c["data"], c["tracked"]) for c in cases] == [("clustered", "whole"),
                                                         ("uniform", "whole")]
    for c in cases:
        assert c["spot_check_ok"] and c["search_over_product"]["ratio"] > 0
        assert c["search_over_product_into"]["ratio"] > 0
        assert c["chunks"] >= 1 and c["deepest_tracked_rank"] < 6000
    last = done.stdout.strip().splitlines()[-1]
    assert "clustered:whole" in last and "uniform:whole" in last and "machine:" in last


def test_a_bad_case_is_refused_naming_the_flag():
    done = _run("--cases=uniform:everywhere")
    assert done.returncode != 0 and "--cases: 'uniform:everywhere'" in done.stderr
