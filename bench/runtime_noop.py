"""Bare-runtime throughput: N orders through 16 no-op stages, in memory.

    .venv/bin/python bench/runtime_noop.py --orders 200000

Half the stages are `io` (async handlers, pool 32), half `cpu` inline, as in
the real table. The store is the in-memory one (no checkpoints), so this
measures the runtime itself: queues, batching, routing, metrics.
"""
from __future__ import annotations

import argparse
import resource
import time

import anyio

from oms_pipeline.daemon import tune_gc
from oms_pipeline import config, routing
from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.adapters.memory_timers import MemoryTimers
from oms_pipeline.clock import SystemClock
from oms_pipeline.order import Address, Amounts, Line, Order
from oms_pipeline.outcome import NEXT
from oms_pipeline.pipeline import Pipeline
from oms_pipeline.stage import StageSpec

N_STAGES = 16


async def io_noop(order, ctx):
    return NEXT


def cpu_noop(order, ctx):
    return NEXT


def specs() -> dict[str, StageSpec]:
    return {f"s{i:02d}": StageSpec(f"s{i:02d}", "io" if i % 2 else "cpu", io_noop if i % 2 else cpu_noop)
            for i in range(N_STAGES)}


def table(names) -> routing.RoutingTable:
    raw = {"stages": list(names), "paths": {"all": {"kinds": ["tob"]}}}
    t = routing.parse(raw)
    routing.validate(t, names, ["tob"])
    return t


def make_order(i: int) -> Order:
    return Order(order_no=f"{i:018d}", source="sales_plan", external_id=str(i), kind="tob", member_id="m",
                 consignee=Address(name="n", phone="p", province="pr", city="c"),
                 lines=[Line(line_no=1, sku="SKU-1", qty=1, unit_price=100)], amounts=Amounts(payable=100))


async def main(n: int, batch: int) -> None:
    settings = config.from_mapping({"stage_defaults": {"io": {"pool": 32, "batch": batch, "queue": 2000},
                                                       "cpu": {"pool": 1, "batch": batch, "queue": 2000}}})
    clock = SystemClock()
    names = list(specs())
    p = Pipeline(settings, specs(), table(names), MemoryStore(checkpoints=False), MemoryTimers(clock),
                 LocalCoordination(clock), None, clock)
    orders = [make_order(i) for i in range(n)]
    async with anyio.create_task_group() as tg:
        await tg.start(p.run)
        t0 = time.perf_counter()
        for i in range(0, n, 500):  # intake delivers batches, as a broker consumer with prefetch does
            await p.submit_many(orders[i:i + 500])
        await p.wait_until(lambda: p.total_finished() >= n)
        elapsed = time.perf_counter() - t0
        tg.cancel_scope.cancel()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"orders={n} stages={N_STAGES} elapsed={elapsed:.2f}s rate={n / elapsed:,.0f} orders/s "
          f"max_rss={rss:.0f}MB finished={p.finished}")


if __name__ == "__main__":
    tune_gc()  # as the daemon does
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args()
    anyio.run(main, args.orders, args.batch, backend_options={"use_uvloop": True})
