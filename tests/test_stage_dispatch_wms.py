"""Stage `dispatch_wms`: own WMS per shipment, suppliers for drop-ship, virtual outbound; once per target."""
from __future__ import annotations

import dataclasses
from collections import Counter
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
from stages.dispatch_wms import SPEC, handle


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recording:
    """Wraps a port and keeps every payload it was sent (the simulator only logs a summary)."""

    def __init__(self, port: Any) -> None:
        self.port, self.payloads = port, []

    async def dispatch(self, key: str, order_no: str, *args: Any) -> str:
        self.payloads.append((key, args[-1]))
        return await self.port.dispatch(key, order_no, *args)


class Env:
    def __init__(self, ctx: StageContext, log: EffectLog, wms: Recording, supplier: Recording) -> None:
        self.ctx, self.log, self.wms, self.supplier = ctx, log, wms, supplier


async def make(table: dict[str, Any] | None = None, log: EffectLog | None = None) -> Env:
    clock, log = VirtualClock(), log or EffectLog()
    await log.open()
    ports = build_simulated_ports(SimSettings.from_mapping(table or {}), clock, log)
    wms, supplier = Recording(ports.wms), Recording(ports.supplier)
    ports = dataclasses.replace(ports, wms=wms, supplier=supplier)
    ctx = StageContext("dispatch_wms", dict(SPEC.defaults), ports, LocalCoordination(clock), clock)
    return Env(ctx, log, wms, supplier)


def line(sku: str, warehouse: str = "WH-BJ", zone: str = "ambient", qty: int = 1, **kw: Any) -> dict[str, Any]:
    return {"sku": sku, "qty": qty, "unit_price": 1000, "warehouse": warehouse, "zone": zone, **kw}


def virtual(sku: str = "GC-0100") -> dict[str, Any]:
    return line(sku, warehouse="", virtual=True)


def drop(sku: str, supplier: str) -> dict[str, Any]:
    return line(sku, warehouse="", supplier=supplier)


def order(*lines: dict[str, Any], no: str = "O1", pickup: str | None = None) -> Order:
    o = Order(order_no=no, source="app", external_id=f"ext-{no}", kind="toc", member_id="M1",
              consignee=Address(name="张三", phone="13812345678", province="北京市", city="北京市",
                                district="朝阳区", detail="人民路1号", pickup_point=pickup),
              lines=[Line(line_no=i, **raw) for i, raw in enumerate(lines, start=1)],
              amounts=Amounts(payable=1000, paid=1000))
    o.flags = flags.derive(o)
    return o


@pytest.mark.anyio
async def test_each_target_gets_one_call_with_its_own_lines() -> None:
    env = await make()
    o = order(line("A", qty=2), line("B"), line("C", zone="frozen_low"), line("D", "WH-SH"),
              drop("S1", "SUP-01"), drop("S2", "SUP-01"), drop("S3", "SUP-02"), virtual())
    o.results["waybill"] = {"WH-BJ/ambient": "WB1", "WH-BJ/frozen_low": "WB2", "WH-SH/ambient": "WB3"}
    assert (await handle(o, env.ctx)).kind == "next"
    sent = dict(env.wms.payloads)
    assert set(sent) == {"O1:dispatch_wms:wms:WH-BJ/ambient", "O1:dispatch_wms:wms:WH-BJ/frozen_low",
                         "O1:dispatch_wms:wms:WH-SH/ambient"}
    bj = sent["O1:dispatch_wms:wms:WH-BJ/ambient"]
    assert bj["order_no"] == "O1" and bj["warehouse"] == "WH-BJ" and bj["zone"] == "ambient"
    assert bj["lines"] == [("A", 2), ("B", 1)] and bj["waybill"] == "WB1"
    # WMS prints the label: it gets the real consignee, not a masked one.
    assert bj["consignee"]["phone"] == "13812345678" and bj["consignee"]["name"] == "张三"
    assert sent["O1:dispatch_wms:wms:WH-SH/ambient"]["waybill"] == "WB3"
    suppliers = dict(env.supplier.payloads)
    assert suppliers["O1:dispatch_wms:supplier:SUP-01"]["lines"] == [("S1", 1), ("S2", 1)]
    assert suppliers["O1:dispatch_wms:supplier:SUP-02"]["lines"] == [("S3", 1)]
    assert suppliers["O1:dispatch_wms:supplier:SUP-01"]["consignee"]["detail"] == "人民路1号"
    result = o.results["dispatch_wms"]
    assert result["wms"] == {e.key.rsplit(":", 1)[1]: e.result for e in env.log.applied("wms")}
    assert result["supplier"] == {e.payload["supplier"]: e.result for e in env.log.applied("supplier")}
    assert result["virtual_outbound"] is True and result["virtual_lines"] == [8]


@pytest.mark.anyio
async def test_a_virtual_order_ships_without_any_warehouse() -> None:
    env = await make()
    o = order(virtual(), virtual("GC-0200"))
    assert (await handle(o, env.ctx)).kind == "next"
    assert env.log.count() == 0
    assert o.results["dispatch_wms"]["virtual_outbound"] is True
    assert o.results["dispatch_wms"]["virtual_lines"] == [1, 2]
    assert o.results["dispatch_wms"]["virtual_shipped_at"] == env.ctx.now()


@pytest.mark.anyio
async def test_a_physical_order_has_no_virtual_outbound() -> None:
    env = await make()
    o = order(line("A"))
    await handle(o, env.ctx)
    assert o.results["dispatch_wms"]["virtual_outbound"] is False
    assert env.ctx.ports.wms.port.dispatched["O1"] == o.results["dispatch_wms"]["wms"]["WH-BJ/ambient"]


@pytest.mark.anyio
async def test_an_o2o_pickup_order_goes_to_wms_with_its_pickup_point() -> None:
    env = await make()
    o = order(line("A"), pickup="PP-BJ-07")
    await handle(o, env.ctx)
    [(_, payload)] = env.wms.payloads
    assert payload["consignee"]["pickup_point"] == "PP-BJ-07" and payload["waybill"] is None


@pytest.mark.anyio
async def test_lines_erp_reported_short_stay_behind() -> None:
    env = await make()
    o = order(line("A"), line("B"), line("C", "WH-SH"))
    o.results["erp_stock"] = {"try": 1, "occupations": ["OC1"], "occupied": [["A", "WH-BJ", 1]],
                              "short": [["B", "WH-BJ", 1], ["C", "WH-SH", 1]]}
    await handle(o, env.ctx)
    assert [(key, p["lines"]) for key, p in env.wms.payloads] == [("O1:dispatch_wms:wms:WH-BJ/ambient", [("A", 1)])]


@pytest.mark.anyio
async def test_a_stage_run_twice_dispatches_each_target_once() -> None:
    env = await make()
    o = order(line("A"), line("D", "WH-SH"), drop("S1", "SUP-01"))
    checkpoint = encode(o)
    await handle(o, env.ctx)
    await handle(o, env.ctx)  # retry holding the task ids: no calls
    assert env.log.count("wms") == 2 and env.log.count("supplier") == 1 and env.log.duplicates == {}
    replayed = decode(checkpoint)  # crash replay: same keys, same task ids, no new effect
    await handle(replayed, env.ctx)
    assert replayed.results["dispatch_wms"] == o.results["dispatch_wms"]
    assert env.log.count("wms") == 2 and env.log.count("supplier") == 1
    assert env.log.duplicates == {"wms": 2, "supplier": 1}


@pytest.mark.anyio
async def test_a_retry_after_one_target_failed_only_sends_the_missing_ones() -> None:
    env = await make({"failure_rate": {"supplier": 1.0}})
    o = order(line("A"), drop("S1", "SUP-01"))
    with pytest.raises(TransientError):
        await handle(o, env.ctx)
    assert list(o.results["dispatch_wms"]["wms"]) == ["WH-BJ/ambient"]
    env = await make(log=env.log)  # the supplier is back
    assert (await handle(o, env.ctx)).kind == "next"
    assert env.wms.payloads == [] and env.log.count("wms") == 1
    assert list(o.results["dispatch_wms"]["supplier"]) == ["SUP-01"]


@pytest.mark.anyio
async def test_an_intercepted_order_cannot_be_dispatched() -> None:
    env = await make()
    o = order(line("A"))
    await env.ctx.ports.wms.port.dispatch("O1:earlier", "O1", {})
    await env.ctx.ports.wms.port.intercept("O1:cancel", "O1")
    with pytest.raises(PermanentError, match="intercepted"):
        await handle(o, env.ctx)


@pytest.mark.anyio
async def test_nothing_to_dispatch_goes_to_manual() -> None:
    env = await make()
    o = order(line("B"))
    o.results["erp_stock"] = {"short": [["B", "WH-BJ", 1]]}
    outcome = await handle(o, env.ctx)
    assert outcome.kind == "manual" and "nothing to dispatch" in outcome.reason


@pytest.mark.anyio
async def test_generated_orders_send_every_line_to_exactly_one_target() -> None:
    env = await make()
    for i, request in enumerate(generate(300, seed=13)):
        o = to_order(request, f"G{i:05d}", 0.0)
        before = len(env.wms.payloads), len(env.supplier.payloads)
        assert (await handle(o, env.ctx)).kind == "next"
        sent: Counter[str] = Counter()
        for _, payload in env.wms.payloads[before[0]:] + env.supplier.payloads[before[1]:]:
            for sku, qty in payload["lines"]:
                sent[sku] += qty
        virtual_lines = set(o.results["dispatch_wms"].get("virtual_lines", ()))
        expected: Counter[str] = Counter()
        for ln in o.lines:
            if ln.line_no not in virtual_lines:
                expected[ln.sku] += ln.qty
        assert sent == expected
        assert o.results["dispatch_wms"]["virtual_outbound"] == any(ln.virtual for ln in o.lines)
