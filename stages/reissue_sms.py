"""Stage 14 `reissue_sms`: tell the customer a reissue/exchange is on its way (seed 001 换发补发单发短信).

Only reissue (补发) and exchange (换发) orders; the template per kind comes from
the `templates` setting.
"""
from __future__ import annotations

from oms_pipeline.order import Order
from oms_pipeline.outcome import NEXT, Outcome, skip
from oms_pipeline.stage import StageContext, StageSpec


async def handle(order: Order, ctx: StageContext) -> Outcome:
    template = ctx.settings.get("templates", {}).get(order.kind)
    if not template:
        return skip(f"not a reissue or exchange order (kind {order.kind!r})")
    phone = order.consignee.phone
    if not phone:
        return skip("no consignee phone to notify")
    channel = ctx.settings.get("channel", "sms")
    message_id = await ctx.ports.notification.send(ctx.key(order), channel, phone, template,
                                                   {"order_no": order.order_no})
    order.results["reissue_sms"] = {"message_id": message_id, "template": template}
    return NEXT


SPEC = StageSpec(
    "reissue_sms", "io", handle,
    description="SMS the consignee of reissue and exchange orders; other kinds skip",
    defaults={
        "channel": "sms",
        "templates": {"reissue": "reissue_shipped", "exchange": "exchange_shipped"},
    },
)
