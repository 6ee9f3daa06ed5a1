"""Stage voucher: the amount paid is booked with finance once; COD and unpaid orders skip."""
from __future__ import annotations

from typing import Any

import pytest

from oms_pipeline import generator
from oms_pipeline.adapters.simulated import EffectLog
from oms_pipeline.order import Address, Amounts, Line, Order
from oms_pipeline.outcome import TransientError
from oms_pipeline.stage import StageContext
from tests.support.stages import stage_context
from stages.voucher import SPEC, handle



async def make_ctx(sim: dict[str, Any] | None = None) -> tuple[StageContext, EffectLog]:
    return await stage_context(SPEC, None, sim)


def order(*, payable: int = 4200, paid: int = 4200, method: str = "online", no: str = "O200") -> Order:
    return Order(order_no=no, source="app", external_id="e2", kind="toc", member_id="M1",
                 consignee=Address(name="Li", phone="13812345678", province="北京市", city="北京市"),
                 lines=[Line(line_no=1, sku="SKU-1", qty=1, unit_price=payable)],
                 amounts=Amounts(payable=payable, paid=paid), payment_method=method)


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["online", "mixed"])
async def test_pushes_the_paid_amount_and_method(method: str) -> None:
    ctx, log = await make_ctx()
    o = order(payable=4200, paid=4100, method=method)
    assert (await handle(o, ctx)).kind == "next"
    [effect] = log.applied("finance")
    assert effect.key == "O200:voucher" and effect.op == "push_voucher"
    assert effect.payload == {"order_no": "O200", "amount": 4100, "method": method}
    assert o.results["voucher"] == {"voucher_id": effect.result, "amount": 4100, "method": method}
    assert ctx.ports.finance.vouchered["O200"] == 4100


@pytest.mark.anyio
async def test_running_twice_books_one_voucher() -> None:
    ctx, log = await make_ctx()
    o = order()
    await handle(o, ctx)
    first = o.results["voucher"]["voucher_id"]
    await handle(o, ctx)
    assert log.count("finance") == 1 and log.duplicates["finance"] == 1
    assert o.results["voucher"]["voucher_id"] == first
    assert ctx.ports.finance.vouchered["O200"] == 4200


@pytest.mark.anyio
async def test_a_finance_outage_propagates_and_books_nothing() -> None:
    ctx, log = await make_ctx({"failure_rate": {"finance": 1.0}})
    o = order()
    with pytest.raises(TransientError):
        await handle(o, ctx)
    assert log.count() == 0 and "voucher" not in o.results


@pytest.mark.anyio
@pytest.mark.parametrize("kw, reason", [
    ({"method": "cod", "paid": 0}, "cash on delivery"),
    ({"method": "cod", "paid": 4200}, "cash on delivery"),  # even if a collection was recorded
    ({"method": "none", "paid": 0, "payable": 0}, "no payment"),
    ({"paid": 0}, "unpaid"),
    ({"paid": 0, "payable": 0}, "unpaid"),
])
async def test_cod_and_unpaid_orders_skip(kw: dict[str, Any], reason: str) -> None:
    ctx, log = await make_ctx()
    o = order(**kw)
    outcome = await handle(o, ctx)
    assert outcome.kind == "skip" and reason in outcome.reason
    assert log.count() == 0 and "voucher" not in o.results


@pytest.mark.anyio
async def test_each_order_gets_its_own_voucher() -> None:
    ctx, log = await make_ctx()
    ids = set()
    for i, request in enumerate(generator.generate(80, seed=5)):
        o = generator.to_order(request, f"G{i:05d}", 0.0)
        o.amounts.paid = o.amounts.payable if o.payment_method in ("online", "mixed") else 0
        if (await handle(o, ctx)).kind == "next":
            ids.add(o.results["voucher"]["voucher_id"])
    assert len(ids) == log.count("finance") > 0
