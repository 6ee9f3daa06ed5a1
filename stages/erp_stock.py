"""Stage 12 `erp_stock` (seed 001 分配ERP库存): occupy ERP stock for the lines we ship.

Only physical lines from our own warehouses are occupied, summed per (sku,
warehouse); virtual lines hold no stock and drop-shipped lines are the
supplier's. ERP occupies each line whole or not at all and its answer is final
for its key, so:

* the key carries an attempt counter kept in results["erp_stock"]["try"]. A
  crash replay of the same attempt finds the counter unchanged (nothing was
  checkpointed) and gets ERP's first answer back; the counter only moves when
  a shortage was recorded, so a replay from the exception centre (after a
  restock) asks ERP afresh.
* what was occupied is remembered, and a later attempt asks only for the
  rest, so a retry never occupies a line twice.

A shortage is stock-out handling, chosen by `on_shortage`: "manual" (the
exception centre), "cancel" (the reverse flow, "stock-out: ..."), or "partial"
(record the short lines and go on; dispatch_wms leaves them out). A partial
order with nothing occupied at all has nothing to ship and goes to manual.
"""
from __future__ import annotations

from typing import Any

from oms_pipeline.order import Order
from oms_pipeline.outcome import NEXT, Outcome, cancel, manual, skip
from oms_pipeline.stage import StageContext, StageSpec

from .waybill import no_shipment_reason, own_lines, require_warehouses

DEFAULTS = {"on_shortage": "manual"}
MODES = ("manual", "cancel", "partial")

Lines = list[tuple[str, str, int]]


def wanted(order: Order) -> dict[tuple[str, str], int]:
    """Qty to occupy per (sku, warehouse)."""
    need: dict[tuple[str, str], int] = {}
    for line in own_lines(order):
        key = (line.sku, line.warehouse)
        need[key] = need.get(key, 0) + line.qty
    return need


def describe(lines: Lines) -> str:
    return ", ".join(f"{sku}@{warehouse} x{qty}" for sku, warehouse, qty in lines)


def _state(order: Order) -> dict[str, Any]:
    return order.results.setdefault("erp_stock", {"try": 0, "occupations": [], "occupied": [], "short": []})


def _pending(need: dict[tuple[str, str], int], occupied: list[list[Any]]) -> Lines:
    """What is still to occupy, per (sku, warehouse), in a stable order."""
    done: dict[tuple[str, str], int] = {}
    for sku, warehouse, qty in occupied:
        done[(sku, warehouse)] = done.get((sku, warehouse), 0) + qty
    pending = []
    for (sku, warehouse), qty in sorted(need.items()):
        left = qty - done.get((sku, warehouse), 0)
        if left > 0:
            pending.append((sku, warehouse, left))
    return pending


def _shortage(order: Order, mode: str, short: Lines, anything_occupied: bool) -> Outcome:
    text = describe(short)
    if mode == "cancel":
        return cancel(f"stock-out: {text}")
    if mode == "partial" and anything_occupied:
        return NEXT
    if mode == "partial":
        return manual(f"erp_stock: every line is short, nothing to ship partially: {text}")
    return manual(f"erp_stock: short {text}")


async def handle(order: Order, ctx: StageContext) -> Outcome:
    mode = ctx.settings.get("on_shortage", DEFAULTS["on_shortage"])
    if mode not in MODES:
        return manual(f"erp_stock: setting on_shortage must be one of {', '.join(MODES)}, not {mode!r}")
    lines = own_lines(order)
    if not lines:
        return skip(no_shipment_reason(order))
    require_warehouses(ctx.stage, order, lines)
    state = _state(order)
    pending = _pending(wanted(order), state["occupied"])
    if not pending:
        return NEXT  # everything was occupied by an earlier attempt
    answer = await ctx.ports.erp.occupy(f"{ctx.key(order)}:{state['try']}", order.order_no, pending)
    short = [tuple(x) for x in answer.short]
    # ERP occupies a line whole or not at all: what was asked for and is not short was occupied.
    missing = set(short)
    state["occupations"].append(answer.occupation_id)
    state["occupied"].extend([list(line) for line in pending if line not in missing])
    state["short"] = [list(line) for line in short]
    if not short:
        return NEXT
    state["try"] += 1  # ERP's answer is final for that key: the next attempt needs a new one
    return _shortage(order, mode, short, bool(state["occupied"]))


SPEC = StageSpec(
    "erp_stock", "io", handle,
    description="occupy ERP stock for the physical lines of our own warehouses; "
                "a shortage goes to manual, cancel (stock-out) or on as a partial shipment",
    defaults=DEFAULTS,
)
