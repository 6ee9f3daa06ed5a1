"""The open-loop load generator.

Arrival times are drawn up front from a seeded Poisson process (or are all
zero: a burst), so the load does not depend on how fast the system answers.
The driver hands every order that is due to the system's intake in batches;
when intake makes it wait (backpressure), later orders go in late, and their
latency still counts from their scheduled arrival: a slow system cannot hide
its queueing by slowing the generator down (coordinated omission).
"""
from __future__ import annotations

import bisect
import random
import time
from typing import Awaitable, Callable

import anyio


def arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each of n orders arrives."""
    if rate <= 0:
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


class Driver:
    """Feeds `submit(first, end, scheduled_at)` with the orders due, `batch` at a time.

    `scheduled_at[i]` is the perf_counter time order i was due; `sent` counts
    the orders handed over so far (the progress bar reads it)."""

    def __init__(self, offsets: list[float], batch: int) -> None:
        self.offsets = offsets
        self.batch = batch
        self.sent = 0
        self.started = 0.0
        self.scheduled_at: list[float] = []

    async def run(self, submit: Callable[[int, int], Awaitable[None]]) -> None:
        self.started = time.perf_counter()
        self.scheduled_at = [self.started + o for o in self.offsets]
        n, i = len(self.offsets), 0
        while i < n:
            now = time.perf_counter() - self.started
            due = bisect.bisect_right(self.offsets, now, lo=i)
            if due == i:
                await anyio.sleep(self.offsets[i] - now)
                continue
            end = min(due, i + self.batch)
            await submit(i, end)
            self.sent = i = end
            await anyio.sleep(0)  # a burst would otherwise keep the loop until intake is full
