"""Stage presale: presale orders' goods go to purchasing once; other orders skip."""
from __future__ import annotations

import pytest

from oms_pipeline import flags, generator
from oms_pipeline.adapters.simulated import EffectLog
from oms_pipeline.order import Address, Amounts, Line, Order
from oms_pipeline.stage import StageContext
from tests.support.stages import stage_context
from stages.presale import SPEC, handle, presale_lines



async def make_ctx() -> tuple[StageContext, EffectLog]:
    return await stage_context(SPEC)


def order(lines: list[Line], *, presale: bool = True, order_flags: str = "") -> Order:
    return Order(order_no="O300", source="app", external_id="e3", kind="toc", member_id="M1",
                 consignee=Address(name="Li", phone="13812345678", province="北京市", city="北京市"),
                 lines=lines, amounts=Amounts(payable=100), presale=presale, flags=order_flags)


LINES = [Line(line_no=1, sku="A", qty=2, unit_price=10), Line(line_no=2, sku="B", qty=1, unit_price=10),
         Line(line_no=3, sku="A", qty=3, unit_price=11, bundle_of=9),
         Line(line_no=4, sku="GC-0100", qty=1, unit_price=10000, virtual=True)]


@pytest.mark.anyio
async def test_presale_order_pushes_its_goods_once() -> None:
    ctx, log = await make_ctx()
    o = order(LINES)
    assert (await handle(o, ctx)).kind == "next"
    assert (await handle(o, ctx)).kind == "next"  # a replay
    [effect] = log.applied("purchasing")
    assert effect.key == "O300:presale"
    assert effect.payload == {"order_no": "O300", "lines": [["A", 5], ["B", 1]]}
    assert ctx.ports.purchasing.presales["O300"] == [("A", 5), ("B", 1)]
    assert log.duplicates["purchasing"] == 1
    assert o.results["presale"] == {"request_id": effect.result, "lines": 2}


@pytest.mark.anyio
async def test_the_presale_flag_alone_is_enough() -> None:
    ctx, log = await make_ctx()
    o = order(LINES[:1], presale=False, order_flags=flags.set_flag("", "presale"))
    assert (await handle(o, ctx)).kind == "next"
    assert log.count("purchasing") == 1


@pytest.mark.anyio
async def test_other_orders_skip() -> None:
    ctx, log = await make_ctx()
    outcome = await handle(order(LINES, presale=False, order_flags=flags.set_flag("", "cod")), ctx)
    assert outcome.kind == "skip" and outcome.reason == "not a presale order"
    assert log.count() == 0


@pytest.mark.anyio
async def test_a_presale_order_of_only_virtual_goods_skips() -> None:
    ctx, log = await make_ctx()
    outcome = await handle(order(LINES[3:]), ctx)
    assert outcome.kind == "skip" and "no physical goods" in outcome.reason
    assert log.count() == 0


def test_presale_lines_sum_per_sku_in_line_order() -> None:
    assert presale_lines(order(LINES)) == [("A", 5), ("B", 1)]


@pytest.mark.anyio
async def test_generated_presale_orders_and_only_they_reach_purchasing() -> None:
    ctx, log = await make_ctx()
    presales = 0
    for i, request in enumerate(generator.generate(400, seed=2)):
        o = generator.to_order(request, f"G{i:05d}", 0.0)
        outcome = await handle(o, ctx)
        assert outcome.kind == ("next" if o.presale else "skip")
        presales += o.presale
    assert presales > 0 and log.count("purchasing") == presales
