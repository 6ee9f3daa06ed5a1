"""Stage 10 `effective_time`: when the order may be released to the warehouse (seed 001 生效时间).

Seed 001: "通过履约时间计算出生效时间，未到达生效时间需要暂停". An order released too
early occupies warehouse capacity (and perishable stock) for days, so it waits
(parks) until its effective time, computed from the delivery promise:

- standard: released at once;
- next_day: released at the day's cut-off (the 19-21h next-day wave), on the
  day before the delivery date (the line's date, else the day after the first
  cut-off at or after the order was placed);
- scheduled: the earliest line delivery date minus `lead_days`, at `release_hour`;
- presale (whatever the promise): the goods' arrival date (the earliest line
  delivery date) minus `presale_lead_days`, at `release_hour`.

Dates are local dates in the business timezone (`timezone_offset_hours`).
Only ctx.now is read, so virtual time in tests and the benchmark drives it.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any, Mapping

from oms_pipeline.order import Order
from oms_pipeline.outcome import NEXT, Outcome, PermanentError, manual, park
from oms_pipeline.stage import CpuContext, StageSpec


def _tz(settings: Mapping[str, Any]) -> timezone:
    return timezone(timedelta(hours=float(settings["timezone_offset_hours"])))


def _hour(settings: Mapping[str, Any], key: str) -> int:
    hour = settings[key]
    if not isinstance(hour, int) or not 0 <= hour <= 23:
        raise PermanentError(f"setting {key} must be an hour 0-23, got {hour!r}")
    return hour


def _at(day: date, hour: int, tz: timezone) -> float:
    return datetime(day.year, day.month, day.day, hour, tzinfo=tz).timestamp()


def _earliest_date(order: Order) -> date | None:
    """The earliest line delivery date (ValueError names a malformed one)."""
    days = []
    for line in order.lines:
        if line.delivery_date:
            try:
                days.append(date.fromisoformat(line.delivery_date))
            except ValueError:
                raise ValueError(f"line {line.line_no} has a malformed delivery_date {line.delivery_date!r}") from None
    return min(days, default=None)


def _next_day_release(order: Order, now: float, settings: Mapping[str, Any], tz: timezone) -> float:
    cutoff = _hour(settings, "cutoff_hour")
    delivery = _earliest_date(order)
    if delivery is not None:
        return _at(delivery - timedelta(days=1), cutoff, tz)
    # No date on the lines: placed before the cut-off ships in tonight's wave, after it tomorrow's.
    placed = order.created_at or now
    day = datetime.fromtimestamp(placed, tz).date()
    release = _at(day, cutoff, tz)
    return release if placed <= release else _at(day + timedelta(days=1), cutoff, tz)


def _dated_release(order: Order, settings: Mapping[str, Any], tz: timezone, lead_key: str,
                   what: str) -> float | str:
    delivery = _earliest_date(order)
    if delivery is None:
        return f"{what} order has no delivery date on its lines"
    lead = int(settings[lead_key])
    return _at(delivery - timedelta(days=lead), _hour(settings, "release_hour"), tz)


def release_time(order: Order, now: float, settings: Mapping[str, Any]) -> float | str:
    """Epoch seconds the order may be released at, or why it cannot be computed."""
    tz = _tz(settings)
    try:
        if order.presale:
            return _dated_release(order, settings, tz, "presale_lead_days", "presale")
        if order.delivery_promise == "standard":
            return now
        if order.delivery_promise == "next_day":
            return _next_day_release(order, now, settings, tz)
        if order.delivery_promise == "scheduled":
            return _dated_release(order, settings, tz, "lead_days", "scheduled")
    except ValueError as exc:
        return str(exc)
    return f"unknown delivery promise {order.delivery_promise!r}"


def _iso(ts: float, settings: Mapping[str, Any]) -> str:
    return datetime.fromtimestamp(ts, _tz(settings)).isoformat(timespec="seconds")


def handle(order: Order, ctx: CpuContext) -> Outcome:
    release = release_time(order, ctx.now, ctx.settings)
    if isinstance(release, str):
        return manual(f"effective_time: {release}")
    if ctx.now < release:
        return park(release, f"effective at {_iso(release, ctx.settings)}")
    order.results["effective_at"] = release
    return NEXT


SPEC = StageSpec(
    "effective_time", "cpu", handle,
    description="park the order until it may be released to the warehouse: standard at once, next-day at the"
                " cut-off before delivery, scheduled/presale lead days before the (arrival) date",
    defaults={
        "timezone_offset_hours": 8,  # business dates and hours are local (China, UTC+8)
        "cutoff_hour": 20,           # next-day orders go to the warehouse in the evening wave
        "release_hour": 8,           # scheduled and presale orders are released at this hour
        "lead_days": 1,              # scheduled: days before the delivery date
        "presale_lead_days": 1,      # presale: days before the goods' arrival date
    },
)
