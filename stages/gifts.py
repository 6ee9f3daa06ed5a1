"""Stage 3 `gifts`: add gift lines from campaigns the order qualifies for (seed 001 订单附赠).

Seed 002: gift goods ride along with the order (随单赠送); marketing sets up a
campaign (rules, the candidate members imported from Excel, the excluded
members, the gift), and the fulfilment flow checks each order against it and
fills in the gift. The rules come from settings["campaigns"] today (a campaign
service later, hence an `io` stage); the matching is a pure function of the
order, the rules and the clock.

A gift is a zero-price line attached to a main line (`gift_of`), shipped from
the same warehouse, zone and supplier so `split` keeps it with its main line.
Applied campaign ids are recorded in results["gifts"]: a replayed stage adds
no gift twice.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any, Iterable, Mapping

from oms_pipeline import flags
from oms_pipeline.order import Line, Order
from oms_pipeline.outcome import NEXT, Outcome, PermanentError, skip
from oms_pipeline.stage import StageContext, StageSpec

Campaign = Mapping[str, Any]


def _instant(value: Any, tz: timezone, *, end: bool) -> float:
    """Epoch seconds of a campaign bound: epoch number, ISO datetime, or ISO date (whole day)."""
    text = str(value).strip()
    if isinstance(value, (int, float)) or text.replace(".", "", 1).isdigit():
        return float(text)
    if len(text) == 10:  # a date: the campaign starts at its first second, ends after its last
        day = date.fromisoformat(text) + timedelta(days=1 if end else 0)
        return datetime(day.year, day.month, day.day, tzinfo=tz).timestamp()
    moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=tz)).timestamp()


def _checked(campaign: Campaign) -> Campaign:
    # A bad rule is a configuration mistake: retrying cannot fix it, so manual with the reason.
    cid = campaign.get("id")
    if not cid:
        raise PermanentError(f"gift campaign without an id: {dict(campaign)}")
    if not campaign.get("gift_sku"):
        raise PermanentError(f"gift campaign {cid}: no gift_sku")
    qty = campaign.get("gift_qty", 1)
    if not isinstance(qty, int) or qty <= 0:
        raise PermanentError(f"gift campaign {cid}: gift_qty must be a positive integer, got {qty!r}")
    return campaign


def _running(campaign: Campaign, now: float, tz: timezone) -> bool:
    start, end = campaign.get("start"), campaign.get("end")
    try:
        return ((start is None or _instant(start, tz, end=False) <= now)
                and (end is None or now < _instant(end, tz, end=True)))
    except ValueError as exc:
        raise PermanentError(f"gift campaign {campaign['id']}: bad start/end: {exc}") from None


def _member_qualifies(campaign: Campaign, member_id: str) -> bool:
    members = campaign.get("members") or []  # the candidate list; empty means everyone
    return (not members or member_id in members) and member_id not in (campaign.get("excluded") or [])


def _main_line(order: Order, campaign: Campaign) -> Line | None:
    """The line the gift attaches to: the campaign's main_sku, else the order's largest line."""
    # Gifts and bundle components are not sold lines: a gift never hangs off them.
    sold = sorted((line for line in order.lines if line.gift_of is None and line.bundle_of is None),
                  key=lambda line: line.line_no)
    main_sku = campaign.get("main_sku")
    if main_sku:
        return next((line for line in sold if line.sku == main_sku), None)
    return max(sold, key=lambda line: (line.goods, -line.line_no), default=None)


def match_campaigns(order: Order, campaigns: Iterable[Campaign], now: float, *,
                    tz_hours: float = 8) -> list[tuple[Campaign, Line]]:
    """The campaigns not yet applied that this order qualifies for, each with its main line."""
    tz = timezone(timedelta(hours=tz_hours))
    applied = set(order.results.get("gifts", ()))
    goods = sum(line.goods for line in order.lines if line.gift_of is None)
    matched = []
    for campaign in map(_checked, campaigns):
        if (campaign["id"] in applied or not _running(campaign, now, tz)
                or not _member_qualifies(campaign, order.member_id)
                or goods < int(campaign.get("min_amount", 0))):
            continue
        main = _main_line(order, campaign)
        if main is not None:
            matched.append((campaign, main))
    return matched


def gift_lines(order: Order, matched: list[tuple[Campaign, Line]]) -> list[Line]:
    """Zero-price gift lines, numbered after the order's last line, in campaign order."""
    first = max((line.line_no for line in order.lines), default=0) + 1
    return [Line(line_no=first + i, sku=c["gift_sku"], qty=c.get("gift_qty", 1), unit_price=0,
                 warehouse=main.warehouse, zone=main.zone, supplier=main.supplier, virtual=main.virtual,
                 delivery_date=main.delivery_date, gift_of=main.line_no)
            for i, (c, main) in enumerate(matched)]


def apply_campaigns(order: Order, campaigns: Iterable[Campaign], now: float, *,
                    tz_hours: float = 8) -> list[Line]:
    """The gift lines the order gets now (pure: the order is not changed)."""
    return gift_lines(order, match_campaigns(order, campaigns, now, tz_hours=tz_hours))


async def handle(order: Order, ctx: StageContext) -> Outcome:
    matched = match_campaigns(order, ctx.settings.get("campaigns", []), ctx.now(),
                              tz_hours=ctx.settings.get("timezone_offset_hours", 8))
    if not matched:
        if order.results.get("gifts"):
            return skip(f"campaign gifts already added: {', '.join(map(str, order.results['gifts']))}")
        return skip("no campaign applies")
    order.lines.extend(gift_lines(order, matched))
    order.results["gifts"] = [*order.results.get("gifts", ()), *(c["id"] for c, _ in matched)]
    order.flags = flags.set_flag(order.flags, "gift")
    return NEXT


SPEC = StageSpec(
    "gifts", "io", handle,
    description="add zero-price gift lines (gift_of the main line) for the campaigns the order qualifies for:"
                " running now, member a candidate and not excluded, goods >= min_amount; once per campaign",
    defaults={
        # Each: {id, gift_sku, gift_qty, min_amount (cents of goods), members (empty = all),
        #        excluded, start, end (ISO date/datetime or epoch), main_sku (else the largest line)}
        "campaigns": [],
        "timezone_offset_hours": 8,  # how ISO dates without an offset are read (China, UTC+8)
    },
)
