"""Stage `waybill`: one TMS waybill per (warehouse, zone) shipment, exactly once."""
from __future__ import annotations

from typing import Any

import pytest

from oms_pipeline import flags
from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.adapters.simulated import EffectLog, SimSettings, build_simulated_ports
from oms_pipeline.clock import VirtualClock
from oms_pipeline.generator import generate, to_order
from oms_pipeline.order import Address, Amounts, Line, Order, decode, encode
from oms_pipeline.outcome import PermanentError, TransientError
from oms_pipeline.stage import StageContext
from stages.waybill import SPEC, handle, own_lines


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def make(table: dict[str, Any] | None = None, log: EffectLog | None = None) -> tuple[StageContext, EffectLog]:
    clock, log = VirtualClock(), log or EffectLog()
    await log.open()
    ports = build_simulated_ports(SimSettings.from_mapping(table or {}), clock, log)
    return StageContext("waybill", dict(SPEC.defaults), ports, LocalCoordination(clock), clock), log


def line(sku: str, warehouse: str = "WH-BJ", zone: str = "ambient", **kw: Any) -> dict[str, Any]:
    return {"sku": sku, "qty": 1, "unit_price": 1000, "warehouse": warehouse, "zone": zone, **kw}


def order(*lines: dict[str, Any], no: str = "O1", pickup: str | None = None) -> Order:
    o = Order(order_no=no, source="app", external_id=f"ext-{no}", kind="toc", member_id="M1",
              consignee=Address(name="张三", phone="13812345678", province="北京市", city="北京市",
                                detail="人民路1号", pickup_point=pickup),
              lines=[Line(line_no=i, **raw) for i, raw in enumerate(lines, start=1)],
              amounts=Amounts(payable=1000 * len(lines), paid=1000 * len(lines)))
    o.flags = flags.derive(o)
    return o


@pytest.mark.anyio
async def test_one_waybill_per_warehouse_and_zone_group() -> None:
    ctx, log = await make()
    o = order(line("A"), line("B"), line("C", zone="frozen_low"), line("D", warehouse="WH-SH"))
    outcome = await handle(o, ctx)
    assert outcome.kind == "next"
    assert set(o.results["waybill"]) == {"WH-BJ/ambient", "WH-BJ/frozen_low", "WH-SH/ambient"}
    assert len(set(o.results["waybill"].values())) == 3
    keys = {e.key: e.payload for e in log.applied("tms")}
    assert keys["O1:waybill:WH-SH/ambient"] == {"order_no": "O1", "warehouse": "WH-SH", "zone": "ambient"}
    assert set(keys) == {f"O1:waybill:{g}" for g in o.results["waybill"]}


@pytest.mark.anyio
async def test_drop_ship_and_virtual_lines_get_no_waybill() -> None:
    ctx, log = await make()
    o = order(line("A"), line("S", warehouse="", supplier="SUP-01"), line("GC", warehouse="", virtual=True))
    assert (await handle(o, ctx)).kind == "next"
    assert list(o.results["waybill"]) == ["WH-BJ/ambient"]
    assert log.count("tms") == 1


@pytest.mark.anyio
async def test_drop_ship_only_order_is_skipped() -> None:
    ctx, log = await make()
    o = order(line("S", warehouse="", supplier="SUP-01"), line("T", warehouse="", supplier="SUP-02"))
    outcome = await handle(o, ctx)
    assert outcome.kind == "skip" and "supplier ships" in outcome.reason
    assert log.count("tms") == 0 and "waybill" not in o.results


@pytest.mark.anyio
async def test_virtual_order_is_skipped() -> None:
    ctx, log = await make()
    o = order(line("GC-0100", warehouse="", virtual=True))
    assert flags.has(o.flags, "virtual")
    outcome = await handle(o, ctx)
    assert outcome.kind == "skip" and "virtual" in outcome.reason
    assert log.count("tms") == 0


@pytest.mark.anyio
async def test_o2o_pickup_is_skipped_with_its_pickup_point() -> None:
    ctx, log = await make()
    o = order(line("A"), pickup="PP-BJ-07")
    outcome = await handle(o, ctx)
    assert outcome.kind == "skip" and "PP-BJ-07" in outcome.reason and "pickup" in outcome.reason
    assert log.count("tms") == 0


@pytest.mark.anyio
async def test_a_stage_run_twice_requests_each_waybill_once() -> None:
    ctx, log = await make()
    o = order(line("A"), line("B", warehouse="WH-SH"))
    checkpoint = encode(o)  # what a crash replay starts from: no results yet
    await handle(o, ctx)
    first = dict(o.results["waybill"])
    await handle(o, ctx)  # retry in the same process: results already hold the numbers
    assert log.count("tms") == 2 and log.duplicates == {}
    replayed = decode(checkpoint)  # replay after a crash: the key brings the same numbers back
    await handle(replayed, ctx)
    assert replayed.results["waybill"] == first
    assert log.count("tms") == 2 and log.duplicates == {"tms": 2}


@pytest.mark.anyio
async def test_a_line_without_warehouse_is_permanent() -> None:
    ctx, _ = await make()
    with pytest.raises(PermanentError, match="name no warehouse"):
        await handle(order(line("A", warehouse="")), ctx)


@pytest.mark.anyio
async def test_tms_outage_propagates_for_the_runtime_to_retry() -> None:
    ctx, log = await make({"failure_rate": {"tms": 1.0}})
    with pytest.raises(TransientError):
        await handle(order(line("A")), ctx)
    assert log.count("tms") == 0


@pytest.mark.anyio
async def test_generated_orders_get_a_waybill_per_shipment() -> None:
    ctx, log = await make()
    expected = 0
    for i, request in enumerate(generate(300, seed=7)):
        o = to_order(request, f"G{i:05d}", 0.0)
        outcome = await handle(o, ctx)
        groups = {f"{ln.warehouse}/{ln.zone}" for ln in own_lines(o)}
        if o.consignee.pickup_point or not groups:
            assert outcome.kind == "skip" and "waybill" not in o.results
        else:
            assert outcome.kind == "next" and set(o.results["waybill"]) == groups
            expected += len(groups)
    assert log.count("tms") == expected > 0
