"""Stage `flow_limit`: per-warehouse daily capacity, parking until the next local day."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from oms_pipeline import flags
from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.adapters.simulated import EffectLog, SimSettings, build_simulated_ports
from oms_pipeline.clock import VirtualClock
from oms_pipeline.generator import generate, to_order
from oms_pipeline.order import Address, Amounts, Line, Order, decode, encode
from oms_pipeline.stage import StageContext
from stages.flow_limit import SPEC, handle, window

CST = timezone(timedelta(hours=8))
MORNING = datetime(2023, 11, 15, 10, 0, tzinfo=CST).timestamp()
MIDNIGHT = datetime(2023, 11, 16, 0, 0, tzinfo=CST).timestamp()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Env:
    def __init__(self, ctx: StageContext, clock: VirtualClock, coordination: LocalCoordination) -> None:
        self.ctx, self.clock, self.coordination = ctx, clock, coordination

    async def count(self, warehouse: str, day: str) -> int:
        return await self.coordination.count(f"flow:{warehouse}:{day}")


async def make(settings: dict[str, Any] | None = None, start: float = MORNING) -> Env:
    clock, log = VirtualClock(start), EffectLog()
    await log.open()
    ports = build_simulated_ports(SimSettings.from_mapping({}), clock, log)
    coordination = LocalCoordination(clock)
    ctx = StageContext("flow_limit", {**SPEC.defaults, **(settings or {})}, ports, coordination, clock)
    return Env(ctx, clock, coordination)


def line(sku: str, warehouse: str = "WH-BJ", **kw: Any) -> dict[str, Any]:
    return {"sku": sku, "qty": 1, "unit_price": 1000, "warehouse": warehouse, **kw}


def order(no: str, *lines: dict[str, Any]) -> Order:
    o = Order(order_no=no, source="app", external_id=f"ext-{no}", kind="toc", member_id="M1",
              consignee=Address(name="张三", phone="13812345678", province="北京市", city="北京市"),
              lines=[Line(line_no=i, **raw) for i, raw in enumerate(lines or [line("A")], start=1)],
              amounts=Amounts(payable=1000, paid=1000))
    o.flags = flags.derive(o)
    return o


def test_the_window_is_the_local_day() -> None:
    assert window(MORNING, 8) == ("20231115", MIDNIGHT)
    assert window(MIDNIGHT - 1, 8) == ("20231115", MIDNIGHT)
    assert window(MIDNIGHT, 8) == ("20231116", MIDNIGHT + 86400)
    # 10:00 in UTC+8 is 02:00 UTC: the same calendar day, ending at UTC midnight instead.
    utc_midnight = datetime(2023, 11, 16, tzinfo=timezone.utc).timestamp()
    assert window(MORNING, 0) == ("20231115", utc_midnight)
    # 07:00 UTC+8 is still the previous day in UTC.
    assert window(datetime(2023, 11, 15, 7, tzinfo=CST).timestamp(), 0)[0] == "20231114"


@pytest.mark.anyio
async def test_full_warehouse_parks_until_local_midnight_then_goes_on() -> None:
    env = await make({"capacity": {"WH-BJ": 2}})
    assert (await handle(order("O1"), env.ctx)).kind == "next"
    assert (await handle(order("O2"), env.ctx)).kind == "next"
    third = order("O3")
    outcome = await handle(third, env.ctx)
    assert outcome.kind == "park" and outcome.until == MIDNIGHT
    assert "WH-BJ" in outcome.reason and "20231115" in outcome.reason
    assert await env.count("WH-BJ", "20231115") == 2  # the parked order holds no slot
    env.clock.advance(60)  # still today: still full
    assert (await handle(third, env.ctx)).until == MIDNIGHT
    env.clock.set(outcome.until)  # the timer fires at the next window
    assert (await handle(third, env.ctx)).kind == "next"
    assert await env.count("WH-BJ", "20231116") == 1
    assert third.results["flow_limit"] == {"day": "20231116", "counted": ["WH-BJ"]}


@pytest.mark.anyio
async def test_a_stage_run_twice_takes_capacity_once() -> None:
    env = await make()
    o = order("O1", line("A"), line("B", "WH-SH"))
    assert (await handle(o, env.ctx)).kind == "next"
    assert (await handle(o, env.ctx)).kind == "next"
    assert await env.count("WH-BJ", "20231115") == 1
    assert await env.count("WH-SH", "20231115") == 1


@pytest.mark.anyio
async def test_a_replay_holding_an_earlier_days_count_does_not_take_again() -> None:
    env = await make()
    o = order("O1")
    await handle(o, env.ctx)
    env.clock.set(MIDNIGHT + 10)
    assert (await handle(decode(encode(o)), env.ctx)).kind == "next"
    assert await env.count("WH-BJ", "20231116") == 0


@pytest.mark.anyio
async def test_multi_warehouse_order_gives_back_what_it_took_when_one_is_full() -> None:
    env = await make({"capacity": {"WH-SH": 1}})
    assert (await handle(order("O1", line("X", "WH-SH")), env.ctx)).kind == "next"
    both = order("O2", line("A", "WH-BJ"), line("B", "WH-SH"))
    outcome = await handle(both, env.ctx)
    assert outcome.kind == "park" and outcome.until == MIDNIGHT and "WH-SH" in outcome.reason
    assert await env.count("WH-BJ", "20231115") == 0  # released
    assert await env.count("WH-SH", "20231115") == 1
    assert both.results["flow_limit"] == {"day": "20231115", "counted": []}
    env.clock.set(outcome.until)
    assert (await handle(both, env.ctx)).kind == "next"
    assert await env.count("WH-BJ", "20231116") == 1 and await env.count("WH-SH", "20231116") == 1


@pytest.mark.anyio
async def test_a_retry_keeps_the_slots_it_already_holds_today() -> None:
    env = await make({"capacity": {"WH-SH": 1}})
    o = order("O1", line("A", "WH-BJ"), line("B", "WH-SH"))
    o.results["flow_limit"] = {"day": "20231115", "counted": ["WH-BJ"]}  # taken before a failure
    await env.coordination.take_capacity("flow:WH-BJ:20231115", "O1", 100000, 86400)
    assert (await handle(o, env.ctx)).kind == "next"
    assert await env.count("WH-BJ", "20231115") == 1 and await env.count("WH-SH", "20231115") == 1


@pytest.mark.anyio
async def test_unlisted_warehouses_use_the_default_capacity() -> None:
    env = await make({"capacity": {"WH-BJ": 5}, "default_capacity": 1})
    assert (await handle(order("O1", line("A", "WH-GZ")), env.ctx)).kind == "next"
    assert (await handle(order("O2", line("A", "WH-GZ")), env.ctx)).kind == "park"
    assert (await handle(order("O3", line("A", "WH-BJ")), env.ctx)).kind == "next"


@pytest.mark.anyio
async def test_the_day_follows_the_configured_offset() -> None:
    env = await make({"default_capacity": 1, "tz_offset_hours": 0})
    assert (await handle(order("O1"), env.ctx)).kind == "next"
    outcome = await handle(order("O2"), env.ctx)
    assert outcome.until == datetime(2023, 11, 16, tzinfo=timezone.utc).timestamp()
    assert "UTC+0" in outcome.reason


@pytest.mark.anyio
async def test_the_counter_expires_after_its_ttl() -> None:
    env = await make({"default_capacity": 1})
    await handle(order("O1"), env.ctx)
    env.clock.advance(SPEC.defaults["counter_ttl_seconds"])
    assert await env.count("WH-BJ", "20231115") == 0


@pytest.mark.anyio
@pytest.mark.parametrize("o", [
    order("V1", line("GC", warehouse="", virtual=True)),
    order("D1", line("S", warehouse="", supplier="SUP-01")),
])
async def test_no_own_warehouse_is_skipped_without_counting(o: Order) -> None:
    env = await make({"default_capacity": 0})
    outcome = await handle(o, env.ctx)
    assert outcome.kind == "skip" and outcome.reason
    assert "flow_limit" not in o.results


@pytest.mark.anyio
async def test_generated_orders_never_exceed_any_warehouse_capacity() -> None:
    env = await make({"default_capacity": 20})
    parked = 0
    for i, request in enumerate(generate(300, seed=5)):
        o = to_order(request, f"G{i:05d}", 0.0)
        outcome = await handle(o, env.ctx)
        parked += outcome.kind == "park"
        if outcome.kind == "park":
            assert outcome.until == MIDNIGHT and o.results["flow_limit"]["counted"] == []
    for warehouse in ("WH-BJ", "WH-SH", "WH-GZ", "WH-CD"):
        assert await env.count(warehouse, "20231115") <= 20
    assert parked > 0
