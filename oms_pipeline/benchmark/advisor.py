"""Capacity and pool sizes from a run's measured service times.

Little's law: a stage that takes orders at rate λ and holds each for S
seconds has a = λ·S of them in service on average, so it needs a slots busy.
The pool adds headroom, the larger of two: a / u keeps each slot busy a share
u of the time (what large pools need), and a + β·√a (square-root staffing)
covers the randomness of arrivals and waits, which small pools feel most: a
slot works its batch one call after another, so one slow call holds up the
rest. Measured (bench/RESULTS.md): with a / u alone, the small pools in front
of systems with exponential latencies fell behind, in one round of two, an
arrival rate they could take on average.

The capacity of the whole pipeline is that of its tightest resource: each
stage's pool (slots / S), and the event loop itself, which runs every inline
`cpu` stage one after another (1 / the sum of their S), as it does the
runtime's own hops.
"""
from __future__ import annotations

import math
from typing import Any


def capacity(stages: dict[str, dict[str, Any]], service_s: dict[str, float],
             process_workers: int = 2) -> dict[str, Any]:
    """Orders/s each resource can take, and the tightest one."""
    bounds: dict[str, float] = {}
    inline = process = 0.0
    for name, stage in stages.items():
        s = service_s.get(name)
        if not s:
            continue
        if stage["kind"] == "cpu" and stage["mode"] == "inline":
            inline += s
        elif stage["kind"] == "cpu":
            process += s
            bounds[f"stage {name}"] = stage["slots"] / s
        else:
            bounds[f"stage {name}"] = stage["slots"] / s
    if inline:
        bounds["event loop (inline cpu stages)"] = 1 / inline
    if process:
        bounds["process pool (cpu stages)"] = process_workers / process
    if not bounds:
        return {"orders_per_s": math.nan, "tightest": "", "bounds": {}}
    tightest = min(bounds, key=bounds.__getitem__)
    stage_only = {k: v for k, v in bounds.items() if k.startswith("stage ")}
    return {"orders_per_s": round(bounds[tightest], 1), "tightest": tightest,
            "tightest_stage": min(stage_only, key=stage_only.__getitem__) if stage_only else "",
            "tightest_stage_orders_per_s": round(min(stage_only.values()), 1) if stage_only else math.nan,
            "bounds": {k: round(v, 1) for k, v in sorted(bounds.items(), key=lambda kv: kv[1])}}


def propose(stages: dict[str, dict[str, Any]], service_s: dict[str, float], rate: float,
            utilisation: float, headroom: float = 2.0) -> dict[str, int]:
    """Pool sizes for the stages whose pool matters (io stages, cpu stages in process mode)."""
    out = {}
    for name, stage in stages.items():
        s = service_s.get(name)
        if s is None or (stage["kind"] == "cpu" and stage["mode"] == "inline"):
            continue  # an inline cpu stage runs on the loop thread: its pool size changes nothing
        out[name] = pool_for(rate * s, utilisation, headroom)
    return out


def pool_for(busy: float, utilisation: float, headroom: float) -> int:
    """Slots for `busy` slots in use on average (λ·S): see the module's docstring."""
    return max(1, math.ceil(max(busy / utilisation, busy + headroom * math.sqrt(busy)) - 1e-9))


def snippet(pools: dict[str, int], rate: float, utilisation: float, source: str, headroom: float = 2.0) -> str:
    """The proposal in the format of config/oms.toml."""
    head = [f"# Pool sizes proposed by `oms bench` from {source}:",
            "# Little's law, a = arrival rate x mean service time slots busy on average;",
            f"# pool = ceil(max(a / {utilisation:g}, a + {headroom:g} x sqrt(a))), for {rate:,.0f} orders/s."]
    body = [f"\n[stages.{name}]\npool = {pool}" for name, pool in pools.items()]
    return "\n".join(head + body) + "\n"
