"""Stage notify_paid: 'payment received' on the channels of the order's source, once per channel."""
from __future__ import annotations

from typing import Any

import pytest

from oms_pipeline import generator
from oms_pipeline.adapters.simulated import EffectLog
from oms_pipeline.order import Address, Amounts, Line, Order
from oms_pipeline.outcome import PermanentError, TransientError
from oms_pipeline.stage import StageContext
from tests.support.stages import stage_context
from stages.notify_paid import SPEC, handle



async def make_ctx(settings: dict[str, Any] | None = None,
                   sim: dict[str, Any] | None = None) -> tuple[StageContext, EffectLog]:
    return await stage_context(SPEC, settings, sim)


def order(source: str = "app", *, payable: int = 2500, paid: int = 2500, method: str = "online",
          phone: str = "13812345678", kind: str = "toc") -> Order:
    return Order(order_no="O100", source=source, external_id="e1", kind=kind, member_id="M1",
                 consignee=Address(name="Li", phone=phone, province="北京市", city="北京市"),
                 lines=[Line(line_no=1, sku="SKU-1", qty=1, unit_price=payable)],
                 amounts=Amounts(payable=payable, paid=paid), payment_method=method)


def sent(log: EffectLog) -> list[tuple[str, str, str]]:
    return [(e.key, e.payload["channel"], e.payload["template"]) for e in log.applied("notification")]


@pytest.mark.anyio
@pytest.mark.parametrize("source, channels", [
    ("app", ["app_push", "sms"]),
    ("web", ["sms"]),
    ("mini", ["mini_program", "sms"]),
    ("gift_exchange", ["wechat", "sms"]),
])
async def test_channels_follow_the_source(source: str, channels: list[str]) -> None:
    ctx, log = await make_ctx()
    o = order(source)
    outcome = await handle(o, ctx)
    assert outcome.kind == "next"
    assert sent(log) == [(f"O100:notify_paid:{c}", c, "order_paid") for c in channels]
    assert list(o.results["notify_paid"]["messages"]) == channels
    assert o.results["notify_paid"]["amount"] == 2500
    assert all(e.payload["to"] == "138****5678" for e in log.applied("notification"))


@pytest.mark.anyio
async def test_running_twice_sends_each_message_once() -> None:
    ctx, log = await make_ctx()
    o = order("mini")
    await handle(o, ctx)
    first = dict(o.results["notify_paid"]["messages"])
    assert (await handle(o, ctx)).kind == "next"
    assert log.count("notification") == 2
    assert log.duplicates["notification"] == 2
    assert o.results["notify_paid"]["messages"] == first


@pytest.mark.anyio
async def test_a_retry_after_one_channel_failed_resends_only_the_missing_one() -> None:
    ctx, log = await make_ctx(sim={"failure_rate": {"notification": 0.5}, "seed": 3})
    o = order("app")
    for _ in range(50):
        try:
            await handle(o, ctx)
            break
        except TransientError:
            continue
    else:
        pytest.fail("never got through a 50% outage in 50 tries")
    assert sorted(c for _, c, _ in sent(log)) == ["app_push", "sms"]


@pytest.mark.anyio
@pytest.mark.parametrize("kw, reason", [
    ({"payable": 0, "paid": 0}, "payable is 0"),
    ({"method": "cod", "paid": 0}, "cash on delivery"),
    ({"method": "none", "paid": 0, "kind": "tob"}, "no payment"),
    ({"phone": ""}, "no consignee phone"),
])
async def test_orders_that_paid_nothing_are_skipped(kw: dict[str, Any], reason: str) -> None:
    ctx, log = await make_ctx()
    outcome = await handle(order("app", **kw), ctx)
    assert outcome.kind == "skip" and reason in outcome.reason
    assert log.count() == 0


@pytest.mark.anyio
@pytest.mark.parametrize("source", ["sales_plan", "platform", "service"])
async def test_sources_without_channels_are_skipped(source: str) -> None:
    ctx, log = await make_ctx()
    outcome = await handle(order(source), ctx)
    assert outcome.kind == "skip" and source in outcome.reason
    assert log.count() == 0


@pytest.mark.anyio
async def test_amount_is_what_was_paid_else_payable() -> None:
    ctx, _ = await make_ctx()
    o = order("web", payable=3000, paid=0)
    await handle(o, ctx)
    assert o.results["notify_paid"]["amount"] == 3000


@pytest.mark.anyio
async def test_channel_map_and_template_come_from_settings() -> None:
    ctx, log = await make_ctx({"channels": {"web": ["wechat"]}, "template": "paid_v2"})
    await handle(order("web"), ctx)
    assert sent(log) == [("O100:notify_paid:wechat", "wechat", "paid_v2")]
    assert (await handle(order("app"), ctx)).kind == "skip"


@pytest.mark.anyio
async def test_an_unknown_channel_is_permanent() -> None:
    ctx, log = await make_ctx({"channels": {"app": ["pager"]}})
    with pytest.raises(PermanentError):
        await handle(order("app"), ctx)
    assert log.count() == 0


@pytest.mark.anyio
async def test_generated_orders_notify_exactly_the_paying_toc_ones() -> None:
    ctx, log = await make_ctx()
    expected = 0
    for i, request in enumerate(generator.generate(300, seed=11)):
        o = generator.to_order(request, f"G{i:05d}", 0.0)
        outcome = await handle(o, ctx)
        pays = o.kind == "toc" and o.payment_method in ("online", "mixed") and o.amounts.payable > 0
        assert outcome.kind == ("next" if pays else "skip"), (o.kind, o.payment_method)
        if pays:
            expected += len(SPEC.defaults["channels"][o.source])
    assert expected > 0 and log.count("notification") == expected
