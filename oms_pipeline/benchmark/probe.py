"""What a run measures: each order's end-to-end latency, and samples over time
(orders finished, per-stage queue depth and utilisation, RSS, CPU)."""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from typing import Any, Callable, Hashable

import anyio

DONE = "@done"
TICKS = os.sysconf("SC_CLK_TCK")


class Recorder:
    """Latency from each order's scheduled arrival to its end, for the orders of this run only
    (split children and anything else the system ends are not arrivals, so they are ignored)."""

    def __init__(self) -> None:
        self.arrival: dict[Hashable, float] = {}
        self.latencies: list[float] = []
        self.ends: Counter[str] = Counter()
        self.finished = 0
        self.last_end = time.perf_counter()

    def arrive(self, key: Hashable, at: float) -> None:
        self.arrival[key] = at

    def end(self, key: Hashable, end: str) -> None:
        at = self.arrival.pop(key, None)
        if at is None:
            return
        now = time.perf_counter()
        self.ends[end] += 1
        self.finished += 1
        self.last_end = now
        if end == DONE:
            self.latencies.append(now - at)


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50 / p95 / p99 / mean / max in milliseconds (nearest rank)."""
    if not seconds:
        return {"p50": math.nan, "p95": math.nan, "p99": math.nan, "mean": math.nan, "max": math.nan}
    ordered = sorted(seconds)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1000

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99),
            "mean": sum(ordered) / len(ordered) * 1000, "max": ordered[-1] * 1000}


def rss_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and every descendant alive now (forkserver workers,
    a peer's worker processes)."""
    total = 0.0
    for p in [pid, *descendants(pid)]:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICKS
        except (OSError, IndexError, ValueError):
            continue  # it ended meanwhile
    return total


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(k) for k in f.read().split()]
        except OSError:
            kids = []
        out.extend(kids)
        todo.extend(kids)
    return out


def tree_rss_mb(pid: int) -> float:
    return sum(rss_mb(p) for p in [pid, *descendants(pid)])


# A stage view: name -> (queue depth, seconds its slots have been busy so far, slots). Busy time,
# not busy slots: a sample taken on the loop never sees an inline cpu stage at work.
StageView = Callable[[], dict[str, tuple[int, float, int]]]


class Sampler:
    """Samples every `interval` seconds until cancelled; `series` holds the time series."""

    def __init__(self, interval: float, finished: Callable[[], int], stages: StageView,
                 pid: int | None = None) -> None:
        self.interval = interval
        self.finished = finished
        self.stages = stages
        self.pid = pid or os.getpid()
        self.series: dict[str, Any] = {"t": [], "finished": [], "rss_mb": [], "cpu_s": [], "stages": {}}
        self._busy: dict[str, tuple[float, float]] = {}  # stage -> (time, busy seconds) at the last sample
        self.started = time.perf_counter()
        self._cpu0 = cpu_seconds(self.pid)

    async def run(self) -> None:
        self.started = time.perf_counter()
        self._cpu0 = cpu_seconds(self.pid)
        while True:
            self.sample()
            await anyio.sleep(self.interval)

    def sample(self) -> None:
        s = self.series
        now = time.perf_counter()
        s["t"].append(round(now - self.started, 4))
        s["finished"].append(self.finished())
        s["rss_mb"].append(round(tree_rss_mb(self.pid), 1))
        s["cpu_s"].append(round(cpu_seconds(self.pid) - self._cpu0, 3))
        for name, (depth, busy, slots) in self.stages().items():
            row = s["stages"].setdefault(name, {"depth": [], "util": [], "busy_s": 0.0, "slots": slots})
            row["depth"].append(depth)
            then, busy_then = self._busy.get(name, (self.started, 0.0))
            self._busy[name] = (now, busy)
            span = (now - then) * slots
            row["util"].append(round(min(1.0, (busy - busy_then) / span), 3) if span > 0 else 0.0)
            row["busy_s"], row["slots"] = round(busy, 4), slots

    def summary(self) -> dict[str, Any]:
        """Peak RSS, CPU used and cores busy on average, per-stage means and peaks."""
        s = self.series
        wall = s["t"][-1] if s["t"] else 0.0
        cpu = s["cpu_s"][-1] if s["cpu_s"] else 0.0
        stages = {name: {"depth_mean": mean(row["depth"]), "depth_max": max(row["depth"], default=0),
                         "util_mean": round(min(1.0, row["busy_s"] / (wall * row["slots"])), 3)
                         if wall and row["slots"] else 0.0}
                  for name, row in s["stages"].items()}
        return {"rss_peak_mb": max(s["rss_mb"], default=0.0), "cpu_seconds": cpu,
                "cpu_cores": round(cpu / wall, 2) if wall else 0.0, "stages": stages}


def mean(values: list[float], digits: int = 3) -> float:
    return round(sum(values) / len(values), digits) if values else 0.0
