"""The compiled binning pass of the search's rank counting (glam_tf/eval/rank_kernel.py):
the same bins, candidates and top-k columns as the NumPy pass, the same search results
with and without it, its build cache, and the fall-back to NumPy when it cannot be built."""

import logging as std_logging
import os

import numpy as np
import pytest

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


@pytest.mark.parametrize("num_bins", [64, 4099, 1 << 16])
def test_kernel_pass_equals_the_numpy_pass(kernel, num_bins):
    rng = np.random.default_rng(num_bins)
    for name, row in _rows(rng).items():
        finite = row[np.isfinite(row)]
        for width in (float(finite.max() - finite.min()) or 1e-3, 1e-7):
            low = np.float32(rng.choice(finite))
            scale = np.float32((num_bins - 3) / width)
            offset = np.float32(1.5) - low * scale
            shared = np.zeros(num_bins, dtype=bool)
            shared[search._bins(rng.choice(row, 30), scale, offset, num_bins)] = True
            for kth in (None, np.float32(rng.choice(finite)), np.float32(-np.inf)):
                got = rank_kernel.bin_collect(kernel, row, scale, offset, num_bins, shared, kth)
                want = search._bin_collect_numpy(row, scale, offset, num_bins, shared, kth)
                msg = f"{name} width {width} kth {kth}"
                np.testing.assert_array_equal(got[0], want[0], err_msg=msg)
                np.testing.assert_array_equal(np.sort(got[1]), np.sort(want[1]), err_msg=msg)
                assert got[1].size == np.count_nonzero(shared[search._bins(
                    row, scale, offset, num_bins)]), msg
                if kth is None:
                    assert got[2] is None and want[2] is None
                else:
                    np.testing.assert_array_equal(got[2], np.flatnonzero(row >= kth),
                                                  err_msg=msg)


def test_kernel_reports_nan(kernel):
    row = np.linspace(-0.2, 0.3, 1000, dtype=np.float32)
    row[517] = np.nan
    shared = np.zeros(64, dtype=bool)
    assert rank_kernel.bin_collect(kernel, row, np.float32(100), np.float32(30), 64,
                                   shared) is None
    assert search._bin_collect_numpy(row, np.float32(100), np.float32(30), 64, shared,
                                     None) is None


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

    monkeypatch.setattr(rank_kernel.subprocess, "run", no_compiling)
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
