"""This CPU and the native code run on it.

- What it is: model, instruction-set level and native bfloat16, read from /proc/cpuinfo
  (what the benches print in their header and what an export logs before choosing a
  precision: a bfloat16 export is fast only where the CPU computes bfloat16 natively,
  AVX512_BF16 or AMX; elsewhere TensorFlow emulates it in float32).
- OpenBLAS's thread count, held at one while the search's own workers use the cores.
- The system C compiler and the cached build of the project's C sources (the search's
  rank kernel; serving_check/ builds its own binary with the same compiler).
"""

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import os
import platform
import re
import subprocess
import time

from absl import logging

from glam_tf import files

CPUINFO = "/proc/cpuinfo"

# Instruction-set levels, highest first, with the /proc/cpuinfo flags that make each.
ISA_LEVELS = (
    ("AMX", ("amx_bf16", "amx_tile")),
    ("AVX512-BF16", ("avx512_bf16",)),
    ("AVX-512", ("avx512f",)),
    ("AVX2", ("avx2",)),
)
NATIVE_BFLOAT16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    """What /proc/cpuinfo says of the first processor.

    Attributes:
        model_name: e.g. "AMD EPYC 7B13" ("" when unknown).
        family, model: the vendor's numbers as text ("" when unknown).
        flags: the feature flags.
    """

    model_name: str
    family: str = ""
    model: str = ""
    flags: frozenset = frozenset()

    @property
    def isa_level(self):
        """"AMX", "AVX512-BF16", "AVX-512", "AVX2", "below AVX2", or "unknown" (no flags)."""
        if not self.flags:
            return "unknown"
        for level, needed in ISA_LEVELS:
            if all(f in self.flags for f in needed):
                return level
        return "below AVX2"

    @property
    def native_bfloat16(self):
        """True when the CPU computes bfloat16 natively (AVX512_BF16 or AMX-BF16)."""
        return bool(self.flags & NATIVE_BFLOAT16_FLAGS)

    def describe(self):
        """One line: model, family/model and instruction-set level."""
        numbers = f" (family {self.family} model {self.model})" if self.family else ""
        return f"{self.model_name or 'unknown CPU'}{numbers}, {self.isa_level}"


def parse_cpuinfo(text):
    """The `CpuInfo` of the first processor block of /proc/cpuinfo's `text`."""
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return CpuInfo(model_name=fields.get("model name", ""),
                   family=fields.get("cpu family", ""), model=fields.get("model", ""),
                   flags=frozenset(fields.get("flags", "").split()))


def cpu_info(path=CPUINFO):
    """This machine's `CpuInfo`; without /proc/cpuinfo (not Linux) the platform's processor
    name and no flags (instruction-set level "unknown")."""
    if not files.exists(path):
        return CpuInfo(model_name=platform.processor())
    return parse_cpuinfo(files.read_local_text(path))  # /proc files report size 0


def load_average():
    """The 1, 5 and 15 minute load averages (zeros where the platform has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------------------
# OpenBLAS threads.

@functools.cache
def _openblas_threads():
    """(get, set) of the loaded OpenBLAS's thread count (numpy's bundled one), or None."""
    try:
        paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)",
                                      files.read_local_text("/proc/self/maps"))))
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("scipy_", ""):
            for suffix in ("64_", ""):
                get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get is not None and put is not None:
                    get.restype = ctypes.c_int
                    put.argtypes = [ctypes.c_int]
                    return get, put
    return None


@contextlib.contextmanager
def single_threaded_blas(active=True):
    """OpenBLAS at one thread inside the block while `active` (restored after; a no-op
    without OpenBLAS). Process-wide while it lasts.

    The search's workers multiply their own chunks, one per core, and count them there:
    OpenBLAS's threads beside them would take turns with the counting on the same cores and
    spin while waiting for the next product. Re-ranking's products are small (M x D):
    OpenBLAS's threads cost more than they give (6x slower on a busy machine,
    bench/rerank.py); its queries are spread over Python threads instead.
    """
    threads = _openblas_threads() if active else None
    if threads is None:
        yield
        return
    get, put = threads
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)


# ----------------------------------------------------------------------------------------
# Native code.

def c_compiler():
    """Path of the C compiler ($CC, else gcc, else cc) on $PATH, or None: the search's
    rank-count kernel (glam_tf.eval.rank_kernel) and serving_check/ are built with it."""
    for name in (os.environ.get("CC"), "gcc", "cc"):
        found = name and files.which(name)
        if found:
            return found
    return None


def cache_dir() -> str:
    """Where compiled libraries are kept: $GLAM_TF_CACHE, else $XDG_CACHE_HOME/glam_tf,
    else ~/.cache/glam_tf."""
    if os.environ.get("GLAM_TF_CACHE"):
        return os.environ["GLAM_TF_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or files.join(files.expanduser("~"), ".cache")
    return files.join(base, "glam_tf")


def build_shared_library(source: str, cflags, cc: str, name: str) -> str:
    """The shared library `<name>-<key>.so` built from `source` with `cc` and `cflags`.

    Built atomically (under a temporary name, then renamed) unless the cache (`cache_dir`;
    a private temporary folder when that is not writable) already holds it; the key is a
    hash of the source, the command and the machine type, so an edit or another machine
    type rebuilds.

    Raises:
        OSError: the compiler failed (its output in the message).
    """
    code = files.read_bytes(source)
    key = hashlib.sha256(b"\0".join([code, cc.encode(), " ".join(cflags).encode(),
                                     platform.machine().encode()])).hexdigest()[:16]
    folder = cache_dir()
    try:
        files.makedirs(folder)
        writable = files.local_writable(folder)
    except OSError:
        writable = False
    if not writable:
        folder = files.scratch_dir(f"glam_tf_{name}_")
    path = files.join(folder, f"{name}-{key}.so")
    if files.exists(path):
        return path
    tmp = files.temporary_path(path)
    t0 = time.time()
    done = subprocess.run([cc, *cflags, "-o", tmp, source], capture_output=True, text=True,
                          check=False)
    if done.returncode:
        if files.exists(tmp):
            files.remove(tmp)
        raise OSError(f"{cc} {' '.join(cflags)} {source} failed (exit {done.returncode}): "
                      f"{done.stderr.strip()[:500]}")
    files.rename(tmp, path)
    logging.info("compiled %s with %s in %.1f s: %s", files.basename(source), cc,
                 time.time() - t0, path)
    return path
