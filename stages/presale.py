"""Stage 9 `presale`: push presale orders' goods to purchasing (seed 001 预售订单推采销平台).

Presale goods ship once purchasing has sourced them, so the order's physical
lines go to the purchasing platform as (sku, qty), one entry per sku.
"""
from __future__ import annotations

from oms_pipeline import flags
from oms_pipeline.order import Order
from oms_pipeline.outcome import NEXT, Outcome, skip
from oms_pipeline.stage import StageContext, StageSpec


def presale_lines(order: Order) -> list[tuple[str, int]]:
    """(sku, qty) of the goods to source, summed per sku in line order; virtual goods need none."""
    qty: dict[str, int] = {}
    for line in order.lines:
        if not line.virtual and line.qty > 0:
            qty[line.sku] = qty.get(line.sku, 0) + line.qty
    return list(qty.items())


async def handle(order: Order, ctx: StageContext) -> Outcome:
    if not (order.presale or flags.has(order.flags, "presale")):
        return skip("not a presale order")
    lines = presale_lines(order)
    if not lines:
        return skip("presale order has no physical goods to source")
    request_id = await ctx.ports.purchasing.push_presale(ctx.key(order), order.order_no, lines)
    order.results["presale"] = {"request_id": request_id, "lines": len(lines)}
    return NEXT


SPEC = StageSpec(
    "presale", "io", handle,
    description="push presale orders' (sku, qty) to the purchasing platform; other orders skip",
    defaults={},
)
