"""Stage 1 `notify_paid`: tell the customer the payment arrived (seed 001 初始环节).

Seed 001: "订单发送短信、推送公众号、小程序订单推送支付成功". The channels depend
on where the order came from (setting `channels`, source -> channel list). Each
channel is its own effect keyed "ORDERNO:notify_paid:CHANNEL", so a retry after
one channel failed re-sends only the ones that did not go out.
"""
from __future__ import annotations

from oms_pipeline.order import Order
from oms_pipeline.outcome import NEXT, Outcome, skip
from oms_pipeline.stage import StageContext, StageSpec


def _why_not(order: Order, channels: list[str]) -> str:
    """The reason this order gets no payment notification ("" when it gets one)."""
    if order.payment_method == "none":
        return "no payment: the order is settled on account or free"
    if order.payment_method == "cod":
        return "cash on delivery: nothing is paid before delivery"
    if order.amounts.payable <= 0:
        return "nothing paid: payable is 0"
    if not channels:
        return f"no payment notification for source {order.source!r}"
    if not order.consignee.phone:
        return "no consignee phone to notify"
    return ""


async def handle(order: Order, ctx: StageContext) -> Outcome:
    channels = list(ctx.settings.get("channels", {}).get(order.source, ()))
    reason = _why_not(order, channels)
    if reason:
        return skip(reason)
    amount = order.amounts.paid or order.amounts.payable
    params = {"order_no": order.order_no, "amount": amount}
    template = ctx.settings.get("template", "order_paid")
    key = ctx.key(order)
    sent = {}
    for channel in channels:
        sent[channel] = await ctx.ports.notification.send(
            f"{key}:{channel}", channel, order.consignee.phone, template, params)
    order.results["notify_paid"] = {"messages": sent, "amount": amount}
    return NEXT


SPEC = StageSpec(
    "notify_paid", "io", handle,
    description="SMS / WeChat / mini-program / app push 'payment received', channels by order source",
    defaults={
        "template": "order_paid",
        "channels": {
            "app": ["app_push", "sms"],
            "web": ["sms"],
            "mini": ["mini_program", "sms"],
            "gift_exchange": ["wechat", "sms"],
        },
    },
)
