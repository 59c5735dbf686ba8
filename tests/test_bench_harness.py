"""bench/harness.py: rotated leg order, warm-up before timing, per-round ratios; and
glam_tf.cpu's instruction-set level from fake /proc/cpuinfo flag sets."""

import pathlib
import subprocess
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))
import harness  # noqa: E402  pylint: disable=wrong-import-position

from glam_tf import cpu  # noqa: E402  pylint: disable=wrong-import-position

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 {flags}

processor\t: 1
model name\t: another block, ignored
flags\t\t: amx_tile amx_bf16
"""


def test_leg_orders_rotate_so_every_leg_runs_in_every_position():
    assert harness.leg_orders(["a", "b"], 4) == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    orders = harness.leg_orders(["a", "b", "c"], 3)
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    for position in range(3):
        assert sorted(o[position] for o in orders) == ["a", "b", "c"]


def test_compare_warms_up_then_alternates_and_pairs_rounds(monkeypatch):
    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(harness.time, "perf_counter", lambda: float(next(clock)))
    monkeypatch.setattr(harness.time, "process_time", lambda: 0.0)

    def leg(name):
        return lambda: calls.append(name)

    with pytest.raises(ValueError, match="rounds must be >= 1"):
        harness.compare({"a": leg("a")}, rounds=0)
    out = harness.compare({"a": leg("a"), "b": leg("b")}, rounds=3, warmup=1)
    # warm-up a, b untimed; then the rounds alternate which leg runs first
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert out["a"].first == 1.0 and out["b"].first == 1.0
    assert out["a"].wall == [1.0, 1.0, 1.0] and len(out["b"].wall) == 3


def test_ratio_is_of_medians_with_the_per_round_spread():
    num = harness.Timings(wall=[2.0, 3.0, 10.0], cpu=[4.0, 4.0, 4.0])
    den = harness.Timings(wall=[1.0, 2.0, 2.0], cpu=[2.0, 2.0, 2.0])
    r = harness.ratio(num, den)
    assert r.value == pytest.approx(1.5)
    assert (r.low, r.high, r.cpu) == (pytest.approx(1.5), pytest.approx(5.0), pytest.approx(2.0))
    assert str(r) == "1.500x (per round 1.500-5.000; CPU time 2.000x)"


def test_a_leg_too_fast_for_the_cpu_clock_has_no_cpu_ratio():
    # A tiny leg reads 0 s of CPU time (the clock's resolution): no division by zero.
    r = harness.ratio(harness.Timings(wall=[0.002], cpu=[0.01]),
                      harness.Timings(wall=[0.001], cpu=[0.0]))
    assert r.value == pytest.approx(2.0) and r.cpu is None
    assert r.summary()["cpu_ratio"] is None
    assert str(r) == "2.000x (per round 2.000-2.000; CPU time below the clock's resolution)"


@pytest.mark.parametrize("flags,level,native", [
    ("avx avx2 fma", "AVX2", False),
    ("avx2 avx512f avx512bw", "AVX-512", False),
    ("avx2 avx512f avx512_bf16", "AVX512-BF16", True),
    ("avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", "AMX", True),
    ("sse4_2", "below AVX2", False),
])
def test_isa_level_from_fake_flag_sets(flags, level, native):
    info = cpu.parse_cpuinfo(CPUINFO.format(flags=flags))
    assert (info.isa_level, info.native_bfloat16) == (level, native)
    assert info.describe() == f"AMD EPYC 9B14 (family 25 model 17), {level}"


def test_cpu_info_reads_the_file_and_degrades_without_one(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO.format(flags="avx2 avx512f"))
    assert cpu.cpu_info(str(path)).isa_level == "AVX-512"
    missing = cpu.cpu_info(str(tmp_path / "absent"))
    assert missing.isa_level == "unknown" and not missing.native_bfloat16


def test_header_names_cpu_isa_cores_and_load(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_info", lambda: cpu.parse_cpuinfo(CPUINFO.format(
        flags="avx2 avx512f avx512_bf16")))
    monkeypatch.setattr(cpu, "load_average", lambda: (1.5, 0.25, 3.0))
    line = harness.header()
    assert line.startswith("machine: AMD EPYC 9B14 (family 25 model 17), AVX512-BF16, ")
    assert "load average 1.50 / 0.25 / 3.00 (1/5/15 min)" in line


def test_timed_counts_the_cpu_of_reaped_worker_processes():
    # A leg whose work runs in child processes (Beam's multi-process workers) is charged
    # their CPU time, not only the parent's waiting.
    # The child burns 0.35 s: os.times() counts children in clock ticks (10 ms), so 0.3 s
    # burnt could read 0.29.
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.35: pass"
    wall, cpu, _ = harness.timed(
        lambda: subprocess.run([sys.executable, "-c", burn], check=True))
    assert cpu >= 0.3 and wall >= 0.3
