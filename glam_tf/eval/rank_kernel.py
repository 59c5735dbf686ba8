"""The compiled binning pass of exact search's rank counting, built on first use.

`rank_kernel.c` bins a row of scores, counts the bins, and collects the entries of marked
bins and the columns that may enter the top-k, in one pass; NumPy needs seven passes and
temporaries the size of the row for the same result (`search._bin_collect_numpy`), which
made the counting a third of the search's time (docs/benchmarks.md). The source ships with
the package and is compiled with the system C compiler ($CC, else gcc, else cc) the first
time a search needs it, into a cache folder ($GLAM_TF_CACHE, else
$XDG_CACHE_HOME/glam_tf, else ~/.cache/glam_tf; a private temporary folder when that is
not writable), named by a hash of the source and the command, so an edit or another
machine type rebuilds. Without a compiler, or with GLAM_TF_RANK_KERNEL=numpy,
the NumPy pass counts the same ranks, bit for bit, more slowly; the reason is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import threading
import time

import numpy as np
from absl import logging

from glam_tf import files

SOURCE = files.join(files.dirname(files.absolute(__file__)), "rank_kernel.c")
# No fused multiply-adds (aarch64 and -march builds contract `v * scale + offset` into one
# rounding): the bins must be NumPy's two roundings, so both paths count alike.
CFLAGS = ("-O2", "-std=c99", "-fPIC", "-shared", "-ffp-contract=off")
ENV_SWITCH = "GLAM_TF_RANK_KERNEL"  # "numpy": never compile
_lock = threading.Lock()
_buffers = threading.local()


compiler = files.c_compiler


def cache_dir() -> str:
    """Where the compiled kernel is kept (module doc)."""
    if os.environ.get("GLAM_TF_CACHE"):
        return os.environ["GLAM_TF_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or files.join(files.expanduser("~"), ".cache")
    return files.join(base, "glam_tf")


def _build(cc: str) -> str:
    """The shared library for this source and compiler: built (atomically: under a temporary
    name, then renamed) unless the cache already holds it."""
    source = files.read_bytes(SOURCE)
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(CFLAGS).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    folder = cache_dir()
    try:
        files.makedirs(folder)
        writable = files.local_writable(folder)
    except OSError:
        writable = False
    if not writable:
        folder = files.scratch_dir("glam_tf_kernel_")
    path = files.join(folder, f"rank_kernel-{key}.so")
    if files.exists(path):
        return path
    tmp = files.temporary_path(path)
    t0 = time.time()
    done = subprocess.run([cc, *CFLAGS, "-o", tmp, SOURCE], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        if files.exists(tmp):
            files.remove(tmp)
        raise OSError(f"{cc} {' '.join(CFLAGS)} {SOURCE} failed (exit {done.returncode}): "
                      f"{done.stderr.strip()[:500]}")
    files.rename(tmp, path)
    logging.info("search: compiled the rank-count kernel with %s in %.1f s: %s", cc,
                 time.time() - t0, path)
    return path


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
        fn = ctypes.CDLL(_build(cc)).glam_bin_collect
    except OSError as e:
        logging.warning("search: the rank-count kernel could not be built or loaded (%s): "
                        "rank counting in NumPy", e)
        return None
    ptr = np.ctypeslib.ndpointer
    fn.restype = ctypes.c_int64
    fn.argtypes = [ptr(np.float32, flags="C"), ctypes.c_int64, ctypes.c_float,
                   ctypes.c_float, ctypes.c_int64, ptr(np.int32, flags="C"),
                   ptr(np.uint8, flags="C"), ptr(np.float32, flags="C"), ctypes.c_float,
                   ptr(np.int64, flags="C"), ptr(np.int64, flags="C")]
    return fn


def load():
    """The compiled `glam_bin_collect`, or None when NumPy must do the pass (module doc)."""
    with _lock:  # one build, however many search threads ask at once
        return _load()


def _scratch(n, num_bins):
    """This thread's buffers for rows of up to `n` scores (values, columns) and `num_bins`
    counts (zeroed), grown when needed: reused, so that a row costs no allocation of its
    size (the search's memory bound) and no mapping and unmapping of pages."""
    held = getattr(_buffers, "held", None)
    if held is None or held[0].size < n or held[2].size < num_bins:
        held = _buffers.held = (np.empty(n, dtype=np.float32), np.empty(n, dtype=np.int64),
                                np.empty(num_bins, dtype=np.int32))
    hist = held[2][:num_bins]
    hist.fill(0)
    return held[0], held[1], hist


def bin_collect(fn, row, scale, offset, num_bins, marked, kth=None):
    """`fn` (from `load()`) on one row: (hist (num_bins,) int32, the row's values in marked
    bins (unsorted float32), the columns scoring >= `kth` (None when `kth` is None)), or
    None when a score is NaN. The first two are this thread's buffers (`_scratch`): valid
    until its next call. ctypes releases the GIL for the call, so the search's threads
    count rows in parallel."""
    row = np.ascontiguousarray(row, dtype=np.float32)
    if row.size >= 2**31:
        raise ValueError(f"bin_collect: a row of {row.size} scores (int32 counts: < 2^31)")
    cand, above, hist = _scratch(row.size, num_bins)
    n_above = np.zeros(1, dtype=np.int64)
    taken = fn(row, row.size, scale, offset, num_bins, hist, marked.view(np.uint8), cand,
               np.inf if kth is None else kth, above, n_above)
    if taken < 0:
        return None
    return hist, cand[:taken], None if kth is None else above[:n_above[0]].copy()
