"""Stage 13 `flow_limit` (seed 001 订单下发库房流量限制): per-warehouse daily dispatch capacity.

Each warehouse sends at most `capacity[warehouse]` (else `default_capacity`)
orders a day to WMS. The day is the local calendar day at `tz_offset_hours`,
and the count is a shared counter (`flow:{warehouse}:{YYYYMMDD}`) through the
coordination port, so every daemon instance counts against the same limit.
When a warehouse is full the order parks until the next local midnight.

An order counts once per warehouse and day: what it took is remembered in
results["flow_limit"] ({"day", "counted"}) as it goes, so a retry or replay
that still holds those results does not take again. An order spanning several
warehouses needs a slot in each; if one is full it gives back the slots it
holds for the day and parks, so a waiting order blocks nobody else's capacity.
Virtual and drop-shipped lines leave from no warehouse of ours: not counted.
"""
from __future__ import annotations

import functools
import time
from typing import Any

from oms_pipeline.order import Order
from oms_pipeline.outcome import NEXT, Outcome, park, skip
from oms_pipeline.stage import StageContext, StageSpec

from .waybill import no_shipment_reason, own_lines, require_warehouses

DAY = 86400
DEFAULTS: dict[str, Any] = {
    "capacity": {},  # warehouse -> orders per day
    "default_capacity": 100000,
    "tz_offset_hours": 8,  # the warehouses' local day (UTC+8)
    "counter_ttl_seconds": 2 * DAY,  # a day's counter outlives its window, then expires
}


def _setting(ctx: StageContext, name: str) -> Any:
    return ctx.settings.get(name, DEFAULTS[name])


def window(now: float, offset_hours: float) -> tuple[str, float]:
    """The local day at `now` as YYYYMMDD, and when the next one starts (epoch seconds)."""
    offset = offset_hours * 3600
    local = now + offset
    start = local - local % DAY
    return _day(start), start + DAY - offset


@functools.lru_cache(maxsize=64)
def _day(start: float) -> str:
    # One formatting per day (and offset), not per order.
    return time.strftime("%Y%m%d", time.gmtime(start))


def _counter(warehouse: str, day: str) -> str:
    return f"flow:{warehouse}:{day}"


def _capacity(ctx: StageContext, warehouse: str) -> int:
    return int(_setting(ctx, "capacity").get(warehouse, _setting(ctx, "default_capacity")))


async def _give_back(ctx: StageContext, order: Order, state: dict[str, Any]) -> None:
    day, counted = state["day"], state["counted"]
    while counted:
        await ctx.coordination.release_capacity(_counter(counted[-1], day), order.order_no)
        counted.pop()


async def handle(order: Order, ctx: StageContext) -> Outcome:
    lines = own_lines(order)
    if not lines:
        return skip(no_shipment_reason(order))
    require_warehouses(ctx.stage, order, lines)
    needed = sorted({line.warehouse for line in lines})
    previous = order.results.get("flow_limit") or {}
    if set(needed) <= set(previous.get("counted", ())):
        return NEXT  # counted already (a replay): never take twice for one order
    offset = float(_setting(ctx, "tz_offset_hours"))
    day, next_window = window(ctx.now(), offset)
    held = list(previous.get("counted", ())) if previous.get("day") == day else []
    state = order.results["flow_limit"] = {"day": day, "counted": held}
    ttl = float(_setting(ctx, "counter_ttl_seconds"))
    for warehouse in needed:
        if warehouse in state["counted"]:
            continue
        limit = _capacity(ctx, warehouse)
        # Counted per order number: a replay after a crash never takes a second slot.
        if not await ctx.coordination.take_capacity(_counter(warehouse, day), order.order_no, limit, ttl):
            await _give_back(ctx, order, state)
            return park(next_window, f"flow_limit: warehouse {warehouse} is full for {day} "
                                     f"({limit} orders/day, UTC{offset:+g}); waiting for the next day")
        state["counted"].append(warehouse)
    return NEXT


SPEC = StageSpec(
    "flow_limit", "io", handle,
    description="per-warehouse daily dispatch capacity (shared counter); "
                "when a warehouse is full, park until its next local day",
    defaults=DEFAULTS,
)
