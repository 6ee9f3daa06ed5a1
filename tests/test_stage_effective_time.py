"""effective_time: an order waits (parks) until the warehouse may have it, by its delivery promise."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from oms_pipeline.order import Address, Amounts, Line, Order
from oms_pipeline.outcome import PermanentError
from oms_pipeline.stage import CpuContext
from stages import effective_time
from stages.effective_time import SPEC

CST = timezone(timedelta(hours=8))


def local(y, m, d, h=0, minute=0, tz=CST) -> float:
    return datetime(y, m, d, h, minute, tzinfo=tz).timestamp()


def ctx(now: float, **settings) -> CpuContext:
    return CpuContext("effective_time", now, {**SPEC.defaults, **settings})


def order(promise="standard", dates=(None,), presale=False, created_at=0.0) -> Order:
    lines = [Line(line_no=i, sku=f"SKU-{i}", qty=1, unit_price=1000, warehouse="WH-BJ", delivery_date=d)
             for i, d in enumerate(dates, start=1)]
    return Order(order_no="O1", source="app", external_id="app-1", kind="toc", member_id="M1",
                 consignee=Address(name="王伟", phone="13812345678", province="北京市", city="北京市", detail="x"),
                 lines=lines, amounts=Amounts(payable=1000 * len(lines)), delivery_promise=promise,
                 presale=presale, created_at=created_at)


def run(o: Order, now: float, **settings):
    return effective_time.handle(o, ctx(now, **settings))


def test_a_standard_order_is_released_at_once():
    now = local(2023, 11, 15, 6)
    o = order()
    outcome = run(o, now)
    assert outcome.kind == "next"
    assert o.results["effective_at"] == now


def test_next_day_with_a_date_parks_until_the_cutoff_of_the_day_before():
    o = order("next_day", ["2023-11-16"])
    outcome = run(o, local(2023, 11, 15, 9))
    assert outcome.kind == "park"
    assert outcome.until == local(2023, 11, 15, 20)
    assert outcome.reason == "effective at 2023-11-15T20:00:00+08:00"
    assert "effective_at" not in o.results


def test_a_parked_order_is_released_when_it_comes_back_at_its_time():
    o = order("next_day", ["2023-11-16"])
    until = run(o, local(2023, 11, 15, 9)).until
    assert run(o, until).kind == "next"
    assert o.results["effective_at"] == until


def test_next_day_without_a_date_goes_in_the_wave_after_it_was_placed():
    placed_morning = order("next_day", created_at=local(2023, 11, 15, 10))
    assert run(placed_morning, local(2023, 11, 15, 10, 1)).until == local(2023, 11, 15, 20)
    placed_late = order("next_day", created_at=local(2023, 11, 15, 21))
    assert run(placed_late, local(2023, 11, 15, 21, 1)).until == local(2023, 11, 16, 20)


def test_next_day_placed_exactly_at_the_cutoff_makes_that_wave():
    cutoff = local(2023, 11, 15, 20)
    o = order("next_day", created_at=cutoff)
    assert run(o, cutoff).kind == "next"


def test_next_day_without_a_placing_time_counts_from_now():
    assert run(order("next_day"), local(2023, 11, 15, 23)).until == local(2023, 11, 16, 20)


def test_cutoff_hour_and_timezone_come_from_settings():
    o = order("next_day", ["2023-11-16"])
    outcome = run(o, local(2023, 11, 15, 9), cutoff_hour=18, timezone_offset_hours=0)
    assert outcome.until == local(2023, 11, 15, 18, tz=timezone.utc)
    assert outcome.reason == "effective at 2023-11-15T18:00:00+00:00"


def test_scheduled_parks_until_lead_days_before_the_earliest_line_date():
    o = order("scheduled", ["2023-11-20", "2023-11-18", None])
    assert run(o, local(2023, 11, 15, 9)).until == local(2023, 11, 17, 8)
    assert run(o, local(2023, 11, 15, 9), lead_days=2, release_hour=6).until == local(2023, 11, 16, 6)


def test_scheduled_whose_release_has_passed_goes_on():
    o = order("scheduled", ["2023-11-16"])
    assert run(o, local(2023, 11, 15, 8)).kind == "next"
    assert o.results["effective_at"] == local(2023, 11, 15, 8)


def test_scheduled_without_a_date_goes_to_manual():
    outcome = run(order("scheduled"), local(2023, 11, 15, 9))
    assert outcome.kind == "manual"
    assert outcome.reason == "effective_time: scheduled order has no delivery date on its lines"


def test_a_malformed_delivery_date_goes_to_manual_naming_the_line():
    outcome = run(order("scheduled", ["2023-11-20", "20/11/2023"]), local(2023, 11, 15, 9))
    assert outcome.kind == "manual" and "line 2 has a malformed delivery_date '20/11/2023'" in outcome.reason


def test_presale_waits_for_the_arrival_date_whatever_the_promise():
    o = order("standard", ["2023-12-01"], presale=True)
    outcome = run(o, local(2023, 11, 15, 9))
    assert outcome.kind == "park" and outcome.until == local(2023, 11, 30, 8)
    assert run(o, local(2023, 11, 15, 9), presale_lead_days=3).until == local(2023, 11, 28, 8)


def test_presale_without_an_arrival_date_goes_to_manual():
    outcome = run(order("next_day", presale=True), local(2023, 11, 15, 9))
    assert outcome.kind == "manual" and "presale order has no delivery date" in outcome.reason


def test_an_unknown_promise_goes_to_manual():
    outcome = run(order("same_hour"), local(2023, 11, 15, 9))
    assert outcome.kind == "manual" and "unknown delivery promise 'same_hour'" in outcome.reason


@pytest.mark.parametrize("hour", [24, -1, "20"])
def test_a_bad_hour_setting_is_a_configuration_error(hour):
    with pytest.raises(PermanentError, match="cutoff_hour"):
        run(order("next_day", ["2023-11-16"]), local(2023, 11, 15, 9), cutoff_hour=hour)


def test_only_the_context_clock_is_read():
    o = order("scheduled", ["2023-11-20"])
    assert run(o, local(2023, 11, 19, 7, 59)).kind == "park"
    assert run(o, local(2023, 11, 19, 8)).kind == "next"
