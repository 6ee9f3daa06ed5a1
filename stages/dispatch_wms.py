"""Stage 16 `dispatch_wms` (seed 001 下发WMS): hand the order to whoever ships it.

Three kinds of target, one downstream call each, keyed "ORDERNO:dispatch_wms:<target>":

* our own WMS, one task per (warehouse, zone) shipment, with the lines, the
  shipment's waybill and the real consignee (the warehouse prints the label);
  lines ERP reported short in "partial" mode stay behind;
* a supplier for drop-shipped lines (产地直发), one task per supplier;
* virtual lines: virtual outbound, no warehouse at all; marked shipped here.

Task ids are recorded per target as they come back, so a retry after one
target failed only sends to the ones still missing.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import msgspec

from oms_pipeline.order import Line, Order
from oms_pipeline.outcome import NEXT, Outcome, manual
from oms_pipeline.stage import StageContext, StageSpec

from .waybill import own_lines, require_warehouses, shipments


def _expanded(order: Order) -> set[int]:
    return {line.bundle_of for line in order.lines if line.bundle_of is not None}


def drop_ship_lines(order: Order) -> dict[str, list[Line]]:
    """Drop-shipped lines by supplier."""
    expanded, groups = _expanded(order), defaultdict(list)
    for line in order.lines:
        if line.supplier and not line.virtual and line.line_no not in expanded:
            groups[line.supplier].append(line)
    return dict(sorted(groups.items()))


def virtual_lines(order: Order) -> list[Line]:
    return [line for line in order.lines if line.virtual]


def warehouse_lines(order: Order) -> list[Line]:
    """Own-warehouse lines, without those ERP could not occupy (partial shipment)."""
    short = {(sku, wh) for sku, wh, _ in order.results.get("erp_stock", {}).get("short", ())}
    return [line for line in own_lines(order) if (line.sku, line.warehouse) not in short]


def _items(lines: list[Line]) -> list[tuple[str, int]]:
    return [(line.sku, line.qty) for line in lines]


def _wms_payload(order: Order, group: str, lines: list[Line]) -> dict[str, Any]:
    return {"order_no": order.order_no, "warehouse": lines[0].warehouse, "zone": lines[0].zone,
            "lines": _items(lines), "waybill": order.results.get("waybill", {}).get(group),
            "consignee": msgspec.to_builtins(order.consignee), "flags": order.flags,
            "delivery_promise": order.delivery_promise}


def _supplier_payload(order: Order, supplier: str, lines: list[Line]) -> dict[str, Any]:
    return {"order_no": order.order_no, "supplier": supplier, "lines": _items(lines),
            "consignee": msgspec.to_builtins(order.consignee), "flags": order.flags,
            "delivery_promise": order.delivery_promise}


async def handle(order: Order, ctx: StageContext) -> Outcome:
    own = warehouse_lines(order)
    require_warehouses(ctx.stage, order, own)
    by_shipment, by_supplier, virtual = shipments(own), drop_ship_lines(order), virtual_lines(order)
    if not (by_shipment or by_supplier or virtual):
        return manual(f"dispatch_wms: order {order.order_no} has nothing to dispatch")
    done = order.results.setdefault("dispatch_wms", {"wms": {}, "supplier": {}, "virtual_outbound": False})
    base = ctx.key(order)
    for group, lines in by_shipment.items():
        if group not in done["wms"]:
            done["wms"][group] = await ctx.ports.wms.dispatch(
                f"{base}:wms:{group}", order.order_no, _wms_payload(order, group, lines))
    for supplier, lines in by_supplier.items():
        if supplier not in done["supplier"]:
            done["supplier"][supplier] = await ctx.ports.supplier.dispatch(
                f"{base}:supplier:{supplier}", order.order_no, supplier, _supplier_payload(order, supplier, lines))
    if virtual and not done["virtual_outbound"]:
        done["virtual_outbound"] = True  # 虚拟出库: shipped without a warehouse
        done["virtual_lines"] = [line.line_no for line in virtual]
        done["virtual_shipped_at"] = ctx.now()
    return NEXT


SPEC = StageSpec(
    "dispatch_wms", "io", handle,
    description="send shipments to our own WMS per (warehouse, zone), drop-shipped lines to "
                "their supplier, and mark virtual lines shipped (virtual outbound)",
    defaults={},
)
