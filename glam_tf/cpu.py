"""This CPU: model, instruction-set level and native bfloat16, read from /proc/cpuinfo.

One place for what the benches print in their header and what an export logs before
choosing a precision: a bfloat16 export is fast only where the CPU computes bfloat16
natively (AVX512_BF16 or AMX); elsewhere TensorFlow emulates it in float32.
"""

import dataclasses
import os
import platform

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
