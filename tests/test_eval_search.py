"""Chunked exact search: whole-database ranks and top-k against a full argsort, invalid
images ranked last, bounded memory, and the optional faiss index."""

import tracemalloc

import numpy as np
import pytest

from glam_tf import cpu
from glam_tf.eval import rank_kernel, search


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _chunked_scores(q, db, res):
    """Scores exactly as the search computes them (same query blocks and chunk products)."""
    qb = res.query_block
    return np.concatenate([
        np.concatenate([q[i:i + qb] @ db[a:b].T for a, b in res.chunk_bounds], axis=1)
        for i in range(0, len(q), qb)])


def _stable_ranks(scores):
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(scores.shape[1])[None], axis=1)
    return order, ranks


@pytest.mark.parametrize("chunk,budget", [(64, None), (1000, None), (None, 200_000)])
def test_ranks_and_topk_match_full_argsort(chunk, budget):
    rng = np.random.default_rng(0)
    q, db = _unit(rng, 30, 16), _unit(rng, 1000, 16)
    db[500] = db[10]  # exact duplicates: a tie broken by index
    db[900] = db[10]
    tracked = [rng.choice(1000, size=40, replace=False) for _ in range(30)]
    tracked[0] = np.array([10, 500, 900])
    res = search.exact_search(q, db, k=15, tracked=tracked, chunk_size=chunk,
                              memory_budget_bytes=budget)
    if budget is not None:
        assert res.query_block < 30  # the small budget split the queries into blocks
    scores = _chunked_scores(q, db, res)
    order, ranks = _stable_ranks(scores)
    for i in range(30):
        np.testing.assert_array_equal(res.rank_of(i, tracked[i]), ranks[i, tracked[i]])
    np.testing.assert_array_equal(res.topk_indices, order[:, :15])
    np.testing.assert_array_equal(res.topk_scores, np.take_along_axis(scores, order[:, :15], 1))
    r = res.rank_of(0, [10, 500, 900])
    np.testing.assert_array_equal(r, [r[0], r[0] + 1, r[0] + 2])
    with pytest.raises(KeyError, match="not tracked"):
        res.rank_of(0, [11])


@pytest.mark.parametrize("chunk,k", [(7, 20), (50, 20), (400, 20), (400, 2)])
def test_near_queries_and_heavy_ties_match_full_argsort(chunk, k):
    # Queries close to their tracked images (the usual case: few entries reach the lowest
    # tracked score, so only those are sorted) and scores on a coarse grid (hundreds of
    # exact ties at every top-k boundary), against a full stable argsort.
    rng = np.random.default_rng(5)
    db = np.round(rng.standard_normal((400, 4)) * 2).astype(np.float32) / 2
    tracked = [rng.choice(400, size=5, replace=False) for _ in range(12)]
    q = np.stack([db[t].mean(axis=0) for t in tracked]) + np.float32(0.25)
    tracked[3] = np.concatenate([tracked[3], np.argsort(q[3] @ db.T)[:2]])  # lowest scores
    # k = 2: a partition of the chunk's first 64k entries, then only comparisons.
    res = search.exact_search(q, db, k=k, tracked=tracked, chunk_size=chunk)
    scores = _chunked_scores(q, db, res)
    order, ranks = _stable_ranks(scores)
    for i in range(12):
        np.testing.assert_array_equal(res.rank_of(i, tracked[i]), ranks[i, tracked[i]])
    np.testing.assert_array_equal(res.topk_indices, order[:, :k])
    np.testing.assert_array_equal(res.topk_scores, np.take_along_axis(scores, order[:, :k], 1))


def test_topk_ties_at_the_chunk_boundary_prefer_low_indices():
    q = np.ones((1, 2), dtype=np.float32)
    db = np.zeros((10, 2), dtype=np.float32)
    db[7] = 1.0  # one clear winner, then nine tied images
    res = search.exact_search(q, db, k=4, chunk_size=3, tracked=[[9, 0]])
    np.testing.assert_array_equal(res.topk_indices[0], [7, 0, 1, 2])
    np.testing.assert_array_equal(res.rank_of(0, [0, 9]), [1, 9])


def test_invalid_images_rank_last_by_index():
    rng = np.random.default_rng(1)
    q, db = _unit(rng, 3, 8), _unit(rng, 50, 8)
    valid = np.ones(50, bool)
    valid[[4, 20]] = False
    res = search.exact_search(q, db, k=50, tracked=[[4, 20, 0]] * 3, valid=valid,
                              chunk_size=16)
    for i in range(3):
        np.testing.assert_array_equal(res.rank_of(i, [4, 20]), [48, 49])
        np.testing.assert_array_equal(res.topk_indices[i, -2:], [4, 20])
    assert np.isneginf(res.topk_scores[:, -2:]).all()


def test_input_errors_are_clear():
    with pytest.raises(ValueError, match="share D"):
        search.exact_search(np.zeros((2, 3)), np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="outside"):
        search.exact_search(np.zeros((1, 3)), np.zeros((4, 3), np.float32), tracked=[[4]])
    with pytest.raises(ValueError, match="valid"):
        search.exact_search(np.zeros((1, 3)), np.zeros((4, 3), np.float32), valid=[True])


def test_peak_memory_bounded_whatever_the_number_of_queries():
    rng = np.random.default_rng(2)
    db = _unit(rng, 60_000, 128)  # 31 MB
    for nq in (10, 400):
        q = _unit(rng, nq, 128)
        tracemalloc.start()
        search.exact_search(q, db, k=10, tracked=[np.arange(0, 1000, 97)] * nq)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        # temporaries stay within the descriptor matrix's size (400 x 60000 scores alone
        # would be 96 MB)
        assert peak < db.nbytes + q.nbytes, (nq, peak, db.nbytes)


def test_recall_at_k():
    exact = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    approx = np.array([[2, 1, 9, 4], [5, -1, -1, -1]])
    assert search.recall_at_k(approx, exact, 4) == pytest.approx((3 / 4 + 1 / 4) / 2)
    assert search.recall_at_k(approx, exact, 2) == pytest.approx((1 + 1 / 2) / 2)


def test_faiss_index_recall():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    q, db = _unit(rng, 20, 32), _unit(rng, 3000, 32)
    valid = np.ones(3000, bool)
    valid[::2] = False
    exact = search.exact_search(q, db, k=10, valid=valid)
    flat, _, _, _ = search.approximate_search(q, db, k=10, index_spec="Flat", valid=valid)
    np.testing.assert_array_equal(flat, exact.topk_indices)  # a flat index is exact
    hnsw, scores, _, _ = search.approximate_search(q, db, k=10, index_spec="HNSW16",
                                                   valid=valid)
    assert (hnsw % 2 == 1).all()  # invalid (even) rows are not in the index
    assert search.recall_at_k(hnsw, exact.topk_indices, 10) > 0.8
    np.testing.assert_allclose(scores[:, 0], np.sum(q * db[hnsw[:, 0]], axis=1), rtol=1e-5)


def test_missing_faiss_has_a_clear_error(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        search.approximate_search(np.zeros((1, 4), np.float32), np.zeros((5, 4), np.float32))


def _sorting_count_above(row, tracked_scores, tracked, a, b, kth=None):
    """The rank counting before it counted into bins (kept as an independent reference):
    sorts the entries reaching the lowest tracked score, searches every tracked score."""
    low = tracked_scores.min()
    reach = row >= low
    whole = np.count_nonzero(reach) > row.size // 4
    candidates = np.sort(row if whole else row[reach])
    left = np.searchsorted(candidates, tracked_scores, side="left")
    right = np.searchsorted(candidates, tracked_scores, side="right")
    n = candidates.size
    counts = np.where(tracked >= b, n - left, n - right)  # before the chunk: ties count too
    inside = (tracked >= a) & (tracked < b)
    for m in np.flatnonzero(inside & (right - left > 1)):
        counts[m] += np.count_nonzero(row[: tracked[m] - a] == tracked_scores[m])
    return counts, None if kth is None else np.flatnonzero(row >= kth)


def _random_row(rng, c, kind):
    """A chunk row of scores: continuous, on a coarse grid (many exact ties) or with -inf
    (invalid images)."""
    row = (rng.standard_normal(c) * 0.05).astype(np.float32)
    if kind == "grid":
        row = np.round(row * 40).astype(np.float32) / 40
    elif kind == "invalid":
        row[rng.choice(c, c // 10, replace=False)] = -np.inf
    return row


@pytest.mark.parametrize("binning", ["compiled", "numpy"])
@pytest.mark.parametrize("kind", ["continuous", "grid", "invalid"])
def test_rank_counting_matches_the_sorting_reference(kind, binning, monkeypatch):
    # Tracked images anywhere (deep in the list: the binned path) or among the best (the
    # sorted path), before, inside and after the chunk [a, b), with ties and -inf; the
    # binned path through the compiled kernel (when a compiler exists) and NumPy.
    if binning == "numpy":
        monkeypatch.setattr(rank_kernel, "load", lambda: None)
    elif rank_kernel.load() is None:
        pytest.skip("no C compiler: the compiled kernel cannot be built")
    rng = np.random.default_rng({"continuous": 11, "grid": 12, "invalid": 13}[kind])
    for trial in range(60):
        c = int(rng.choice([5, 64, 700, 5000]))
        a = int(rng.integers(0, 3)) * c
        row = _random_row(rng, c, kind)
        m = int(rng.integers(1, 40))
        inside = a + rng.choice(c, min(m, c), replace=False)
        outside = rng.choice(np.r_[0:a, a + c:4 * c], m, replace=True) if a else \
            rng.integers(c, 4 * c, m)
        if trial % 3 == 0:   # near the top: few entries reach the lowest tracked score
            inside = a + np.argsort(-row, kind="stable")[:max(1, min(m, c) // 8)]
        tracked = np.unique(np.concatenate([inside, outside]))
        scores = np.where((tracked >= a) & (tracked < a + c), row[np.clip(tracked - a, 0, c - 1)],
                          rng.choice(row, tracked.size)).astype(np.float32)
        kth = None if trial % 2 else np.float32(rng.choice(row))
        got, cols = search._count_above(row, scores, tracked, a, a + c, kth)
        want, want_cols = _sorting_count_above(row, scores, tracked, a, a + c, kth)
        np.testing.assert_array_equal(got, want, err_msg=f"{kind} trial {trial}")
        if kth is None:
            assert cols is None
        else:
            np.testing.assert_array_equal(cols, want_cols, err_msg=f"{kind} trial {trial}")


@pytest.mark.parametrize("clustered", [False, True])
def test_search_matches_the_sorting_reference_and_a_full_argsort(clustered, monkeypatch):
    # Tracked images drawn from the whole database (deep ranks), exact duplicates, invalid
    # images and small chunks: the same top-k and ranks, bit for bit, as the search with
    # the sorting rank counting, and as a full stable argsort.
    rng = np.random.default_rng(21 + clustered)
    n, nq = 3000, 9
    db = _unit(rng, n, 12)
    if clustered:
        db = np.round(db * 4) / 4  # a coarse grid: thousands of exact ties
    db[rng.choice(n, 200, replace=False)] = db[7]
    q = _unit(rng, nq, 12)
    valid = rng.random(n) > 0.02
    tracked = [rng.choice(n, 150, replace=False) for _ in range(nq)]
    tracked[0] = np.concatenate([tracked[0], np.flatnonzero(~valid)[:5]])
    kwargs = dict(k=25, tracked=tracked, valid=valid, chunk_size=700)
    res = search.exact_search(q, db, **kwargs)
    monkeypatch.setattr(search, "_count_above", _sorting_count_above)
    monkeypatch.setattr(rank_kernel, "load", lambda: None)  # every row through the reference
    ref = search.exact_search(q, db, **kwargs)
    for i in range(nq):
        np.testing.assert_array_equal(res.tracked_ranks[i], ref.tracked_ranks[i])
    np.testing.assert_array_equal(res.topk_indices, ref.topk_indices)
    np.testing.assert_array_equal(res.topk_scores, ref.topk_scores)
    scores = _chunked_scores(q, db, res)
    scores[:, ~valid] = -np.inf
    order, ranks = _stable_ranks(scores)
    for i in range(nq):
        np.testing.assert_array_equal(res.rank_of(i, tracked[i]), ranks[i, tracked[i]])
    assert max(r.max() for r in res.tracked_ranks) > n * 0.9  # some ranked deep
    np.testing.assert_array_equal(res.topk_indices, order[:, :25])


def test_nan_scores_have_a_clear_error():
    db = np.ones((300, 4), np.float32)
    db[5, 0] = np.nan
    q = np.ones((1, 4), np.float32)
    with pytest.raises(ValueError, match="NaN scores against database rows"):
        search.exact_search(q, db, k=3, tracked=[np.arange(0, 300, 3)])


@pytest.mark.parametrize("differ", [False, True])
def test_tracked_rows_multiplied_alone_or_from_the_chunks_give_the_same_ranks(differ,
                                                                             monkeypatch):
    # Long chunks with tracked images in every one: pass A multiplies the tracked rows
    # alone; when that product differs from the chunk products (forced here), the block is
    # redone from the chunk products. Either way the result is the sorting reference's.
    rng = np.random.default_rng(31)
    n, nq = 3 * search._GATHER_ROWS + 100, 4
    q, db = _unit(rng, nq, 8), _unit(rng, n, 8)
    tracked = [rng.choice(n, 60, replace=False) for _ in range(nq)]
    gathered = search._gathered_tracked_scores
    calls = []

    def spy(*args):
        out = gathered(*args)
        calls.append(len(out))
        if differ:
            out[1][7] = np.nextafter(out[1][7], np.float32(2))
        return out

    from_chunks = search._chunk_tracked_scores
    redone = []
    monkeypatch.setattr(search, "_gathered_tracked_scores", spy)
    monkeypatch.setattr(search, "_chunk_tracked_scores",
                        lambda *a: redone.append(1) or from_chunks(*a))
    res = search.exact_search(q, db, k=10, tracked=tracked, chunk_size=search._GATHER_ROWS)
    assert calls == [nq] and len(redone) == differ
    monkeypatch.setattr(search, "_chunk_tracked_scores", from_chunks)
    monkeypatch.setattr(search, "_count_above", _sorting_count_above)
    monkeypatch.setattr(rank_kernel, "load", lambda: None)  # every row through the reference
    monkeypatch.setattr(search, "_GATHER_ROWS", n + 1)  # the reference: chunk products only
    ref = search.exact_search(q, db, k=10, tracked=tracked, chunk_size=4096)
    for i in range(nq):
        np.testing.assert_array_equal(res.tracked_ranks[i], ref.tracked_ranks[i])
    np.testing.assert_array_equal(res.topk_indices, ref.topk_indices)


def test_automatic_chunks_share_the_work_and_fit_the_budget():
    qb, bounds = search._plan(70, 10**6, 2048 * 10**6, None, None, 2)
    sizes = {b - a for a, b in bounds}
    assert qb == 70 and sizes == {62500} and len(bounds) == 16  # 8 per worker
    assert bounds[0][0] == 0 and bounds[-1][1] == 10**6
    assert all(b0 == a1 for (_, b0), (a1, _) in zip(bounds, bounds[1:]))
    budget = 8 << 20  # every worker's chunk of every query of the block within it
    qb, bounds = search._plan(500, 10**6, 2048 * 10**6, budget, None, 2)
    assert 2 * qb * max(b - a for a, b in bounds) * search._BYTES_PER_SCORE <= budget
    assert search._plan(5, 1000, 32000, None, 7, 2)[1][:2] == [(0, 7), (7, 14)]


def test_workers_use_one_blas_thread_and_restore_blas_and_gc(monkeypatch):
    # The workers multiply with one BLAS thread each (BLAS's own threads would compete
    # with the counting); the caller's BLAS threads and garbage collector are restored.
    import gc

    if cpu._openblas_threads() is None:
        pytest.skip("numpy's BLAS is not OpenBLAS: its threads are left alone")
    blas_threads = cpu._openblas_threads()[0]
    before = blas_threads()
    seen = []
    chunk_scores = search._chunk_scores
    monkeypatch.setattr(search, "_num_workers", lambda: 2)
    monkeypatch.setattr(search, "_chunk_scores",
                        lambda *a: seen.append((blas_threads(), gc.isenabled()))
                        or chunk_scores(*a))
    rng = np.random.default_rng(2)
    q, db = _unit(rng, 3, 8), _unit(rng, 2000, 8)
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            search.exact_search(q, db, k=5, tracked=[[1, 1500]] * 3, chunk_size=300)
            assert gc.isenabled() == enabled
        finally:
            gc.enable()
    assert seen and all(threads == 1 and not collecting for threads, collecting in seen)
    assert blas_threads() == before


def test_one_chunk_holding_every_tracked_image_is_multiplied_by_the_workers(monkeypatch):
    # Tracked images all in the first of several long chunks: pass A's product of that
    # chunk is shared among the workers and kept for pass B; the results are a full
    # argsort's of the chunk products.
    monkeypatch.setattr(search, "_num_workers", lambda: 2)
    split = search._split_product
    calls = []
    monkeypatch.setattr(search, "_split_product", lambda *a: calls.append(a[2:4]) or split(*a))
    rng = np.random.default_rng(8)
    n, nq = 5 * 2 * search._GATHER_ROWS, 5
    q, db = _unit(rng, nq, 8), _unit(rng, n, 8)
    tracked = [rng.choice(3000, 50, replace=False) for _ in range(nq)]
    res = search.exact_search(q, db, k=20, tracked=tracked)
    assert len(res.chunk_bounds) == 5 and calls == [res.chunk_bounds[0]]
    scores = _chunked_scores(q, db, res)
    order, ranks = _stable_ranks(scores)
    for i in range(nq):
        np.testing.assert_array_equal(res.rank_of(i, tracked[i]), ranks[i, tracked[i]])
    np.testing.assert_array_equal(res.topk_indices, order[:, :20])
    np.testing.assert_array_equal(res.topk_scores, np.take_along_axis(scores, order[:, :20], 1))
