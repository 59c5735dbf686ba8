"""Shared timing of the benches that compare legs: warmed up, order-balanced, repeated.

A leg that always runs first pays the cold caches, lazy loads and graph tracing; one that
always runs second meets whatever load the first left. So every comparing bench times its
legs through `compare`: each leg is called `warmup` times untimed first (in rotated order),
then `rounds` timed rounds call every leg once, the order rotated each round (AB, BA, AB,
...), keeping wall and process CPU time of every call. `ratio` pairs the legs round by
round, so the spread of the per-round ratios shows how much the load moved them.
`header` is the line each bench prints first: CPU model, family/model, instruction-set
level (glam_tf.cpu), cores, load average and niceness; `python bench/harness.py` prints it.
"""

import dataclasses
import os
import statistics
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from glam_tf import cpu  # noqa: E402  pylint: disable=wrong-import-position


@dataclasses.dataclass
class Timings:
    """One leg's calls: `first` (the first warm-up call's wall s, None without warm-up),
    then wall and process CPU seconds of each timed round, in round order."""

    first: float = None
    wall: list = dataclasses.field(default_factory=list)
    cpu: list = dataclasses.field(default_factory=list)

    @property
    def best(self):
        return min(self.wall)

    @property
    def median(self):
        return statistics.median(self.wall)

    @property
    def cpu_median(self):
        return statistics.median(self.cpu)

    def summary(self):
        """JSON-ready: first call, median / best / worst wall s, median CPU s."""
        return {"first_s": None if self.first is None else round(self.first, 3),
                "median_s": round(self.median, 3), "best_s": round(self.best, 3),
                "worst_s": round(max(self.wall), 3), "cpu_median_s": round(self.cpu_median, 3),
                "wall_s": [round(x, 3) for x in self.wall]}


def leg_orders(names, rounds):
    """The order of the legs in each of `rounds` rounds: rotated by one leg per round, so
    over any len(names) consecutive rounds every leg runs in every position once."""
    names = list(names)
    return [names[r % len(names):] + names[:r % len(names)] for r in range(rounds)]


def _cpu_seconds():
    """CPU seconds of this process and of its children reaped so far (a leg that runs
    worker processes, e.g. Beam's multi-process DirectRunner, counts theirs too)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def timed(fn):
    """(wall s, CPU s of the process and the children it reaped, result) of one fn() call."""
    wall, used = time.perf_counter(), _cpu_seconds()
    out = fn()
    return time.perf_counter() - wall, _cpu_seconds() - used, out


def compare(legs, *, rounds, warmup=1, log=None):
    """Times the callables `legs` {name: fn}: `warmup` untimed calls of each, then `rounds`
    rounds of one call each, the order rotated per round (`leg_orders`).

    Returns:
        {name: Timings}, in the order of `legs`.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    out = {name: Timings() for name in legs}
    for w, order in enumerate(leg_orders(legs, warmup)):
        for name in order:
            if log:
                log(f"warm-up {w + 1}/{warmup}: {name}")
            wall, _, _ = timed(legs[name])
            if out[name].first is None:
                out[name].first = wall
    for r, order in enumerate(leg_orders(legs, rounds)):
        for name in order:
            if log:
                log(f"round {r + 1}/{rounds}: {name}")
            wall, used, _ = timed(legs[name])
            out[name].wall.append(wall)
            out[name].cpu.append(used)
    return out


@dataclasses.dataclass
class Ratio:
    """num / den of the median wall times (and CPU times), with the per-round spread."""

    value: float
    low: float
    high: float
    cpu: Optional[float]  # None: den's CPU time below the clock's resolution

    def __str__(self):
        cpu = "below the clock's resolution" if self.cpu is None else f"{self.cpu:.3f}x"
        return f"{self.value:.3f}x (per round {self.low:.3f}-{self.high:.3f}; CPU time {cpu})"

    def summary(self):
        return {"ratio": round(self.value, 3), "per_round_min": round(self.low, 3),
                "per_round_max": round(self.high, 3),
                "cpu_ratio": None if self.cpu is None else round(self.cpu, 3)}


def ratio(num, den):
    """`Ratio` of two legs' `Timings` (num's times over den's)."""
    per_round = [a / b for a, b in zip(num.wall, den.wall)]
    return Ratio(value=num.median / den.median, low=min(per_round), high=max(per_round),
                 cpu=num.cpu_median / den.cpu_median if den.cpu_median > 0 else None)


def machine():
    """JSON-ready description of this machine and its load now."""
    info = cpu.cpu_info()
    return {"cpu": info.model_name, "cpu_family": info.family, "cpu_model": info.model,
            "isa": info.isa_level, "native_bfloat16": info.native_bfloat16,
            "cores": os.cpu_count(), "load_average": [round(x, 2) for x in cpu.load_average()],
            "nice": os.nice(0)}


def header():
    """The line a comparing bench prints first: CPU, instruction-set level, cores, load."""
    m = machine()
    return (f"machine: {cpu.cpu_info().describe()}, {m['cores']} cores, load average "
            f"{' / '.join(f'{x:.2f}' for x in m['load_average'])} (1/5/15 min), nice {m['nice']}")


if __name__ == "__main__":
    print(header())  # `python bench/harness.py`: the machine line the benches print
