"""Stage `invoice`: an electronic invoice when asked for, for what was paid, exactly once."""
from __future__ import annotations

from typing import Any

import pytest

from oms_pipeline import flags
from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.adapters.simulated import EffectLog, SimSettings, build_simulated_ports
from oms_pipeline.clock import VirtualClock
from oms_pipeline.generator import generate, to_order
from oms_pipeline.order import Address, Amounts, Line, Order, decode, encode
from oms_pipeline.outcome import TransientError
from oms_pipeline.stage import StageContext
from stages.invoice import SPEC, handle, invoice_amount


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def make(table: dict[str, Any] | None = None) -> tuple[StageContext, EffectLog]:
    clock, log = VirtualClock(), EffectLog()
    await log.open()
    ports = build_simulated_ports(SimSettings.from_mapping(table or {}), clock, log)
    return StageContext("invoice", dict(SPEC.defaults), ports, LocalCoordination(clock), clock), log


def order(title: str | None = "北京星河科技有限公司", payable: int = 9900, paid: int = 9900,
          extra_flags: tuple[str, ...] = ()) -> Order:
    o = Order(order_no="O1", source="app", external_id="ext-O1", kind="toc", member_id="M1",
              consignee=Address(name="张三", phone="13812345678", province="北京市", city="北京市"),
              lines=[Line(line_no=1, sku="A", qty=1, unit_price=payable, warehouse="WH-BJ")],
              amounts=Amounts(payable=payable, paid=paid), invoice_title=title)
    o.flags = flags.derive(o)
    for name in extra_flags:
        o.flags = flags.set_flag(o.flags, name)
    return o


@pytest.mark.anyio
async def test_an_invoice_title_requests_an_invoice_for_the_paid_amount() -> None:
    ctx, log = await make()
    o = order(payable=10000, paid=9500)  # e.g. paid after a late discount
    assert (await handle(o, ctx)).kind == "next"
    [effect] = log.applied("invoice")
    assert effect.key == "O1:invoice"
    assert effect.payload == {"order_no": "O1", "title": "北京星河科技有限公司", "amount": 9500}
    assert o.results["invoice"] == {"number": effect.result, "title": "北京星河科技有限公司", "amount": 9500}


@pytest.mark.anyio
async def test_unpaid_orders_are_invoiced_for_the_payable_amount() -> None:
    ctx, log = await make()
    o = order(payable=4200, paid=0)  # cash on delivery, or settled on account
    await handle(o, ctx)
    assert log.applied("invoice")[0].payload["amount"] == 4200 == invoice_amount(o)


@pytest.mark.anyio
async def test_the_invoice_flag_alone_gets_a_personal_invoice() -> None:
    ctx, log = await make()
    o = order(title=None, extra_flags=("invoice",))
    assert (await handle(o, ctx)).kind == "next"
    assert log.applied("invoice")[0].payload["title"] == "个人"


@pytest.mark.anyio
async def test_no_request_is_skipped() -> None:
    ctx, log = await make()
    outcome = await handle(order(title=None), ctx)
    assert outcome.kind == "skip" and outcome.reason == "no invoice requested"
    assert log.count("invoice") == 0


@pytest.mark.anyio
async def test_nothing_to_pay_is_skipped_with_the_reason() -> None:
    ctx, log = await make()
    o = order(payable=0, paid=0)  # a reissue: fully discounted
    outcome = await handle(o, ctx)
    assert outcome.kind == "skip" and "amount is 0" in outcome.reason
    assert log.count("invoice") == 0 and "invoice" not in o.results


@pytest.mark.anyio
async def test_a_stage_run_twice_requests_one_invoice() -> None:
    ctx, log = await make()
    o = order()
    checkpoint = encode(o)
    await handle(o, ctx)
    await handle(o, ctx)  # a retry holding the result: no call at all
    assert log.count("invoice") == 1 and log.duplicates == {}
    replayed = decode(checkpoint)  # a crash replay: the key returns the same invoice
    await handle(replayed, ctx)
    assert replayed.results["invoice"] == o.results["invoice"]
    assert log.count("invoice") == 1 and log.duplicates == {"invoice": 1}
    assert ctx.ports.invoice.invoiced["O1"] == 9900


@pytest.mark.anyio
async def test_an_invoice_outage_propagates_for_the_runtime_to_retry() -> None:
    ctx, log = await make({"failure_rate": {"invoice": 1.0}})
    o = order()
    with pytest.raises(TransientError):
        await handle(o, ctx)
    assert log.count("invoice") == 0 and "invoice" not in o.results


@pytest.mark.anyio
async def test_generated_orders_are_invoiced_when_asked_and_payable() -> None:
    ctx, log = await make()
    asked = 0
    for i, request in enumerate(generate(300, seed=9)):
        o = to_order(request, f"G{i:05d}", 0.0)
        outcome = await handle(o, ctx)
        wants = bool(o.invoice_title) and invoice_amount(o) > 0
        assert (outcome.kind == "next") == wants
        if wants:
            asked += 1
            assert ctx.ports.invoice.invoiced[o.order_no] == invoice_amount(o)
    assert log.count("invoice") == asked > 0
