"""The compiled rank-count pass of exact search, built on first use.

`rank_kernel.c` gives, in one pass over a row of chunk scores, per tracked score the
entries ranked before it (the scores counted into bins, and only those sharing a tracked
score's bin compared with it: no sort) and the columns that may enter the top-k, for every
row of a chunk in one call; NumPy needs several passes and temporaries the size of the
row for the same counts (`search._rank_count_numpy`). The source ships with the package
and is compiled with the system C compiler ($CC, else gcc, else cc) the first time a
search needs it, into the cache of glam_tf.cpu.build_shared_library (named by a hash of
the source and the command, so an edit or another machine type rebuilds). Without a
compiler, or with GLAM_TF_RANK_KERNEL=numpy, NumPy counts the same ranks, more slowly; the
reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import numpy as np
from absl import logging

from glam_tf import cpu, files

SOURCE = files.join(files.dirname(files.absolute(__file__)), "rank_kernel.c")
# No fused multiply-adds (aarch64 and -march builds contract `v * scale + offset` into one
# rounding): the same bins on every machine (the counts do not depend on them).
CFLAGS = ("-O2", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off")
ENV_SWITCH = "GLAM_TF_RANK_KERNEL"  # "numpy": never compile
_lock = threading.Lock()
_buffers = threading.local()


compiler = cpu.c_compiler


def _build(cc: str) -> str:
    """The shared library for this source and compiler, from the cache or built now."""
    return cpu.build_shared_library(SOURCE, CFLAGS, cc, "rank_kernel")


@functools.cache
def _load():
    """The kernel's C function, or None (the reason logged once)."""
    if os.environ.get(ENV_SWITCH, "").lower() == "numpy":
        logging.info("search: %s=numpy: rank counting in NumPy", ENV_SWITCH)
        return None
    cc = compiler()
    if cc is None:
        logging.warning("search: no C compiler ($CC, gcc or cc): rank counting in NumPy, "
                        "about 2x slower on that part (docs/benchmarks.md); install gcc to "
                        "compile %s", SOURCE)
        return None
    try:
        lib = ctypes.CDLL(_build(cc))
    except OSError as e:
        logging.warning("search: the rank-count kernel could not be built or loaded (%s): "
                        "rank counting in NumPy", e)
        return None
    # Plain addresses (the wrappers check the arrays): ndpointer's checks of 13 arguments
    # took as long as counting 10 k scores.
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.glam_rank_count.restype = lib.glam_rank_count_rows.restype = i64
    lib.glam_rank_count.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, ptr,
                                    ctypes.c_float, ptr]
    lib.glam_rank_count_rows.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr,
                                         ptr, ptr, ptr, ptr, ptr, i64, ptr, ptr]
    return lib


def load():
    """The compiled library (`rank_count`, `rank_count_rows`), or None when NumPy must count
    (module doc)."""
    with _lock:  # one build, however many search threads ask at once
        return _load()


def _scratch(n, num_bins, above_rows=1):
    """This thread's buffers for rows of up to `n` scores, `num_bins` bins and the top-k
    columns of `above_rows` rows, grown when needed: reused, so that a row costs no
    allocation of its size (the search's memory bound) and no mapping of pages."""
    held = getattr(_buffers, "held", None)
    if (held is None or held[0].size < n or held[3].size < num_bins
            or held[2].size < above_rows * n):
        n = max(n, 1)
        held = _buffers.held = (np.empty(n, dtype=np.float32), np.empty(n, dtype=np.int64),
                                np.empty(above_rows * n, dtype=np.int64),
                                np.empty(num_bins, dtype=np.int32),
                                np.empty(num_bins, dtype=np.int32),
                                np.empty(n, dtype=np.int64))
    return held


def _checked(tv, lim, num_bins):
    tv = np.ascontiguousarray(tv, dtype=np.float32)
    lim = np.ascontiguousarray(lim, dtype=np.int64)
    if tv.ndim != 1 or not 0 < tv.size == lim.size or num_bins < 4:
        raise ValueError(f"rank_count: {tv.size} tracked scores, {lim.size} limits, "
                         f"{num_bins} bins")
    return tv, lim


def rank_count(lib, row, tv, lim, num_bins, kth=None):
    """The compiled count (`lib` from `load()`) of one row: (per tracked score of `tv`
    (ascending finite float32, at least one) the entries above it plus those equal to it
    in columns below `lim` (int64), the columns scoring >= `kth` (None when `kth` is
    None)), or None when a score is NaN. `num_bins` (>= 4) sets the speed, not the
    counts. ctypes releases the GIL for the call."""
    row = np.ascontiguousarray(row, dtype=np.float32)
    if row.size >= 2**31:
        raise ValueError(f"rank_count: a row of {row.size} scores (int32 counts: < 2^31)")
    tv, lim = _checked(tv, lim, num_bins)
    cand, cand_col, above, hist, first, _ = _scratch(row.size, num_bins)
    count = np.empty(tv.size, dtype=np.int64)
    reached = lib.glam_rank_count(
        row.ctypes.data, row.size, tv.ctypes.data, lim.ctypes.data, tv.size, num_bins,
        hist.ctypes.data, first.ctypes.data, cand.ctypes.data, cand_col.ctypes.data,
        count.ctypes.data, np.inf if kth is None else kth, above.ctypes.data)
    if reached < 0:
        return None
    return count, None if kth is None else above[:reached].copy()


# Room for the top-k columns of a chunk's rows in `rank_count_rows`, in rows: past the
# first chunks few columns reach a row's k-th best, and rows past the room are found again.
ABOVE_ROOM_ROWS = 4


def rank_count_rows(lib, scores, row_ids, tv, lim, starts, num_bins, kth=None):
    """`rank_count` of the rows `row_ids` of the C-order (Q, n) float32 `scores` in one call:
    row_ids[r]'s tracked scores and limits are tv[starts[r]:starts[r + 1]] (likewise lim),
    its top-k threshold kth[r] (kth None: none). Returns (the counts, concatenated like
    tv; per row its columns scoring >= kth[r], or None without kth), or None when a score
    is NaN."""
    if not (scores.flags.c_contiguous and scores.dtype == np.float32):
        raise ValueError("rank_count_rows: scores must be C-order float32")
    n = scores.shape[1]
    if n >= 2**31:
        raise ValueError(f"rank_count_rows: rows of {n} scores (int32 counts: < 2^31)")
    row_ids = np.ascontiguousarray(row_ids, dtype=np.int64)
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    tv, lim = _checked(tv, lim, num_bins)
    if starts.size != row_ids.size + 1 or np.any(np.diff(starts) < 1) or starts[-1] != tv.size:
        raise ValueError("rank_count_rows: starts must split tv into one non-empty span "
                         "per row")
    if kth is None:
        thresholds = np.full(row_ids.size, np.inf, dtype=np.float32)
    else:
        thresholds = np.ascontiguousarray(kth, dtype=np.float32)
    cand, cand_col, above, hist, first, spill = _scratch(n, num_bins, ABOVE_ROOM_ROWS)
    count = np.empty(tv.size, dtype=np.int64)
    n_above = np.empty(row_ids.size, dtype=np.int64)
    if lib.glam_rank_count_rows(
            scores.ctypes.data, n, row_ids.size, row_ids.ctypes.data, tv.ctypes.data,
            lim.ctypes.data, starts.ctypes.data, num_bins, hist.ctypes.data,
            first.ctypes.data, cand.ctypes.data, cand_col.ctypes.data, count.ctypes.data,
            thresholds.ctypes.data, above.ctypes.data, ABOVE_ROOM_ROWS * n,
            n_above.ctypes.data, spill.ctypes.data) < 0:
        return None
    if kth is None:
        return count, [None] * row_ids.size
    cols, used = [], 0
    for r, got in zip(row_ids, n_above):
        if got < 0:
            cols.append(np.flatnonzero(scores[r] >= thresholds[len(cols)]))
        else:
            cols.append(above[used:used + got].copy())
            used += got
    return count, cols
