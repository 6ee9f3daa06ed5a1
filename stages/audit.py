"""Stage 8 `audit`: automatic order review (seed 001 自动审核, seed 002 自动审单).

Rules, in order:
1. black list (member or consignee phone) -> cancel.
2. white list (member or phone) -> trusted: no fraud score, no frequency rule.
3. fraud score from the risk port: >= cheat_threshold -> cancel (作弊需要取消);
   >= review_threshold -> manual review. What is scored is the customer's order: a split
   child asks with its parent's number and payable (split records it), so a large order
   shipped from three warehouses is scored as large, and its children get one verdict.
4. frequency: at most `max_orders_per_hour` orders per member and per phone in
   one clock hour, counted on shared counters (Redis across instances) -> manual.
5. region: a consignee province/city in `review_regions` -> manual.
6. a buyer remark -> manual (包含备注的订单转人工).
The manual rules (3's review band, 4, 5, 6) pass once an operator has reviewed
the order (results["audit_reviewed"] set before the replay); cancels never do.

The frequency count is taken at most once per customer order: the counters
count order numbers (a replay after a crash is the same holder), a split
child's under its parent's number (audit runs after split: one order shipped
from two warehouses is still one order the member placed), and the checkpoint
carries results["audit_counted"], so retries and replays reuse the first answer.
"""
from __future__ import annotations

from typing import Any, Mapping

from oms_pipeline.order import Order
from oms_pipeline.outcome import NEXT, Outcome, cancel, manual
from oms_pipeline.stage import StageContext, StageSpec

HOUR = 3600.0
REMARK_SHOWN = 60  # characters of the remark quoted in the review reason


_sets: dict[int, tuple[Any, frozenset]] = {}


def _as_set(values: Any) -> frozenset:
    """A settings list as a set, built once per list object (lists may hold thousands of entries)."""
    found = _sets.get(id(values))
    if found is None or found[0] is not values:
        if len(_sets) > 64:  # settings reloads bring new lists: forget the old ones
            _sets.clear()
        found = _sets[id(values)] = (values, frozenset(values))
    return found[1]


def _listed(settings: Mapping[str, Any], which: str, order: Order) -> str:
    """'member' or 'phone' when the order's member or phone is on the black/white list."""
    if order.member_id and order.member_id in _as_set(settings.get(f"{which}_members", ())):
        return "member"
    if order.consignee.phone and order.consignee.phone in _as_set(settings.get(f"{which}_phones", ())):
        return "phone"
    return ""


def _placed(order: Order) -> tuple[str, int]:
    """The customer's order, split or not: its number and what it pays."""
    if order.parent_no:
        return order.parent_no, order.results.get("parent_payable", order.amounts.payable)
    return order.order_no, order.amounts.payable


async def _frequency(order: Order, ctx: StageContext, limit: int, placed: str) -> dict[str, bool]:
    """{"member": within limit, "phone": within limit}, counted once per customer order (`placed`)."""
    counted = order.results.get("audit_counted")
    if counted is not None:
        return counted
    now = ctx.now()
    bucket = int(now // HOUR)
    ttl = (bucket + 1) * HOUR - now + HOUR  # past the window's end, then Redis forgets it
    who = [(kind, ident) for kind, ident in (("member", order.member_id), ("phone", order.consignee.phone)) if ident]
    # Both counters in one call: one round trip to the shared counters, not one each.
    answers = await ctx.coordination.take_capacities(
        [(f"audit:{kind}:{ident}:{bucket}", placed, limit, ttl) for kind, ident in who])
    counted = {kind: ok for (kind, _), ok in zip(who, answers)}
    order.results["audit_counted"] = counted
    return counted


def _review_reason(order: Order, settings: Mapping[str, Any], score: int | None,
                   counted: dict[str, bool]) -> str:
    """Why the order needs a person ("" when it does not)."""
    limit = settings["max_orders_per_hour"]
    if score is not None and score >= settings["review_threshold"]:
        return f"audit: fraud score {score} needs review"
    for who in ("member", "phone"):
        if counted.get(who) is False:
            return f"audit: {who} placed more than {limit} orders this hour"
    regions = settings.get("review_regions", ())
    for place in (order.consignee.province, order.consignee.city):
        if place and place in regions:
            return f"audit: region {place} needs review"
    remark = order.remark.strip()
    if remark:
        shown = remark if len(remark) <= REMARK_SHOWN else remark[:REMARK_SHOWN] + "…"
        return f"audit: remark needs review: {shown}"
    return ""


async def handle(order: Order, ctx: StageContext) -> Outcome:
    settings = ctx.settings
    black = _listed(settings, "blacklist", order)
    if black:
        return cancel(f"audit: {black} is on the black list")
    trusted = _listed(settings, "whitelist", order)
    score = None
    counted: dict[str, bool] = {}
    if not trusted:
        placed, payable = _placed(order)
        score = await ctx.ports.risk.fraud_score(placed, order.member_id, order.consignee.phone, payable)
        if score >= settings["cheat_threshold"]:
            order.results["audit"] = {"score": score}
            return cancel(f"audit: fraud score {score}")
        counted = await _frequency(order, ctx, settings["max_orders_per_hour"], placed)
    order.results["audit"] = {"score": score} | ({"whitelisted": trusted} if trusted else {})
    reason = _review_reason(order, settings, score, counted)
    if reason and not order.results.get("audit_reviewed"):
        return manual(reason)
    return NEXT


SPEC = StageSpec(
    "audit", "io", handle,
    description="fraud score, black/white lists, orders-per-hour limits, regions and remarks: "
                "cheats cancel, doubtful orders go to manual review",
    defaults={
        "cheat_threshold": 90,
        "review_threshold": 70,
        "max_orders_per_hour": 20,
        "blacklist_members": [],
        "blacklist_phones": [],
        "whitelist_members": [],
        "whitelist_phones": [],
        "review_regions": [],
    },
)
