"""Stage 2 `risk_check`: amount and address validation (seed 001 异常检查).

Seed 001: "金额的检验、地址的校验". Everything after this stage trusts the
amounts (allocate spreads them to the cent, finance books them) and the
address (the carrier ships to it), so an inconsistent order stops here, in the
exception centre with the specific reason, before any downstream effect.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from oms_pipeline.generator import PROVINCES
from oms_pipeline.order import Amounts, Order
from oms_pipeline.outcome import NEXT, Outcome, manual
from oms_pipeline.stage import CpuContext, StageSpec

# Separators people type in phone numbers; anything else that is not a digit is suspect.
_PHONE_SEPARATORS = re.compile(r"[\s\-()+]")
_DEDUCTIONS = ("discount", "coupon", "points")


def _amounts_problem(order: Order) -> str:
    """Why the order's money does not add up ("" when it does)."""
    if not order.lines:
        return "order has no lines"
    for line in order.lines:
        if line.qty <= 0:
            return f"line {line.line_no} ({line.sku}): qty {line.qty} must be positive"
        if line.unit_price < 0:
            return f"line {line.line_no} ({line.sku}): negative unit price {line.unit_price}"
    a = order.amounts
    for name in Amounts.__struct_fields__:
        if getattr(a, name) < 0:
            return f"negative {name} {getattr(a, name)}"
    goods = order.goods
    for name in _DEDUCTIONS:
        # Each deduction is granted against the goods; more than the goods is a pricing bug.
        if getattr(a, name) > goods:
            return f"{name} {getattr(a, name)} exceeds goods total {goods}"
    expected = goods - a.discount - a.coupon - a.points + a.freight
    if a.payable != expected:
        return (f"payable {a.payable} != goods {goods} - discount {a.discount} - coupon {a.coupon}"
                f" - points {a.points} + freight {a.freight} = {expected}")
    if a.paid > a.payable:
        return f"paid {a.paid} exceeds payable {a.payable}"
    return ""


def _phone_problem(phone: str, settings: Mapping[str, Any]) -> str:
    digits = _PHONE_SEPARATORS.sub("", phone)
    low, high = int(settings["phone_min_digits"]), int(settings["phone_max_digits"])
    if not digits.isdigit() or not low <= len(digits) <= high:
        return f"phone must have {low}-{high} digits (got {len(digits)} characters after separators)"
    return ""


def _address_problem(order: Order, settings: Mapping[str, Any]) -> str:
    """Why the carrier (or the pickup point) could not hand the goods over ("" when it can)."""
    c = order.consignee
    for name in ("name", "province", "city"):
        if not getattr(c, name).strip():
            return f"address has no {name}"
    phone = _phone_problem(c.phone, settings)
    if phone:
        return phone
    # An O2O pickup point replaces the street address; a delivery needs one.
    if not c.pickup_point and not c.detail.strip():
        return "address has no detail (street, number) and no pickup point"
    served = settings["served_provinces"]
    if served and c.province not in served:
        return f"province {c.province!r} is not in the served regions"
    return ""


def handle(order: Order, ctx: CpuContext) -> Outcome:
    problem = _amounts_problem(order) or _address_problem(order, ctx.settings)
    if problem:
        return manual(f"risk_check: {problem}")
    order.results["risk_check"] = "ok"
    return NEXT


SPEC = StageSpec(
    "risk_check", "cpu", handle,
    description="amounts add up (goods - deductions + freight == payable, no negatives, deductions <= goods)"
                " and the address is complete and served; else manual with the reason",
    defaults={
        "served_provinces": list(PROVINCES),  # empty list: serve everywhere
        "phone_min_digits": 6,
        "phone_max_digits": 20,
    },
)
