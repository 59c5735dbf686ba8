"""Nearest-neighbour search of query descriptors in a database, with bounded memory.

Exact search scores the database in chunks (inner product of unit descriptors = cosine),
keeps the top-k per query and, for AP (EVAL_PROTOCOL.md), the 0-based rank in the WHOLE
database of chosen ("tracked") images per query, without storing the ranking:
rank(i) = |{j : s_j > s_i}| + |{j < i : s_j = s_i}| (a stable sort by descending score,
ties broken by index). Database images flagged invalid (undecodable) score -inf: they
rank after every valid image, among themselves by index ("ranked last").

Optional approximate search through faiss (`pip install faiss-cpu==1.15.1`), with its
recall@k against the exact top-k.
"""

import concurrent.futures
import dataclasses
import functools
import os
import time

import numpy as np
from absl import logging

from glam_tf.eval import rank_kernel

# Per (query, database) pair: the chunk's scores, pass A's kept product, the first chunk's
# partition indices and the candidate mask (24 bytes: the bound of the budget).
_BYTES_PER_SCORE = 24
# Rank counting: sort the entries reaching the lowest tracked score when at most
# 1/_SORT_FRACTION of a row does, else count the row into at most _MAX_BINS bins.
_SORT_FRACTION = 32
_MAX_BINS = 1 << 16
# Pass A multiplies the tracked rows alone, this many at a time (at least), when chunks are
# at least this long and tracked images lie in several chunks.
_GATHER_ROWS = 4096


@dataclasses.dataclass
class SearchResult:
    """Top-k neighbours and whole-database ranks of tracked images.

    Attributes:
        topk_indices: (Q, k) int64 database indices, best first (ties by index).
        topk_scores: (Q, k) float32 scores (-inf for invalid images).
        tracked: per query a sorted unique (M_q,) int64 array of database indices.
        tracked_ranks: per query (M_q,) int64 0-based ranks of `tracked` in the database.
        chunk_size: database rows scored at a time; query_block: queries at a time.
    """

    topk_indices: np.ndarray
    topk_scores: np.ndarray
    tracked: list
    tracked_ranks: list
    chunk_size: int = 0
    query_block: int = 0

    def rank_of(self, query, indices):
        """0-based whole-database ranks of `indices` (all tracked) for query `query`."""
        indices = np.asarray(indices, dtype=np.int64)
        tracked = self.tracked[query]
        pos = np.searchsorted(tracked, indices)
        ok = (pos < tracked.size) & (tracked[np.minimum(pos, tracked.size - 1)] == indices)
        if not np.all(ok):
            raise KeyError(f"query {query}: database indices {indices[~ok][:10].tolist()} "
                           "were not tracked in the search")
        return self.tracked_ranks[query][pos]


def _plan(num_queries, num_db, db_bytes, memory_budget_bytes, chunk_size):
    """Query block and database chunk so the temporary score arrays fit the budget."""
    if memory_budget_bytes is None:
        # About half the descriptor matrix (so the peak stays near 1.5x it), 4 MiB..512 MiB.
        memory_budget_bytes = int(min(512 << 20, max(4 << 20, db_bytes // 2)))
    min_chunk = min(num_db, 4096)
    query_block = max(1, min(num_queries, memory_budget_bytes // (_BYTES_PER_SCORE * min_chunk)))
    if chunk_size is None:
        chunk_size = memory_budget_bytes // (_BYTES_PER_SCORE * query_block)
    chunk_size = int(max(1, min(num_db, chunk_size)))
    return query_block, chunk_size


@functools.cache
def _row_pool():
    """Threads for the per-row rank counting, one per core."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                 thread_name_prefix="search")


def _chunk_scores(queries, database, start, stop, valid):
    """(Qb, stop-start) float32 inner products; invalid database rows get -inf."""
    s = queries @ database[start:stop].T
    if valid is not None:
        s[:, ~valid[start:stop]] = -np.inf
    return s


def _topk_of_chunk(scores, k, start):
    """Top-k (by score desc, index asc) of one chunk: (Qb, k') indices and scores."""
    qb, c = scores.shape
    kk = min(k, c)
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    part_scores = np.take_along_axis(scores, part, axis=1)
    boundary = part_scores.min(axis=1)  # k-th largest value per row
    # argpartition picks arbitrary members of a tie at the boundary: redo those rows so the
    # lowest indices win, as a stable sort would.
    n_eq_all = np.count_nonzero(scores == boundary[:, None], axis=1)
    n_eq_sel = np.count_nonzero(part_scores == boundary[:, None], axis=1)
    for r in np.flatnonzero(n_eq_all != n_eq_sel):
        above = np.flatnonzero(scores[r] > boundary[r])
        ties = np.flatnonzero(scores[r] == boundary[r])[: kk - above.size]
        part[r] = np.concatenate([above, ties])
    part_scores = np.take_along_axis(scores, part, axis=1)
    return part + start, part_scores


def _merge_topk(idx_a, sc_a, idx_b, sc_b, k):
    idx = np.concatenate([idx_a, idx_b], axis=-1)
    sc = np.concatenate([sc_a, sc_b], axis=-1)
    order = np.lexsort((idx, -sc), axis=-1)[..., :k]
    return np.take_along_axis(idx, order, axis=-1), np.take_along_axis(sc, order, axis=-1)


def _update_topk(run_idx, run_sc, scores, k, start, found=None):
    """Merges one chunk's scores into the full running top-k lists (Qb, k) in place.

    Only the entries scoring at least a row's current k-th best can enter its list. `found`
    {row: the chunk's columns scoring at least an earlier (lower or equal) k-th best}, which
    the rank counting collected in its own pass over the row, gives them; other rows are
    scanned here (one comparison over the chunk, usually finding none after the first
    chunks), so a chunk costs no partition or sort.
    """
    found = found or {}
    if found:
        scan = [r for r in range(scores.shape[0]) if r not in found]
    else:
        scan = np.flatnonzero((scores >= run_sc[:, -1:]).any(axis=1))
    for r in [*found, *scan]:
        cols = found.get(r)
        if cols is None:
            cols = np.flatnonzero(scores[r] >= run_sc[r, -1])
        else:
            cols = cols[scores[r, cols] >= run_sc[r, -1]]
        if not cols.size:
            continue
        if cols.size > k:   # keep the chunk's own top k of them (ties: lowest index)
            cols = cols[np.lexsort((cols, -scores[r, cols]))[:k]]
        run_idx[r], run_sc[r] = _merge_topk(run_idx[r], run_sc[r], cols + start,
                                            scores[r, cols], k)


def _fill_topk(top, scores, k, start):
    """While the lists hold fewer than k entries: merges the top k of a leading slice of the
    chunk, a sixteenth of it or 64 k entries (its k-th best is a lower bound of the chunk's,
    so the rest needs only the comparison of `_update_topk`, about 16 k entries passing it;
    a partition of the whole chunk would cost a sort's time).
    Returns the slice's length (0 when the lists were full)."""
    if top[1].shape[1] == k:
        return 0
    lead = min(scores.shape[1], max(64 * k, scores.shape[1] // 16))
    top[0], top[1] = _merge_topk(top[0], top[1], *_topk_of_chunk(scores[:, :lead], k, start), k)
    return lead


def _bins(values, scale, offset, num_bins):
    """Monotone bin numbers (intp) of float32 `values`: value * scale + offset, clipped to
    [0, num_bins - 1] and truncated. Every step is non-decreasing in the value (scale > 0),
    so a value in a higher bin is strictly higher: only the entries sharing a tracked
    score's bin need comparing to it. NaN casts to a negative bin."""
    x = np.multiply(values, scale, dtype=np.float32)
    x += offset
    out = np.empty(x.shape, dtype=np.intp)
    with np.errstate(invalid="ignore"):
        np.clip(x, np.float32(0), np.float32(num_bins - 1), out=out, casting="unsafe")
    return out


def _reaching(row, kth, bound=None):
    """The columns of `row` scoring >= `kth` (None when `kth` is None); none without a pass
    when `bound`, an upper bound of their number, is 0."""
    if kth is None:
        return None
    if bound == 0:
        return np.zeros(0, dtype=np.intp)
    return np.flatnonzero(row >= kth)


def _bin_collect_numpy(row, scale, offset, num_bins, shared, kth):
    """`rank_kernel.bin_collect` in NumPy: (histogram of the row's `_bins`, the row's values
    in `shared` bins, the columns scoring >= `kth` or None), or None when a score is NaN (it
    casts to a negative bin)."""
    idx = _bins(row, scale, offset, num_bins)
    try:
        hist = np.bincount(idx, minlength=num_bins)
    except ValueError:
        return None
    cand = row[np.flatnonzero(np.take(shared, idx, mode="clip"))]
    del idx
    bound = None  # entries >= kth lie in kth's bin or above
    if kth is not None:
        bound = int(hist[_bins(np.float32([kth]), scale, offset, num_bins)[0]:].sum())
    return hist, cand, _reaching(row, kth, bound)


def _count_finite(row, tscores, tracked, a, b, kth):
    """Per finite tracked score, the chunk's entries ranked before it; see `_count_above`.

    When few entries reach the lowest tracked score (tracked images near the top, as real
    positives mostly are), those are sorted; otherwise the entries are counted into bins
    (linear time, whatever the scores) and only those sharing a tracked score's bin are
    sorted. Either way `cand` holds, sorted, every entry equal to a tracked score, and
    `base` counts, per tracked score, the entries above it that are not in `cand`. The same
    pass collects the columns scoring >= `kth` (`_count_above`).
    """
    low = tscores.min()
    # Which way: from every 16th entry (either way is exact; the binned pass needs no
    # comparison of its own).
    if np.count_nonzero(row[::16] >= low) * 16 * _SORT_FRACTION <= row.size:
        cand = np.sort(row[row >= low])
        base = 0
        bound = None  # cand holds every entry >= low
        if kth is not None and kth >= low:
            bound = cand.size - int(np.searchsorted(cand, kth, side="left"))
        reaching = _reaching(row, kth, bound)
    else:
        num_bins = int(min(_MAX_BINS, max(64, row.size // 4)))
        width = float(tscores.max()) - float(low)
        if not width > 0:  # one distinct tracked score: any bin width is exact
            width = max(abs(float(low)), 1e-6) * 1e-3
        # [low, highest tracked score] over bins 1 .. num_bins - 2; below: 0, above: the last
        scale = np.float32((num_bins - 3) / width)
        offset = np.float32(1.5) - np.float32(low) * scale  # low: mid-bin 1, not an edge
        tbins = _bins(tscores, scale, offset, num_bins)
        shared = np.zeros(num_bins, dtype=bool)
        shared[tbins] = True
        kernel = rank_kernel.load()
        counted = (rank_kernel.bin_collect(kernel, row, scale, offset, num_bins, shared, kth)
                   if kernel is not None else
                   _bin_collect_numpy(row, scale, offset, num_bins, shared, kth))
        if counted is None:
            raise ValueError(f"search: NaN scores against database rows [{a}, {b}): a query "
                             "or database descriptor holds NaN")
        hist, cand, reaching = counted
        cand.sort()
        hist[tbins] = 0
        cum = np.cumsum(hist)
        base = cum[-1] - cum[tbins]
    left = np.searchsorted(cand, tscores, side="left")
    right = np.searchsorted(cand, tscores, side="right")
    n = cand.size
    counts = base + np.where(tracked >= b, n - left, n - right)  # before the chunk: ties too
    inside = (tracked >= a) & (tracked < b)
    for m in np.flatnonzero(inside & (right - left > 1)):
        counts[m] += np.count_nonzero(row[: tracked[m] - a] == tscores[m])
    return counts, reaching


def _count_above(row, tracked_scores, tracked, a, b, kth=None):
    """Per tracked image, the images of chunk [a, b) ranked before it (one query's row).

    rank(i) = |{j : s_j > s_i}| + |{j < i : s_j = s_i}|, counted without sorting the row
    (`_count_finite`). Invalid tracked images (score -inf) are preceded by every finite
    entry and by the invalid ones of lower index.

    Returns:
        (counts per tracked image, the columns of the row scoring >= `kth` (None when `kth`
        is None), for `_update_topk`).
    """
    counts = np.zeros(tracked.size, dtype=np.int64)
    finite = tracked_scores > -np.inf
    if finite.any():
        counts[finite], reaching = _count_finite(row, tracked_scores[finite],
                                                 tracked[finite], a, b, kth)
    else:
        reaching = _reaching(row, kth)
    if not finite.all():
        lost = row == -np.inf
        n_finite = np.count_nonzero(row > -np.inf)
        for m in np.flatnonzero(~finite):
            i = tracked[m]
            counts[m] = n_finite + (np.count_nonzero(lost) if i >= b else
                                    0 if i < a else np.count_nonzero(lost[: i - a]))
    return counts, reaching


class _ScoresDiffer(RuntimeError):
    """Pass B's product of a tracked image differs from pass A's score of it."""


def _check_tracked_scores(scores, tracked, tracked_scores, rows, a, b):
    """Pass B's products must equal pass A's where tracked images sit, bit for bit."""
    for r in rows:
        t = tracked[r]
        inside = (t >= a) & (t < b)
        if np.any(inside) and not np.array_equal(scores[r, t[inside] - a],
                                                 tracked_scores[r][inside]):
            raise _ScoresDiffer("matrix product not reproducible between passes; ranks "
                                "would be inexact")


def _chunk_tracked_scores(qblock, qtracked, database, valid, chunk, n):
    """Pass A from the chunk products themselves (bit-exact by construction): the tracked
    images' scores, and the last product computed (start, scores) for pass B to reuse."""
    tscores = [np.zeros(t.size, dtype=np.float32) for t in qtracked]
    all_tracked = np.unique(np.concatenate(qtracked)) if qtracked else np.zeros(0, int)
    kept_start, kept = -1, None
    for ci in np.unique(all_tracked // chunk):
        a, b = int(ci) * chunk, min(n, (int(ci) + 1) * chunk)
        kept_start, kept = a, _chunk_scores(qblock, database, a, b, valid)
        for r, t in enumerate(qtracked):
            sel = (t >= a) & (t < b)
            tscores[r][sel] = kept[r, t[sel] - a]
    return tscores, (kept_start, kept)


def _gathered_tracked_scores(qblock, qtracked, database, valid):
    """Pass A from a product of the tracked rows alone, in pieces of _GATHER_ROWS rows
    (padded so as not to take BLAS's small-matrix path): ~1/50 of a whole pass when
    tracked images lie in every chunk. BLAS gives these the chunk products' bits in
    practice, not by contract: pass B checks every one (_ScoresDiffer otherwise)."""
    all_tracked = np.unique(np.concatenate(qtracked))
    scores = np.empty((qblock.shape[0], all_tracked.size), dtype=np.float32)
    for p in range(0, all_tracked.size, _GATHER_ROWS):
        rows = all_tracked[p:p + _GATHER_ROWS]
        padded = np.resize(rows, max(rows.size, _GATHER_ROWS))
        scores[:, p:p + rows.size] = (qblock @ database[padded].T)[:, :rows.size]
    if valid is not None:
        scores[:, ~valid[all_tracked]] = -np.inf
    return [scores[r, np.searchsorted(all_tracked, t)] for r, t in enumerate(qtracked)]


def _finish_chunk(pending, top, ranks, rows, k):
    """Adds a chunk's rank counts (from its threads) and merges the chunk, less its leading
    slice already merged (`_fill_topk`), into the top-k `top`."""
    scores, start, lead, counting = pending
    found = {}
    for r, future in zip(rows, counting):
        counts, cols = future.result()
        ranks[r] += counts
        if cols is not None:
            found[r] = cols[cols >= lead] - lead if lead else cols
    if scores.shape[1] > lead:
        _update_topk(top[0], top[1], scores[:, lead:], k, start + lead, found)


class _Progress:
    """Logs chunks done, rate and ETA every `every_s` seconds."""

    def __init__(self, total, every_s):
        self.total, self.every_s, self.done = total, every_s, 0
        self.t0 = self.last = time.time()

    def tick(self):
        self.done += 1
        now = time.time()
        if now - self.last >= self.every_s:
            rate = self.done / (now - self.t0)
            logging.info("search: %d/%d chunks (%.1f chunks/s, ETA %.0f s)", self.done,
                         self.total, rate, max(0, self.total - self.done) / rate)
            self.last = now


def _search_block(qblock, qtracked, database, valid, starts, chunk, n, k, progress, pass_a):
    """Pass B of one query block: per tracked image the images ranked above it, and the
    top-k. A chunk's rank counting (in threads: NumPy and the compiled kernel release the
    GIL) runs while the next chunk's product is computed, and collects the entries that may
    enter the top-k; its top-k update follows, in chunk order.

    Args:
        pass_a: (tracked scores per query, (start, scores) of a chunk product to reuse or
            (-1, None)).

    Returns:
        (ranks per query, [top-k indices, top-k scores]).

    Raises:
        _ScoresDiffer: a chunk product of a tracked image differs from its pass A score.
    """
    tscores, (kept_start, kept) = pass_a
    del pass_a  # the kept product is dropped once used
    nb = qblock.shape[0]
    ranks = [np.zeros(t.size, dtype=np.int64) for t in qtracked]
    top = [np.zeros((nb, 0), dtype=np.int64), np.zeros((nb, 0), np.float32)]
    rows = [r for r, t in enumerate(qtracked) if t.size]
    pending = counting = None
    try:
        for a in starts + [None]:
            counting = None
            if a is not None:
                b = min(n, a + chunk)
                if a == kept_start:
                    scores, kept = kept, None
                else:
                    scores = _chunk_scores(qblock, database, a, b, valid)
                _check_tracked_scores(scores, qtracked, tscores, rows, a, b)
                lead = _fill_topk(top, scores, k, a)
                kth = top[1][:, -1].copy() if top[1].shape[1] == k else None
                counting = [_row_pool().submit(
                    _count_above, scores[r], tscores[r], qtracked[r], a, b,
                    None if kth is None else kth[r]) for r in rows]
            if pending is not None:
                _finish_chunk(pending, top, ranks, rows, k)
                progress.tick()
            pending = None if a is None else (scores, a, lead, counting)
    except _ScoresDiffer:
        for future in (pending[3] if pending else []) + (counting or []):
            future.cancel() or future.exception()  # let the threads finish before a retry
        raise
    return ranks, top


def exact_search(queries, database, *, k=100, tracked=None, valid=None,
                 memory_budget_bytes=None, chunk_size=None, log_every_s=30.0):
    """Exact inner-product search in database chunks: top-k and ranks of tracked images.

    Memory: besides the inputs, temporaries of about `memory_budget_bytes` (default half
    the descriptor matrix, clipped to 4..512 MiB) whatever the number of queries: queries
    are processed in blocks and the database in chunks.

    Args:
        queries: (Q, D) float descriptors.
        database: (N, D) float descriptors (a memory map works).
        k: neighbours kept per query (clipped to N).
        tracked: per query an int array of database indices whose whole-database rank
            is wanted (the positives and junk for AP); None for none.
        valid: (N,) bool, False for images to rank last (undecodable), or None.
        memory_budget_bytes, chunk_size: override the automatic chunking.
        log_every_s: progress logging interval.

    Returns:
        A `SearchResult`.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise ValueError(f"queries (Q, D) and database (N, D) must share D, got "
                         f"{queries.shape} and {database.shape}")
    if database.dtype != np.float32:
        database = database.astype(np.float32)
    nq, n = queries.shape[0], database.shape[0]
    if n == 0:
        raise ValueError("the database is empty")
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != (n,):
            raise ValueError(f"valid must have shape ({n},), got {valid.shape}")
    k = int(min(k, n))
    tracked = [np.unique(np.asarray(t, dtype=np.int64)) for t in
               (tracked if tracked is not None else [()] * nq)]
    if len(tracked) != nq:
        raise ValueError(f"tracked has {len(tracked)} entries for {nq} queries")
    for q, t in enumerate(tracked):
        if t.size and (t[0] < 0 or t[-1] >= n):
            raise ValueError(f"tracked[{q}] has indices outside [0, {n})")
    query_block, chunk = _plan(nq, n, database.nbytes, memory_budget_bytes, chunk_size)
    starts = list(range(0, n, chunk))

    topk_idx = np.zeros((nq, k), dtype=np.int64)
    topk_sc = np.zeros((nq, k), dtype=np.float32)
    ranks = [None] * nq
    progress = _Progress(len(starts) * -(-nq // query_block), log_every_s)
    for q0 in range(0, nq, query_block):
        q1 = min(nq, q0 + query_block)
        qblock = queries[q0:q1]
        qtracked = tracked[q0:q1]
        # Pass A: the tracked images' scores, bit-exactly those pass B counts over: from a
        # product of the tracked rows alone where they lie in several (long) chunks, checked
        # in pass B; else (or if one differs) from the chunk products holding them.
        holding = np.unique(np.concatenate(qtracked) // chunk) if qtracked else ()
        block_ranks = None
        if chunk >= _GATHER_ROWS and len(holding) > 1:
            try:
                block_ranks, top = _search_block(
                    qblock, qtracked, database, valid, starts, chunk, n, k, progress,
                    (_gathered_tracked_scores(qblock, qtracked, database, valid), (-1, None)))
            except _ScoresDiffer:
                progress.total += len(starts)
                logging.info("search: the tracked rows' own product differs from the chunk "
                             "products here; scoring them from the chunk products")
        if block_ranks is None:
            block_ranks, top = _search_block(
                qblock, qtracked, database, valid, starts, chunk, n, k, progress,
                _chunk_tracked_scores(qblock, qtracked, database, valid, chunk, n))
        ranks[q0:q1] = block_ranks
        topk_idx[q0:q1], topk_sc[q0:q1] = top
    return SearchResult(topk_indices=topk_idx, topk_scores=topk_sc, tracked=tracked,
                        tracked_ranks=ranks, chunk_size=chunk, query_block=query_block)


def _import_faiss():
    try:
        import faiss  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError("approximate search needs faiss, an optional extra: "
                          "pip install faiss-cpu==1.15.1 (or evaluate without an "
                          "approximate index)") from e
    return faiss


def approximate_search(queries, database, *, k=100, index_spec="HNSW32", params="",
                       valid=None, train_size=100_000, seed=0):
    """Approximate inner-product top-k with a faiss index built from a factory string.

    Args:
        queries: (Q, D) float32; database: (N, D) float32.
        k: neighbours per query.
        index_spec: faiss.index_factory description, e.g. "HNSW32", "IVF1024,Flat".
        params: faiss ParameterSpace string set before searching, e.g. "nprobe=16",
            "efSearch=128"; "" for the index defaults.
        valid: (N,) bool; invalid rows are left out of the index.
        train_size: vectors sampled to train indexes that need training (IVF, PQ).

    Returns:
        (indices (Q, k) int64 database indices, -1 where fewer were found,
         scores (Q, k) float32, build_seconds, search_seconds).
    """
    faiss = _import_faiss()
    database = np.asarray(database, dtype=np.float32)
    rows = np.arange(database.shape[0]) if valid is None else np.flatnonzero(valid)
    data = np.ascontiguousarray(database[rows])
    t0 = time.time()
    index = faiss.index_factory(data.shape[1], index_spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = data[rng.choice(data.shape[0], min(train_size, data.shape[0]), replace=False)]
        index.train(sample)
    index.add(data)
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    t1 = time.time()
    scores, found = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    t2 = time.time()
    indices = np.where(found >= 0, rows[np.maximum(found, 0)], -1).astype(np.int64)
    return indices, scores.astype(np.float32), t1 - t0, t2 - t1


def recall_at_k(approx_indices, exact_indices, k):
    """Mean over queries of |approx top-k ∩ exact top-k| / k."""
    a = np.asarray(approx_indices)[:, :k]
    e = np.asarray(exact_indices)[:, :k]
    hits = [np.intersect1d(a[i][a[i] >= 0], e[i]).size for i in range(e.shape[0])]
    return float(np.mean(hits) / k)
