"""Stage 7 `split`: child orders by warehouse, zone, supplier and date (seed 001 订单拆分).

Seed 001: "交易单会把相同规则的商品明细行拆分成一个订单。规则如：仓库、收货时间、供应商";
the WMS works per temperature zone. Each child then flows on by itself (its own
waybill, stock, dispatch) and the parent's state derives from its children.

Lines that must ship together form one unit: a gift with its main line, the
components of a bundle with each other (and the bundle line). A unit goes
where its anchor (the main / bundle line) goes; virtual units all go into one
virtual child (no warehouse). Children are numbered in the order of their
first line number, so a replayed split builds the same children. The money is
conserved to the cent: a child's amounts are its lines' allocated amounts,
and what was paid is apportioned over the children's payables.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import msgspec

from oms_pipeline import flags
from oms_pipeline.order import Amounts, Line, Order
from oms_pipeline.outcome import NEXT, Outcome, PermanentError, manual, split
from oms_pipeline.stage import CpuContext, StageSpec
from stages.allocate import largest_remainder

SPLIT_KEYS = ("warehouse", "zone", "supplier", "delivery_date")
LINE_AMOUNTS = ("discount", "coupon", "points", "freight", "payable")
PAID_AMOUNTS = ("paid", "non_cash", "cash")
# The customer's own requests travel on every child, whatever the children's lines say.
KEPT_FLAGS = ("invoice", "remark")


def _units(lines: list[Line]) -> list[list[Line]]:
    """Lines that must stay together (gift + main, bundle + components), each sorted by line_no."""
    parent: dict[int, int] = {}

    def root(no: int) -> int:
        while parent.setdefault(no, no) != no:
            parent[no] = parent[parent[no]]
            no = parent[no]
        return no

    for line in lines:
        for other in (line.gift_of, line.bundle_of):
            if other is not None:
                parent[root(line.line_no)] = root(other)
    units: dict[int, list[Line]] = {}
    for line in sorted(lines, key=lambda line: line.line_no):
        units.setdefault(root(line.line_no), []).append(line)
    return list(units.values())


def _anchor(unit: list[Line]) -> Line:
    # The line the others hang off; a unit whose anchor is missing follows its first line.
    mains = [line for line in unit if line.gift_of is None and line.bundle_of is None]
    return (mains or unit)[0]


def _key(anchor: Line, keys: Iterable[str]) -> tuple:
    if anchor.virtual:
        return ("virtual",)
    return tuple(getattr(anchor, k) or "" for k in keys)


def groups(lines: list[Line], keys: Iterable[str] = SPLIT_KEYS) -> list[list[Line]]:
    """The lines of each child, children ordered by their lowest line number."""
    keys = tuple(keys)
    by_key: dict[tuple, list[Line]] = {}
    for unit in _units(lines):
        by_key.setdefault(_key(_anchor(unit), keys), []).extend(unit)
    found = [sorted(group, key=lambda line: line.line_no) for group in by_key.values()]
    return sorted(found, key=lambda group: group[0].line_no)


def _allocation_problem(order: Order) -> str:
    # Children sum their lines, so the lines must already carry the whole order's amounts.
    for name in LINE_AMOUNTS:
        total = sum(getattr(line, name) for line in order.lines)
        if total != getattr(order.amounts, name):
            return (f"lines' {name} add up to {total}, not the order's {getattr(order.amounts, name)}"
                    f" (allocate must run first)")
    return ""


def _child_amounts(parent: Order, groups_: list[list[Line]]) -> list[Amounts] | str:
    payables = [sum(line.payable for line in group) for group in groups_]
    amounts = [Amounts(**{name: sum(getattr(line, name) for line in group) for name in LINE_AMOUNTS})
               for group in groups_]
    for name in PAID_AMOUNTS:
        total = getattr(parent.amounts, name)
        if total and not sum(payables):
            return f"{name} {total} but the children have nothing payable to carry it"
        for child, share in zip(amounts, largest_remainder(total, payables)):
            setattr(child, name, share)
    return amounts


def _child_flags(child: Order, parent_flags: str) -> str:
    derived = flags.derive(child)
    for name in KEPT_FLAGS:
        derived = flags.set_flag(derived, name, flags.value(parent_flags, name))
    return derived


def _child_stock(parent: Order, lines: list[Line]) -> dict[str, Any]:
    """The parent's stock records of the child's lines: its cancel or return gives back
    what they hold of the parent's reservations (oms_pipeline/settlement.py)."""
    held = (parent.results.get("stock") or {}).get("lines", {})
    mine = {str(n): held[str(n)] for n in {line.line_no if line.bundle_of is None else line.bundle_of
                                          for line in lines} if str(n) in held}
    root = (parent.results.get("stock") or {}).get("root", parent.order_no)
    return {"stock": {"root": root, "lines": mine}} if mine else {}


def _child(parent: Order, n: int, lines: list[Line], amounts: Amounts) -> Order:
    child = Order(
        order_no=f"{parent.order_no}-{n}", source=parent.source, external_id=f"{parent.external_id}#{n}",
        kind=parent.kind, member_id=parent.member_id, consignee=msgspec.structs.replace(parent.consignee),
        lines=[msgspec.structs.replace(line) for line in lines], amounts=amounts,
        payment_method=parent.payment_method, status=parent.status, parent_no=parent.order_no,
        remark=parent.remark, invoice_title=parent.invoice_title, delivery_promise=parent.delivery_promise,
        presale=parent.presale, created_at=parent.created_at, timestamps=dict(parent.timestamps),
        # audit scores the customer's order as a whole: a large order split over warehouses is
        # no smaller for the risk check, and its children get one verdict.
        results={"parent": parent.order_no, "parent_payable": parent.amounts.payable,
                 **_child_stock(parent, lines)},
    )
    child.flags = _child_flags(child, parent.flags)
    return child


def split_order(order: Order, keys: Iterable[str] = SPLIT_KEYS) -> list[Order] | str:
    """The child orders (empty when the order ships as one), or why it cannot be split."""
    found = groups(order.lines, keys)
    if len(found) <= 1:
        return []
    problem = _allocation_problem(order)
    if problem:
        return problem
    amounts = _child_amounts(order, found)
    if isinstance(amounts, str):
        return amounts
    return [_child(order, n, lines, a) for n, (lines, a) in enumerate(zip(found, amounts), start=1)]


def _keys(settings: Mapping[str, Any]) -> tuple[str, ...]:
    keys = tuple(settings.get("keys", SPLIT_KEYS))
    unknown = [k for k in keys if k not in SPLIT_KEYS]
    if unknown:
        # A config mistake: retrying cannot fix it, so the order goes to manual with the reason.
        raise PermanentError(f"unknown split keys {unknown} in settings; known: {list(SPLIT_KEYS)}")
    return keys


def handle(order: Order, ctx: CpuContext) -> Outcome:
    children = split_order(order, _keys(ctx.settings))
    if isinstance(children, str):
        return manual(f"split: {children}")
    if not children:
        order.results["split"] = "single"
        return NEXT
    order.results["split"] = [child.order_no for child in children]
    return split(children, f"{len(children)} child orders")


SPEC = StageSpec(
    "split", "cpu", handle,
    description="child orders by warehouse, temperature zone, supplier and delivery date (gifts and bundle"
                " components stay with their line, virtual lines in one child); amounts conserved to the cent",
    defaults={"keys": list(SPLIT_KEYS)},  # the split rule: which line fields separate child orders
)
