"""What a `cpu` stage costs inline versus on the process pool, per order.

    .venv/bin/python bench/cpu_hop.py --orders 20000

Runs the four real `cpu` stages (risk_check, allocate, split, effective_time)
on generated orders through the runtime, once with every one inline on the
event loop and once with every one in process mode (forkserver pool of 2),
with the in-memory store and no checkpoints, and prints the time per order.
This is the measurement behind `mode = "inline"` as the default.
"""
from __future__ import annotations

import argparse
import time

import anyio

from oms_pipeline.daemon import tune_gc
from oms_pipeline import config, flags, routing
from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.adapters.memory_timers import MemoryTimers
from oms_pipeline.clock import SystemClock
from oms_pipeline.generator import generate, to_order
from oms_pipeline.order import KINDS
from oms_pipeline.pipeline import Pipeline
from stages import load_specs

CPU_STAGES = ("risk_check", "allocate", "split", "effective_time")
PLAIN = {"kind": "tob", "source": "sales_plan", "payment_method": "none", "remark": "",
         "delivery_promise": "standard", "presale": False}


async def run(n: int, mode: str) -> float:
    specs = {name: spec for name, spec in load_specs().items() if name in CPU_STAGES}
    table = routing.parse({"stages": list(CPU_STAGES), "paths": {"all": {"kinds": list(KINDS)}}})
    settings = config.from_mapping({"stage_defaults": {"cpu": {"mode": mode, "pool": 2, "batch": 256}}})
    clock = SystemClock()
    p = Pipeline(settings, specs, table, MemoryStore(checkpoints=False), MemoryTimers(clock),
                 LocalCoordination(clock), None, clock, flag_names=flags.names)
    orders = [to_order({**r, **PLAIN}, f"{i:018d}", clock.now()) for i, r in enumerate(generate(n, 5))]
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(p.run)
            started = time.perf_counter()
            for i in range(0, n, 500):
                await p.submit_many(orders[i:i + 500])
            await p.wait_until(lambda: not p.in_flight)
            elapsed = time.perf_counter() - started
            tg.cancel_scope.cancel()
    finally:
        p.stop()
    return elapsed


async def main(n: int) -> None:
    for mode in ("inline", "process"):
        elapsed = await run(n, mode)
        print(f"mode={mode:<7} orders={n} elapsed={elapsed:.2f}s per_order_all_4_stages={elapsed / n * 1e6:.0f}us "
              f"rate={n / elapsed:,.0f} orders/s")


if __name__ == "__main__":
    tune_gc()  # as the daemon does
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=20_000)
    anyio.run(main, ap.parse_args().orders, backend_options={"use_uvloop": True})
