"""Stage 6 `voucher`: push the payment voucher to finance (seed 001 凭证推送).

The voucher books what the customer actually paid (`amounts.paid`). Cash on
delivery books its voucher at delivery, and orders that paid nothing (ToB on
account, service orders, fully deducted orders) have nothing to book.
"""
from __future__ import annotations

from oms_pipeline.order import Order
from oms_pipeline.outcome import NEXT, Outcome, skip
from oms_pipeline.stage import StageContext, StageSpec


def _why_not(order: Order) -> str:
    if order.payment_method == "cod":
        return "cash on delivery: the voucher is pushed at delivery"
    if order.payment_method == "none":
        return "no payment: the order is settled on account or free"
    if order.amounts.paid <= 0:
        return f"unpaid: nothing was paid (payable {order.amounts.payable})"
    return ""


async def handle(order: Order, ctx: StageContext) -> Outcome:
    reason = _why_not(order)
    if reason:
        return skip(reason)
    amount = order.amounts.paid
    voucher_id = await ctx.ports.finance.push_voucher(ctx.key(order), order.order_no, amount,
                                                      order.payment_method)
    order.results["voucher"] = {"voucher_id": voucher_id, "amount": amount, "method": order.payment_method}
    return NEXT


SPEC = StageSpec(
    "voucher", "io", handle,
    description="push the payment voucher (amount paid, payment method) to finance; COD and unpaid skip",
    defaults={},
)
