"""Build a pipeline from test stages: a few lines per test instead of the full daemon."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import anyio

from oms_pipeline import config, routing
from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.adapters.memory_timers import MemoryTimers
from oms_pipeline.clock import VirtualClock
from oms_pipeline.order import Address, Amounts, Line, Order
from oms_pipeline.pipeline import Pipeline
from oms_pipeline.ports import store as st
from oms_pipeline.stage import StageSpec


def make_order(i: int, kind: str = "tob", flags: str = "") -> Order:
    return Order(order_no=f"T{i:017d}", source="app", external_id=f"ext-{i}", kind=kind, member_id=f"m{i % 7}",
                 consignee=Address(name="Zhang San", phone="13812345678", province="Beijing", city="Beijing"),
                 lines=[Line(line_no=1, sku="SKU-1", qty=1, unit_price=1000)], amounts=Amounts(payable=1000),
                 flags=flags)


def table(stages: list[str], kinds=("tob",), **extra: Any) -> routing.RoutingTable:
    raw = {"stages": stages, "paths": {"all": {"kinds": list(kinds)}}, **extra}
    t = routing.parse(raw)
    routing.validate(t, stages, kinds)
    return t


def build(specs: list[StageSpec], *, store=None, clock=None, settings: dict | None = None,
          routes: routing.RoutingTable | None = None, flag_names=lambda flags: flags.split(",") if flags else (),
          kinds: tuple[str, ...] = ("tob",)):
    clock = clock or VirtualClock()
    by_name = {s.name: s for s in specs}
    merged = deep_merge({"stage_defaults": {"retry": {"jitter": 0.0}}}, settings or {})
    return Pipeline(config.from_mapping(merged), by_name, routes or table(list(by_name), kinds),
                    store or MemoryStore(), MemoryTimers(clock), LocalCoordination(clock), None, clock,
                    flag_names=flag_names, seed=1)


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


@asynccontextmanager
async def running(pipeline: Pipeline) -> AsyncIterator[anyio.abc.TaskGroup]:
    """The pipeline's workers and timers run inside the block and stop at its end."""
    async with anyio.create_task_group() as tg:
        await tg.start(pipeline.run)
        yield tg
        tg.cancel_scope.cancel()


ALL_STATES = (st.QUEUED, st.PARKED, st.WAIT_PAY, st.DONE, st.CANCELLED, st.MANUAL, st.SPLIT)


async def all_orders(store) -> dict[str, Any]:
    """Every stored order by number, read page by page through the store port."""
    rows = {}
    for state in ALL_STATES:
        after = ""
        while page := await store.in_state(state, 1000, after):
            rows.update((r.order_no, r) for r in page)
            after = page[-1].order_no
    return rows
