"""Stage 11 `waybill` (seed 001 获取运单号): a carrier waybill from TMS per shipment.

A shipment is one (warehouse, temperature zone) group of the lines our own
warehouses ship. Virtual lines ship nothing, drop-shipped lines (产地直发) are
the supplier's to send, and an O2O order is picked up at the store: none of
them needs a waybill from us. An order that was not split may still span
several warehouses or zones, so it gets one waybill per group.

The line helpers here are shared by the stages after it (erp_stock,
flow_limit, dispatch_wms), so "which lines do we ship" has one definition.
"""
from __future__ import annotations

from collections import defaultdict

from oms_pipeline import flags
from oms_pipeline.order import Line, Order
from oms_pipeline.outcome import NEXT, Outcome, PermanentError, skip
from oms_pipeline.stage import StageContext, StageSpec


def own_lines(order: Order) -> list[Line]:
    """Lines our own warehouses ship: physical, not drop-shipped, not a bundle `fill` expanded."""
    expanded = {line.bundle_of for line in order.lines if line.bundle_of is not None}
    return [line for line in order.lines
            if not line.virtual and not line.supplier and line.line_no not in expanded]


def require_warehouses(stage: str, order: Order, lines: list[Line]) -> None:
    """A line we ship must name its warehouse; without one no stage can act on it."""
    missing = [line.line_no for line in lines if not line.warehouse]
    if missing:
        raise PermanentError(f"{stage}: order {order.order_no} lines {missing} name no warehouse")


def shipments(lines: list[Line]) -> dict[str, list[Line]]:
    """Lines by shipment, "WAREHOUSE/zone", in a stable order."""
    groups: dict[str, list[Line]] = defaultdict(list)
    for line in sorted(lines, key=lambda ln: (ln.warehouse, ln.zone, ln.line_no)):
        groups[f"{line.warehouse}/{line.zone}"].append(line)
    return dict(groups)


def no_shipment_reason(order: Order) -> str:
    """Why an order has no line from our own warehouses."""
    if not order.lines:
        return "order has no lines"
    if flags.has(order.flags, "virtual") or all(line.virtual for line in order.lines):
        return "virtual order: virtual outbound, nothing ships"
    if all(line.virtual or line.supplier for line in order.lines):
        return "drop-ship: the supplier ships every physical line"
    return "no line ships from our own warehouses"


async def handle(order: Order, ctx: StageContext) -> Outcome:
    if flags.has(order.flags, "o2o_pickup") or order.consignee.pickup_point:
        return skip(f"O2O pickup at {order.consignee.pickup_point or 'the store'}: no waybill")
    lines = own_lines(order)
    if not lines:
        return skip(no_shipment_reason(order))
    require_warehouses(ctx.stage, order, lines)
    issued: dict[str, str] = order.results.setdefault("waybill", {})
    for group, members in shipments(lines).items():
        if group in issued:
            continue  # issued before a retry of this stage; the key would return it anyway
        warehouse, zone = members[0].warehouse, members[0].zone
        issued[group] = await ctx.ports.tms.request_waybill(
            f"{ctx.key(order)}:{group}", order.order_no, warehouse, zone)
    return NEXT


SPEC = StageSpec(
    "waybill", "io", handle,
    description="request a waybill number from TMS per (warehouse, zone) shipment; "
                "virtual, drop-ship and O2O pickup orders need none",
    defaults={},
)
