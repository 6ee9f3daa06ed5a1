"""Generated stages with a latency profile, for the pool-strategy comparisons.

`io` stages wait (an asyncio sleep standing in for a downstream call) and
`cpu` stages do pure-Python arithmetic calibrated on this machine to take the
profile's milliseconds. The same handlers run under every strategy, so the
strategies differ only in how they schedule the work. Stages alternate io,
cpu, io, ... and are named io01, cpu02, io03, ...
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

from .. import routing
from ..order import Address, Amounts, Line, Order
from ..outcome import NEXT
from ..stage import StageSpec
from .scenario import Workload


@dataclass(frozen=True)
class Profile:
    name: str
    kind: str  # io | cpu
    wait_ms: float
    cpu_ms: float


def profiles(workload: Workload) -> list[Profile]:
    out = []
    for i in range(workload.stages):
        kind = "io" if i % 2 == 0 else "cpu"
        name = f"{kind}{i + 1:02d}"
        own = workload.stage.get(name)
        if own is not None and own.kind is not None:
            kind = own.kind
        wait = own.wait_ms if own is not None and own.wait_ms is not None else workload.io_wait_ms
        cpu = own.cpu_ms if own is not None and own.cpu_ms is not None else workload.cpu_ms
        out.append(Profile(name, kind, wait if kind == "io" else 0.0, cpu if kind == "cpu" else 0.0))
    unknown = set(workload.stage) - {p.name for p in out}
    if unknown:
        raise ValueError(f"workload.stage.{sorted(unknown)[0]}: no generated stage of that name")
    return out


def noop_profiles(n: int) -> list[Profile]:
    """n stages that do nothing at all: the runtime's own cost."""
    return [Profile(f"{'io' if i % 2 == 0 else 'cpu'}{i + 1:02d}", "io" if i % 2 == 0 else "cpu", 0.0, 0.0)
            for i in range(n)]


# -- the work -----------------------------------------------------------------

def spin(iterations: int) -> int:
    """Pure-Python CPU work that holds the GIL, as a stage's business logic does."""
    x = 0
    for i in range(iterations):
        x ^= i
    return x


_per_ms: float | None = None


def iterations_per_ms() -> float:
    """How many `spin` iterations take a millisecond of CPU here (the best of a few tries).
    CPU time of this thread, not wall time: on a shared machine a try that loses the core
    for a while must not make every later "0.5 ms" shorter."""
    global _per_ms
    if _per_ms is None:
        n, best = 200_000, float("inf")
        for _ in range(5):
            t = time.thread_time()
            spin(n)
            best = min(best, time.thread_time() - t)
        _per_ms = n / (best * 1000)
    return _per_ms


async def io_stage(order: Order, ctx: Any) -> Any:
    s = ctx.settings
    if s["wait_s"] > 0:
        await asyncio.sleep(_draw(s))
    return NEXT


def _draw(s: dict[str, Any]) -> float:
    mean, dist = s["wait_s"], s["dist"]
    if dist == "uniform":
        return mean * (0.5 + s["rng"].random())
    if dist == "exponential":
        return s["rng"].expovariate(1 / mean)
    return mean


def cpu_stage(order: Order, ctx: Any) -> Any:
    iterations = ctx.settings["iterations"]
    if iterations:
        spin(iterations)
    return NEXT


def stage_settings(profile: Profile, dist: str, seed: int, index: int) -> dict[str, Any]:
    """The handler's settings: io stages carry their own seeded RNG (never pickled: io stages
    stay on the loop); cpu stages only a number (they may cross to a worker process)."""
    if profile.kind == "io":
        return {"wait_s": profile.wait_ms / 1000, "dist": dist, "rng": random.Random(seed * 1000 + index)}
    return {"iterations": round(profile.cpu_ms * iterations_per_ms()) if profile.cpu_ms else 0}


def specs(stages: list[Profile], dist: str, seed: int) -> dict[str, StageSpec]:
    return {p.name: StageSpec(p.name, p.kind, io_stage if p.kind == "io" else cpu_stage,
                              defaults=stage_settings(p, dist, seed, i))
            for i, p in enumerate(stages)}


def table(names: list[str]) -> routing.RoutingTable:
    t = routing.parse({"stages": list(names), "paths": {"all": {"kinds": ["tob"]}}})
    routing.validate(t, names, ["tob"])
    return t


def make_order(i: int) -> Order:
    """A small order: the generated stages never read it, so its size is the runtime's cost only."""
    return Order(order_no=f"{i:018d}", source="bench", external_id=str(i), kind="tob", member_id="m",
                 consignee=Address(name="n", phone="p", province="pr", city="c"),
                 lines=[Line(line_no=1, sku="SKU-1", qty=1, unit_price=100)], amounts=Amounts(payable=100))
