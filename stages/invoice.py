"""Stage 15 `invoice` (seed 001 生成发票): request an electronic invoice.

Only when the customer asked for one: an invoice title on the order, or the
`invoice` flag (then the title defaults to `default_title`, "个人", a personal
invoice). The amount is what was paid when something was (`amounts.paid`),
else what is payable (cash on delivery, orders settled on account). Nothing to
pay means nothing to invoice (reissue and exchange shipments).
"""
from __future__ import annotations

from oms_pipeline import flags
from oms_pipeline.order import Order
from oms_pipeline.outcome import NEXT, Outcome, skip
from oms_pipeline.stage import StageContext, StageSpec

DEFAULTS = {"default_title": "个人"}


def invoice_amount(order: Order) -> int:
    paid = order.amounts.paid
    return paid if paid > 0 else order.amounts.payable


async def handle(order: Order, ctx: StageContext) -> Outcome:
    if not (order.invoice_title or flags.has(order.flags, "invoice")):
        return skip("no invoice requested")
    amount = invoice_amount(order)
    if amount <= 0:
        return skip(f"invoice requested but the amount is {amount} cents: nothing to invoice")
    done = order.results.get("invoice")
    if done and done.get("number"):
        return NEXT  # requested before a retry of this stage
    title = order.invoice_title or ctx.settings.get("default_title", DEFAULTS["default_title"])
    number = await ctx.ports.invoice.request(ctx.key(order), order.order_no, title, amount)
    order.results["invoice"] = {"number": number, "title": title, "amount": amount}
    return NEXT


SPEC = StageSpec(
    "invoice", "io", handle,
    description="request an electronic invoice for the amount paid (else payable) "
                "when the order asks for one",
    defaults=DEFAULTS,
)
