"""Capacity and pool sizes from a run's measured service times.

Little's law: a stage that takes orders at rate λ and holds each for S
seconds has λ·S of them in service on average, so it needs λ·S slots busy;
a pool of ⌈λ·S / u⌉ keeps each slot busy a share u of the time, which leaves
headroom for bursts and for the service time growing when the loop is busy.

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
            utilisation: float) -> dict[str, int]:
    """Pool sizes for the stages whose pool matters (io stages, cpu stages in process mode)."""
    out = {}
    for name, stage in stages.items():
        s = service_s.get(name)
        if s is None or (stage["kind"] == "cpu" and stage["mode"] == "inline"):
            continue  # an inline cpu stage runs on the loop thread: its pool size changes nothing
        out[name] = max(1, math.ceil(rate * s / utilisation))
    return out


def snippet(pools: dict[str, int], rate: float, utilisation: float, source: str) -> str:
    """The proposal in the format of config/oms.toml."""
    head = [f"# Pool sizes proposed by `oms bench` from {source}:",
            f"# Little's law, pool = ceil(arrival rate x mean service time / {utilisation:g}),",
            f"# for {rate:,.0f} orders/s."]
    body = [f"\n[stages.{name}]\npool = {pool}" for name, pool in pools.items()]
    return "\n".join(head + body) + "\n"
