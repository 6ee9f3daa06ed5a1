"""Stage reissue_sms: one SMS to the consignee of reissue and exchange orders, none to others."""
from __future__ import annotations

from typing import Any

import pytest

from oms_pipeline import generator
from oms_pipeline.adapters.simulated import EffectLog
from oms_pipeline.order import Address, Amounts, Line, Order
from oms_pipeline.outcome import TransientError
from oms_pipeline.stage import StageContext
from tests.support.stages import stage_context
from stages.reissue_sms import SPEC, handle



async def make_ctx(settings: dict[str, Any] | None = None,
                   sim: dict[str, Any] | None = None) -> tuple[StageContext, EffectLog]:
    return await stage_context(SPEC, settings, sim)


def order(kind: str, phone: str = "13912345678") -> Order:
    return Order(order_no="O400", source="service", external_id="e4", kind=kind, member_id="M1",
                 consignee=Address(name="Li", phone=phone, province="北京市", city="北京市"),
                 lines=[Line(line_no=1, sku="A", qty=1, unit_price=100)],
                 amounts=Amounts(discount=100), payment_method="none")


@pytest.mark.anyio
@pytest.mark.parametrize("kind, template", [("reissue", "reissue_shipped"), ("exchange", "exchange_shipped")])
async def test_reissue_and_exchange_get_one_sms(kind: str, template: str) -> None:
    ctx, log = await make_ctx()
    o = order(kind)
    assert (await handle(o, ctx)).kind == "next"
    assert (await handle(o, ctx)).kind == "next"  # a replay sends nothing new
    [effect] = log.applied("notification")
    assert effect.key == "O400:reissue_sms"
    assert effect.payload == {"channel": "sms", "to": "139****5678", "template": template}
    assert log.duplicates["notification"] == 1
    assert o.results["reissue_sms"] == {"message_id": effect.result, "template": template}


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["toc", "tob", "third_party", "pullback"])
async def test_other_kinds_skip(kind: str) -> None:
    ctx, log = await make_ctx()
    outcome = await handle(order(kind), ctx)
    assert outcome.kind == "skip" and kind in outcome.reason
    assert log.count() == 0


@pytest.mark.anyio
async def test_no_phone_skips() -> None:
    ctx, log = await make_ctx()
    outcome = await handle(order("reissue", phone=""), ctx)
    assert outcome.kind == "skip" and "phone" in outcome.reason
    assert log.count() == 0


@pytest.mark.anyio
async def test_an_sms_outage_propagates_for_a_retry() -> None:
    ctx, log = await make_ctx(sim={"failure_rate": {"notification": 1.0}})
    with pytest.raises(TransientError):
        await handle(order("exchange"), ctx)
    assert log.count() == 0


@pytest.mark.anyio
async def test_templates_come_from_settings() -> None:
    ctx, log = await make_ctx({"templates": {"reissue": "reissue_v2"}})
    await handle(order("reissue"), ctx)
    assert log.applied("notification")[0].payload["template"] == "reissue_v2"
    assert (await handle(order("exchange"), ctx)).kind == "skip"


@pytest.mark.anyio
async def test_generated_orders() -> None:
    ctx, log = await make_ctx()
    wanted = 0
    for i, request in enumerate(generator.generate(300, seed=4)):
        o = generator.to_order(request, f"G{i:05d}", 0.0)
        outcome = await handle(o, ctx)
        wanted += o.kind in ("reissue", "exchange")
        assert outcome.kind == ("next" if o.kind in ("reissue", "exchange") else "skip")
    assert wanted > 0 and log.count("notification") == wanted
