"""The compiled rank-count pass of the search (glam_tf/eval/rank_kernel.py): the counts and
top-k columns of a brute-force count, as the NumPy pass gives them, the same search results
with and without it, its build cache, and the fall-back to NumPy when it cannot be built."""

import logging as std_logging
import os

import numpy as np
import pytest

from glam_tf import cpu
from glam_tf.eval import rank_kernel, search


@pytest.fixture
def kernel():
    fn = rank_kernel.load()
    if fn is None:
        pytest.skip("no C compiler ($CC, gcc or cc): the kernel cannot be built; "
                    "install gcc (.ci/run does)")
    return fn


@pytest.fixture
def fresh_load(monkeypatch):
    """`load()` deciding again (it is cached per process), and cached again after."""
    rank_kernel._load.cache_clear()
    yield
    rank_kernel._load.cache_clear()


def _rows(rng):
    """Rows of scores: continuous, on a coarse grid (ties on bin edges), with -inf
    (invalid images), and constant."""
    c = 20011
    base = (rng.standard_normal(c) * 0.05).astype(np.float32)
    grid = np.round(base * 40).astype(np.float32) / 40
    lost = base.copy()
    lost[rng.choice(c, c // 10, replace=False)] = -np.inf
    return {"continuous": base, "grid": grid, "invalid": lost,
            "constant": np.full(c, 0.25, np.float32)}


def _brute_counts(row, tv, lim):
    """Per tracked score: the entries above it, plus those equal to it below its limit."""
    return np.array([np.count_nonzero(row > t) + np.count_nonzero(row[:l] == t)
                     for t, l in zip(tv, lim)], dtype=np.int64)


@pytest.mark.parametrize("num_bins", [4, 64, 4099, 1 << 16])
def test_kernel_and_numpy_counts_equal_a_brute_force_count(kernel, num_bins):
    # Tracked scores taken from the row (ties with it, duplicates among them; with and
    # without the row's highest score, far above the others, which narrows the bins' span),
    # limits before, inside and after the row: the counts never depend on the bins.
    rng = np.random.default_rng(num_bins)
    for name, row in _rows(rng).items():
        finite = row[np.isfinite(row)]
        for outlier in (False, True):
            tv = np.concatenate([rng.choice(finite, 30), rng.choice(finite, 3)])
            if outlier:
                tv = np.append(tv, finite.max())
            tv = np.sort(tv)
            lim = rng.integers(0, row.size + 1, tv.size)
            lim[:3] = [0, row.size, row.size // 2]
            want = _brute_counts(row, tv, lim)
            for kth in (None, np.float32(rng.choice(finite)), np.float32(-np.inf)):
                msg = f"{name} outlier {outlier} kth {kth}"
                for got in (rank_kernel.rank_count(kernel, row, tv, lim, num_bins, kth),
                            search._rank_count_numpy(row, tv, lim, kth)):
                    np.testing.assert_array_equal(got[0], want, err_msg=msg)
                    if kth is None:
                        assert got[1] is None
                    else:
                        np.testing.assert_array_equal(got[1], np.flatnonzero(row >= kth),
                                                      err_msg=msg)


def test_kernel_reports_nan(kernel):
    row = np.linspace(-0.2, 0.3, 1000, dtype=np.float32)
    row[517] = np.nan
    tv, lim = np.float32([0.0, 0.1]), np.int64([0, 1000])
    assert rank_kernel.rank_count(kernel, row, tv, lim, 64) is None
    assert search._rank_count_numpy(row, tv, lim, None) is None
    with pytest.raises(ValueError, match="2 tracked scores, 1 limits"):
        rank_kernel.rank_count(kernel, row, tv, lim[:1], 64)


@pytest.mark.parametrize("clustered", [False, True])
def test_search_is_the_same_with_and_without_the_kernel(clustered, kernel, monkeypatch):
    # Tracked images over the whole database (the binned path), exact ties and invalid
    # images: top-k and ranks bit for bit the same through the NumPy pass.
    rng = np.random.default_rng(5 + clustered)
    n, nq = 20000, 6
    db = rng.standard_normal((n, 16)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    if clustered:
        db = np.round(db * 4) / 4
    q = db[rng.choice(n, nq)] + 0.1 * rng.standard_normal((nq, 16)).astype(np.float32)
    valid = rng.random(n) > 0.01
    tracked = [rng.choice(n, 400, replace=False) for _ in range(nq)]
    kwargs = dict(k=50, tracked=tracked, valid=valid, chunk_size=3000)
    res = search.exact_search(q, db, **kwargs)
    monkeypatch.setattr(rank_kernel, "load", lambda: None)
    ref = search.exact_search(q, db, **kwargs)
    for i in range(nq):
        np.testing.assert_array_equal(res.tracked_ranks[i], ref.tracked_ranks[i])
    np.testing.assert_array_equal(res.topk_indices, ref.topk_indices)
    np.testing.assert_array_equal(res.topk_scores, ref.topk_scores)
    assert max(r.max() for r in res.tracked_ranks) > n * 0.9


def test_nan_has_the_same_error_through_numpy(monkeypatch):
    monkeypatch.setattr(rank_kernel, "load", lambda: None)
    db = np.ones((300, 4), np.float32)
    db[5, 0] = np.nan
    with pytest.raises(ValueError, match="NaN scores against database rows"):
        search.exact_search(np.ones((1, 4), np.float32), db, k=3,
                            tracked=[np.arange(0, 300, 3)])


def test_build_is_cached_under_a_name_of_the_source(kernel, tmp_path, monkeypatch):
    cc = rank_kernel.compiler()
    monkeypatch.setenv("GLAM_TF_CACHE", str(tmp_path / "cache"))
    path = rank_kernel._build(cc)
    assert os.path.dirname(path) == str(tmp_path / "cache")
    assert os.path.basename(path).startswith("rank_kernel-") and os.path.isfile(path)
    assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]  # no temporary left

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again although the cache holds the library")

    monkeypatch.setattr(cpu.subprocess, "run", no_compiling)
    assert rank_kernel._build(cc) == path


def test_without_a_compiler_numpy_counts_and_says_why(fresh_load, monkeypatch, caplog):
    monkeypatch.setattr(rank_kernel, "compiler", lambda: None)
    with caplog.at_level(std_logging.WARNING):
        assert rank_kernel.load() is None
    assert "no C compiler" in caplog.text and "install gcc" in caplog.text


def test_a_failing_build_falls_back_to_numpy(fresh_load, tmp_path, monkeypatch, caplog):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: fatal error: no space left' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("GLAM_TF_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(std_logging.WARNING):
        assert rank_kernel.load() is None
    assert "no space left" in caplog.text and "rank counting in NumPy" in caplog.text
    assert not os.listdir(tmp_path / "cache")


def test_the_switch_keeps_numpy(fresh_load, monkeypatch):
    monkeypatch.setenv(rank_kernel.ENV_SWITCH, "numpy")
    monkeypatch.setattr(rank_kernel, "compiler", lambda: pytest.fail("compiler looked up"))
    assert rank_kernel.load() is None


@pytest.mark.parametrize("room", [rank_kernel.ABOVE_ROOM_ROWS, 1])
def test_rows_in_one_call_equal_each_row_alone(kernel, room, monkeypatch):
    # One call for several rows (spans of tracked scores of different lengths, a threshold
    # per row): the counts and top-k columns of each row counted alone; with room for one
    # row's columns only, the rows past it find theirs again.
    monkeypatch.setattr(rank_kernel, "ABOVE_ROOM_ROWS", room)
    rng = np.random.default_rng(3)
    scores = (rng.standard_normal((6, 5000)) * 0.05).astype(np.float32)
    scores[2] = np.round(scores[2] * 40) / 40
    ids = np.array([4, 0, 2, 5])
    tvs = [np.sort(rng.choice(scores[r], size)) for r, size in zip(ids, (1, 7, 40, 300))]
    lims = [rng.integers(0, 5001, t.size) for t in tvs]
    kth = np.float32([-np.inf, 0.05, 0.0, 0.2])  # every column, then fewer
    count, cols = rank_kernel.rank_count_rows(
        kernel, scores, ids, np.concatenate(tvs), np.concatenate(lims),
        np.cumsum([0] + [t.size for t in tvs]), 1250, kth)
    at = 0
    for r, tv, lim, t, c in zip(ids, tvs, lims, kth, cols):
        alone = rank_kernel.rank_count(kernel, scores[r], tv, lim, 1250, t)
        np.testing.assert_array_equal(count[at:at + tv.size], alone[0])
        np.testing.assert_array_equal(c, alone[1])
        np.testing.assert_array_equal(count[at:at + tv.size], _brute_counts(scores[r], tv, lim))
        at += tv.size
    assert all(c is None for c in rank_kernel.rank_count_rows(
        kernel, scores, ids[:1], tvs[0], lims[0], [0, 1], 64)[1])
    scores[5, 17] = np.nan
    assert rank_kernel.rank_count_rows(kernel, scores, ids, np.concatenate(tvs),
                                       np.concatenate(lims),
                                       np.cumsum([0] + [t.size for t in tvs]), 64) is None
    with pytest.raises(ValueError, match="one non-empty span per row"):
        rank_kernel.rank_count_rows(kernel, scores, ids, np.concatenate(tvs),
                                    np.concatenate(lims), [0, 1, 8, 48], 64)
