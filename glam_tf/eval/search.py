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
import contextlib
import dataclasses
import functools
import gc
import os
import threading
import time

import numpy as np
from absl import logging

from glam_tf import cpu
from glam_tf.eval import rank_kernel

# Per (query, database) pair of a worker's chunk: its scores, pass A's kept product and the
# first chunk's partition indices (24 bytes: the bound of the budget, with room to spare).
_BYTES_PER_SCORE = 24
# Rank counting: sort the entries reaching the lowest tracked score when at most
# 1/_SORT_FRACTION of a row does, else count the row into a quarter as many bins, at
# most _MAX_BINS (rank_kernel.c).
_SORT_FRACTION = 32
_MAX_BINS = 1 << 16
# Pass A multiplies the tracked rows alone, this many at a time (at least), when chunks are
# at least this long and tracked images lie in several chunks.
_GATHER_ROWS = 4096
# Automatic chunks: a _CHUNKS_PER_WORKER-th of a worker's share of the database, so the
# workers, taking the chunks in turn, finish close together (longer chunks also leave
# their scores out of the cache when counted), at least _MIN_CHUNK rows, or shorter where
# the budget says so.
_MIN_CHUNK = 8192
_CHUNKS_PER_WORKER = 8


@dataclasses.dataclass
class SearchResult:
    """Top-k neighbours and whole-database ranks of tracked images.

    Attributes:
        topk_indices: (Q, k) int64 database indices, best first (ties by index).
        topk_scores: (Q, k) float32 scores (-inf for invalid images).
        tracked: per query a sorted unique (M_q,) int64 array of database indices.
        tracked_ranks: per query (M_q,) int64 0-based ranks of `tracked` in the database.
        chunk_bounds: the database rows scored at a time, [(start, stop)] in order;
            chunk_size: the longest; query_block: queries at a time.
    """

    topk_indices: np.ndarray
    topk_scores: np.ndarray
    tracked: list
    tracked_ranks: list
    chunk_size: int = 0
    chunk_bounds: list = dataclasses.field(default_factory=list)
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


def _plan(num_queries, num_db, db_bytes, memory_budget_bytes, chunk_size, workers):
    """Query block and database chunks [(start, stop)], so that the temporary score arrays
    of all `workers` (a chunk each) fit the budget."""
    if memory_budget_bytes is None:
        # About half the descriptor matrix (so the peak stays near 1.5x it), 4 MiB..512 MiB.
        memory_budget_bytes = int(min(512 << 20, max(4 << 20, db_bytes // 2)))
    min_chunk = min(num_db, _MIN_CHUNK)
    query_block = max(1, min(num_queries, memory_budget_bytes
                             // (_BYTES_PER_SCORE * min_chunk * workers)))
    if chunk_size is None:
        chunk_size = max(min_chunk, min(
            memory_budget_bytes // (_BYTES_PER_SCORE * query_block * workers),
            -(-num_db // (_CHUNKS_PER_WORKER * workers))))
    size = int(max(1, min(num_db, chunk_size)))
    return query_block, [(a, min(num_db, a + size)) for a in range(0, num_db, size)]


@functools.cache
def _row_pool():
    """Threads for the search's chunk workers (and refine's jobs), one per core."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=_num_workers(),
                                                 thread_name_prefix="search")


def _num_workers():
    return os.cpu_count() or 1


@contextlib.contextmanager
def _gc_paused():
    """No cyclic garbage collection while searching: the search makes no reference cycles,
    and each collection its many small arrays set off scanned every object of the program
    (millions with TensorFlow loaded: a tenth of the search's time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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
        elif cols.size:
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


def _reaching(row, kth, bound=None):
    """The columns of `row` scoring >= `kth` (None when `kth` is None); none without a pass
    when `bound`, an upper bound of their number, is 0."""
    if kth is None:
        return None
    if bound == 0:
        return np.zeros(0, dtype=np.intp)
    return np.flatnonzero(row >= kth)


def _bins(values, scale, offset, num_bins):
    """Monotone bin numbers (intp) of float32 `values`: value * scale + offset, clipped to
    [0, num_bins - 1] and truncated (non-decreasing in the value: scale > 0). NaN casts to a
    negative bin."""
    x = np.multiply(values, scale, dtype=np.float32)
    x += offset
    out = np.empty(x.shape, dtype=np.intp)
    with np.errstate(invalid="ignore"):
        np.clip(x, np.float32(0), np.float32(num_bins - 1), out=out, casting="unsafe")
    return out


def _rank_count_numpy(row, tv, lim, kth):
    """`rank_kernel.rank_count` in NumPy, the same way: (per tracked score of `tv`
    (ascending) the entries of `row` above it plus those equal to it in columns below
    `lim`, the columns scoring >= `kth` or None), or None when a score is NaN. The entries
    are counted into bins over the tracked scores' span; those sharing a bin with a
    tracked score are sorted and searched."""
    num_bins = _num_bins(row.size)
    width = float(tv[-1]) - float(tv[0])
    if not width > 0:
        width = abs(float(tv[0])) * 1e-3 + 1e-9
    scale = np.float32((num_bins - 3) / width)
    offset = np.float32(1.5) - np.float32(tv[0]) * scale
    idx = _bins(row, scale, offset, num_bins)
    try:
        hist = np.bincount(idx, minlength=num_bins)
    except ValueError:  # a negative bin: NaN
        return None
    tbins = _bins(tv, scale, offset, num_bins)
    shared = np.zeros(num_bins, dtype=bool)
    shared[tbins] = True
    cols = np.flatnonzero(shared[idx])  # entries sharing a bin with a tracked score
    del idx
    order = np.argsort(row[cols], kind="stable")  # by value, then column
    cand, cols = row[cols][order], cols[order]
    hist[shared] = 0
    above_bin = hist[::-1].cumsum()[::-1]  # entries in this bin or higher, not shared
    counts = np.where(tbins + 1 < num_bins, above_bin[np.minimum(tbins + 1, num_bins - 1)], 0)
    left = np.searchsorted(cand, tv, side="left")
    right = np.searchsorted(cand, tv, side="right")
    counts += cand.size - right
    for j in np.flatnonzero(right > left):  # ties: the equal entries in columns below lim
        counts[j] += np.searchsorted(cols[left[j]:right[j]], lim[j])
    return counts, _reaching(row, kth)


def _nan_error(a, b):
    return ValueError(f"search: NaN scores against database rows [{a}, {b}): a query or "
                      "database descriptor holds NaN")


def _num_bins(columns):
    return int(min(_MAX_BINS, max(64, columns // 4)))


def _binned_rows(sampled, low, columns):
    """Which rows the counting pass takes (not the sort), from every 16th score of each
    (`sampled`): more than 1/_SORT_FRACTION of the row's `columns` reach its lowest tracked
    score `low`."""
    return np.count_nonzero(sampled >= low[:, None], axis=1) * 16 * _SORT_FRACTION > columns


def _count_finite(row, tscores, tracked, a, b, kth):
    """Per finite tracked score, the chunk's entries ranked before it; see `_count_above`.

    When few entries reach the lowest tracked score (tracked images near the top, as real
    positives mostly are), those are sorted and searched; otherwise one pass counts the
    entries into bins and compares only those sharing a tracked score's bin
    (`rank_kernel.rank_count`, or `_rank_count_numpy`). Either way the pass collects the
    columns scoring >= `kth` (`_count_above`).
    """
    low = tscores.min()
    if not _binned_rows(row[None, ::16], low[None], row.size)[0]:  # both exact
        cand = np.sort(row[row >= low])
        bound = None  # cand holds every entry >= low
        if kth is not None and kth >= low:
            bound = cand.size - int(np.searchsorted(cand, kth, side="left"))
        left = np.searchsorted(cand, tscores, side="left")
        right = np.searchsorted(cand, tscores, side="right")
        n = cand.size
        counts = np.where(tracked >= b, n - left, n - right)  # before the chunk: ties too
        inside = (tracked >= a) & (tracked < b)
        for m in np.flatnonzero(inside & (right - left > 1)):
            counts[m] += np.count_nonzero(row[: tracked[m] - a] == tscores[m])
        return counts, _reaching(row, kth, bound)
    order = np.argsort(tscores, kind="stable")
    tv = tscores[order]
    lim = np.clip(tracked[order] - a, 0, b - a)  # equal entries in columns below rank first
    kernel = rank_kernel.load()
    if kernel is None:
        counted = _rank_count_numpy(row, tv, lim, kth)
    else:
        counted = rank_kernel.rank_count(kernel, row, tv, lim, _num_bins(row.size), kth)
    if counted is None:
        raise _nan_error(a, b)
    counts = np.empty(tracked.size, dtype=np.int64)
    counts[order] = counted[0]
    return counts, counted[1]


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


@dataclasses.dataclass
class _Prepared:
    """A query block's rows whose tracked scores are all finite, with those scores sorted
    once for the compiled counting of every chunk (`rank_kernel.rank_count_rows`).

    Attributes:
        rows: (R,) the rows; perms: per row the order sorting its tracked scores.
        tv, tracked: the rows' sorted tracked scores and their database indices, one span
            per row, split by starts (R + 1,); low: (R,) each row's lowest tracked score.
    """

    rows: np.ndarray
    perms: list
    tv: np.ndarray
    tracked: np.ndarray
    starts: np.ndarray
    low: np.ndarray

    @classmethod
    def of(cls, qtracked, tscores, rows):
        rows = [r for r in rows if np.all(tscores[r] > -np.inf)]
        perms = [np.argsort(tscores[r], kind="stable") for r in rows]
        tv = [tscores[r][p] for r, p in zip(rows, perms)]
        return cls(rows=np.array(rows, dtype=np.int64), perms=perms,
                   tv=np.concatenate(tv) if tv else np.zeros(0, np.float32),
                   tracked=(np.concatenate([qtracked[r][p] for r, p in zip(rows, perms)])
                            if rows else np.zeros(0, np.int64)),
                   starts=np.cumsum([0] + [t.size for t in tv]).astype(np.int64),
                   low=np.array([t[0] for t in tv], dtype=np.float32))


def _count_chunk(scores, a, b, qtracked, tscores, rows, kth, prepared):
    """`_count_above` of every row in `rows` of a chunk's `scores`: the rows of `prepared`
    that take the counting pass in one compiled call, the others one by one."""
    done = {}
    kernel = rank_kernel.load() if prepared.rows.size else None
    if kernel is not None:
        which = np.flatnonzero(_binned_rows(scores[:, ::16][prepared.rows], prepared.low,
                                            b - a))
        if which.size:
            spans = [np.arange(prepared.starts[i], prepared.starts[i + 1]) for i in which]
            pick = np.concatenate(spans) if which.size < prepared.rows.size else slice(None)
            ids = prepared.rows[which]
            counted = rank_kernel.rank_count_rows(
                kernel, scores, ids, prepared.tv[pick],
                np.clip(prepared.tracked[pick] - a, 0, b - a),
                np.cumsum([0] + [span.size for span in spans]), _num_bins(b - a),
                None if kth is None else kth[ids])
            if counted is None:
                raise _nan_error(a, b)
            counts, cols = counted
            at = 0
            for i, r, c in zip(which, ids, cols):
                perm = prepared.perms[i]
                done[r] = (np.empty(perm.size, dtype=np.int64), c)
                done[r][0][perm] = counts[at:at + perm.size]
                at += perm.size
    return [done[r] if r in done else
            _count_above(scores[r], tscores[r], qtracked[r], a, b,
                         None if kth is None else kth[r]) for r in rows]


class _ScoresDiffer(RuntimeError):
    """Pass B's product of a tracked image differs from pass A's score of it."""


def _check_tracked_scores(scores, flat, a, b):
    """Pass B's products must equal pass A's where tracked images sit, bit for bit (NaN
    too: its own error follows). `flat`: (row, database index, pass A score) arrays of
    every tracked image of the block."""
    rows, tracked, tscores = flat
    inside = (tracked >= a) & (tracked < b)
    if not np.array_equal(scores[rows[inside], tracked[inside] - a], tscores[inside],
                          equal_nan=True):
        raise _ScoresDiffer("matrix product not reproducible between passes; ranks would "
                            "be inexact")


def _split_product(qblock, database, a, b, valid):
    """`_chunk_scores` with the database rows shared among the workers (one BLAS thread
    each, each product the same shape of call as a chunk's): for a product that pass A
    keeps for pass B, while no worker has started."""
    parts = min(_num_workers(), (b - a) // _GATHER_ROWS)
    if parts < 2:
        return _chunk_scores(qblock, database, a, b, valid)
    out = np.empty((qblock.shape[0], b - a), dtype=np.float32)
    cuts = np.linspace(a, b, parts + 1).astype(int)

    def part(i):
        np.matmul(qblock, database[cuts[i]:cuts[i + 1]].T, out=out[:, cuts[i] - a:cuts[i + 1] - a])

    list(_row_pool().map(part, range(parts)))
    if valid is not None:
        out[:, ~valid[a:b]] = -np.inf
    return out


def _holding(qtracked, bounds):
    """The indices of the chunks of `bounds` that hold tracked images."""
    all_tracked = np.unique(np.concatenate(qtracked)) if qtracked else np.zeros(0, int)
    return np.unique(np.searchsorted([b for _, b in bounds], all_tracked, side="right"))


def _chunk_tracked_scores(qblock, qtracked, database, valid, bounds):
    """Pass A from the chunk products themselves (bit-exact by construction): the tracked
    images' scores, and the last product computed (start, scores) for pass B to reuse.
    When one chunk holds every tracked image, its product is shared among the workers."""
    tscores = [np.zeros(t.size, dtype=np.float32) for t in qtracked]
    holding = _holding(qtracked, bounds)
    product = _split_product if holding.size == 1 and len(bounds) > 1 else _chunk_scores
    kept_start, kept = -1, None
    for ci in holding:
        a, b = bounds[ci]
        kept_start, kept = a, product(qblock, database, a, b, valid)
        for r, t in enumerate(qtracked):
            sel = (t >= a) & (t < b)
            tscores[r][sel] = kept[r, t[sel] - a]
    return tscores, (kept_start, kept)


def _gathered_tracked_scores(qblock, qtracked, database, valid):
    """Pass A from a product of the tracked rows alone, in pieces of _GATHER_ROWS rows
    (padded so as not to take BLAS's small-matrix path) shared among the workers: ~1/50 of
    a whole pass when tracked images lie in every chunk. BLAS gives these the chunk
    products' bits in practice, not by contract: pass B checks every one (_ScoresDiffer
    otherwise)."""
    all_tracked = np.unique(np.concatenate(qtracked))
    scores = np.empty((qblock.shape[0], all_tracked.size), dtype=np.float32)

    def piece(p):
        rows = all_tracked[p:p + _GATHER_ROWS]
        padded = np.resize(rows, max(rows.size, _GATHER_ROWS))
        scores[:, p:p + rows.size] = (qblock @ database[padded].T)[:, :rows.size]

    list(_row_pool().map(piece, range(0, all_tracked.size, _GATHER_ROWS)))
    if valid is not None:
        scores[:, ~valid[all_tracked]] = -np.inf
    return [scores[r, np.searchsorted(all_tracked, t)] for r, t in enumerate(qtracked)]


def _finish_chunk(scores, start, lead, counted, top, ranks, rows, k):
    """Adds a chunk's rank counts (`_count_above` of each row in `rows`) and merges the
    chunk, less its leading slice already merged (`_fill_topk`), into the top-k `top`."""
    found = {}
    for r, (counts, cols) in zip(rows, counted):
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
        self.lock = threading.Lock()

    def tick(self):
        with self.lock:
            self.done += 1
            now = time.time()
            if now - self.last < self.every_s:
                return
            rate = self.done / (now - self.t0)
            logging.info("search: %d/%d chunks (%.1f chunks/s, ETA %.0f s)", self.done,
                         self.total, rate, max(0, self.total - self.done) / rate)
            self.last = now


def _search_block(qblock, qtracked, database, valid, bounds, k, progress, pass_a):
    """Pass B of one query block: per tracked image the images ranked above it, and the
    top-k. One worker per core takes the chunks in turn, multiplies its chunk (one BLAS
    thread), counts the ranks of every row in it and merges it into its own top-k; the
    workers' counts are added and their top-k lists merged at the end.

    Args:
        pass_a: (tracked scores per query, (start, scores) of a chunk product to reuse or
            (-1, None)).

    Returns:
        (ranks per query, [top-k indices, top-k scores]).

    Raises:
        _ScoresDiffer: a chunk product of a tracked image differs from its pass A score.
    """
    tscores, (kept_start, kept) = pass_a
    del pass_a
    kept = {} if kept is None else {kept_start: kept}  # popped by its worker, then dropped
    nb = qblock.shape[0]
    rows = [r for r, t in enumerate(qtracked) if t.size]
    prepared = _Prepared.of(qtracked, tscores, rows)
    flat = (np.repeat(np.arange(nb), [t.size for t in qtracked]),
            np.concatenate(qtracked), np.concatenate(tscores))
    todo, lock, failed = iter(bounds), threading.Lock(), threading.Event()

    def next_chunk():
        with lock:
            return None if failed.is_set() else next(todo, None)

    def work():
        ranks = [np.zeros(t.size, dtype=np.int64) for t in qtracked]
        top = [np.zeros((nb, 0), dtype=np.int64), np.zeros((nb, 0), np.float32)]
        try:
            while (bound := next_chunk()) is not None:
                a, b = bound
                scores = kept.pop(a, None)
                if scores is None:
                    scores = _chunk_scores(qblock, database, a, b, valid)
                _check_tracked_scores(scores, flat, a, b)
                lead = _fill_topk(top, scores, k, a)
                kth = top[1][:, -1] if top[1].shape[1] == k else None
                counted = _count_chunk(scores, a, b, qtracked, tscores, rows, kth, prepared)
                _finish_chunk(scores, a, lead, counted, top, ranks, rows, k)
                progress.tick()
        except BaseException:
            failed.set()  # the other workers stop after their chunk
            raise
        return ranks, top

    futures = [_row_pool().submit(work) for _ in range(min(_num_workers(), len(bounds)))]
    concurrent.futures.wait(futures)
    done = [f.result() for f in futures]
    ranks = [np.sum([d[0][r] for d in done], axis=0) for r in range(nb)]
    top = done[0][1]
    for _, other in done[1:]:
        top = list(_merge_topk(*top, *other, k))
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
    query_block, bounds = _plan(nq, n, database.nbytes, memory_budget_bytes, chunk_size,
                                _num_workers())
    progress = _Progress(len(bounds) * -(-nq // query_block), log_every_s)
    with cpu.single_threaded_blas(min(_num_workers(), len(bounds)) > 1), _gc_paused():
        return _search_blocks(queries, database, tracked, valid, k, query_block, bounds,
                              progress)


def _search_blocks(queries, database, tracked, valid, k, query_block, bounds, progress):
    """`exact_search` block by block (its arguments checked and planned)."""
    nq = queries.shape[0]
    longest = max(b - a for a, b in bounds)
    topk_idx = np.zeros((nq, k), dtype=np.int64)
    topk_sc = np.zeros((nq, k), dtype=np.float32)
    ranks = [None] * nq
    for q0 in range(0, nq, query_block):
        q1 = min(nq, q0 + query_block)
        qblock = queries[q0:q1]
        qtracked = tracked[q0:q1]
        # Pass A: the tracked images' scores, bit-exactly those pass B counts over: from a
        # product of the tracked rows alone where they lie in several (long) chunks, checked
        # in pass B; else (or if one differs) from the chunk products holding them.
        block_ranks = None
        if longest >= _GATHER_ROWS and _holding(qtracked, bounds).size > 1:
            try:
                block_ranks, top = _search_block(
                    qblock, qtracked, database, valid, bounds, k, progress,
                    (_gathered_tracked_scores(qblock, qtracked, database, valid), (-1, None)))
            except _ScoresDiffer:
                progress.total += len(bounds)
                logging.info("search: the tracked rows' own product differs from the chunk "
                             "products here; scoring them from the chunk products")
        if block_ranks is None:
            block_ranks, top = _search_block(
                qblock, qtracked, database, valid, bounds, k, progress,
                _chunk_tracked_scores(qblock, qtracked, database, valid, bounds))
        ranks[q0:q1] = block_ranks
        topk_idx[q0:q1], topk_sc[q0:q1] = top
    return SearchResult(topk_indices=topk_idx, topk_scores=topk_sc, tracked=tracked,
                        tracked_ranks=ranks, chunk_size=longest, chunk_bounds=bounds,
                        query_block=query_block)


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
