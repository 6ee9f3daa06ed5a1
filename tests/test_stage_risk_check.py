"""risk_check: inconsistent amounts or an unusable address stop the order with the reason."""
from __future__ import annotations

import pytest

from oms_pipeline.generator import generate, to_order
from oms_pipeline.order import Address, Amounts, Line, Order
from oms_pipeline.stage import CpuContext
from stages import risk_check
from stages.risk_check import SPEC

NOW = 1_700_000_000.0


def ctx(**settings) -> CpuContext:
    return CpuContext("risk_check", NOW, {**SPEC.defaults, **settings})


def order(lines=None, address=None, **amounts) -> Order:
    lines = lines or [Line(line_no=1, sku="SKU-1", qty=2, unit_price=1500),
                      Line(line_no=2, sku="SKU-2", qty=1, unit_price=2000)]
    goods = sum(line.goods for line in lines)
    a = {"discount": 0, "coupon": 0, "points": 0, "freight": 0, **amounts}
    a.setdefault("payable", goods - a["discount"] - a["coupon"] - a["points"] + a["freight"])
    address = address or Address(name="王伟", phone="13812345678", province="北京市", city="北京市",
                                 district="朝阳区", detail="建设路12号")
    return Order(order_no="O1", source="app", external_id="app-1", kind="toc", member_id="M1",
                 consignee=address, lines=lines, amounts=Amounts(**a))


def address(**changes) -> Address:
    base = {"name": "王伟", "phone": "13812345678", "province": "北京市", "city": "北京市",
            "district": "朝阳区", "detail": "建设路12号", "pickup_point": None}
    return Address(**{**base, **changes})


def reason(o: Order, **settings) -> str:
    outcome = risk_check.handle(o, ctx(**settings))
    assert outcome.kind == "manual", outcome
    assert outcome.reason.startswith("risk_check: ")
    return outcome.reason


def test_consistent_order_passes_and_is_marked_ok():
    o = order(discount=500, coupon=300, points=100, freight=800)
    assert risk_check.handle(o, ctx()).kind == "next"
    assert o.results["risk_check"] == "ok"


def test_generated_orders_with_deductions_within_goods_pass():
    checked = 0
    for i, request in enumerate(generate(800, seed=21)):
        o = to_order(request, f"O{i}", NOW)
        a = o.amounts
        if max(a.discount, a.coupon, a.points) > o.goods:
            continue  # the generator lets a coupon eat into freight; risk_check refuses those
        assert risk_check.handle(o, ctx()).kind == "next", (request, o.amounts)
        checked += 1
    assert checked > 700


def test_payable_that_does_not_add_up_names_every_term():
    text = reason(order(discount=500, freight=800, payable=5000))
    assert "payable 5000 != goods 5000 - discount 500 - coupon 0 - points 0 + freight 800 = 5300" in text


@pytest.mark.parametrize("field", ["discount", "coupon", "points", "freight", "paid", "non_cash", "cash"])
def test_a_negative_amount_is_refused(field):
    o = order()
    setattr(o.amounts, field, -1)
    assert f"negative {field} -1" in reason(o)


@pytest.mark.parametrize("field", ["discount", "coupon", "points"])
def test_a_deduction_above_the_goods_is_refused_even_when_freight_covers_it(field):
    # goods 5000, freight 800: payable stays >= 0, but the deduction itself is over the goods
    text = reason(order(freight=800, **{field: 5001}))
    assert f"{field} 5001 exceeds goods total 5000" in text


def test_a_deduction_equal_to_the_goods_is_allowed():
    assert risk_check.handle(order(discount=5000), ctx()).kind == "next"


@pytest.mark.parametrize("qty", [0, -1])
def test_a_line_without_positive_qty_is_refused(qty):
    lines = [Line(line_no=1, sku="SKU-1", qty=qty, unit_price=100)]
    assert f"line 1 (SKU-1): qty {qty} must be positive" in reason(order(lines))


def test_a_negative_unit_price_is_refused():
    lines = [Line(line_no=1, sku="SKU-1", qty=1, unit_price=-100), Line(line_no=2, sku="SKU-2", qty=1, unit_price=900)]
    assert "line 1 (SKU-1): negative unit price -100" in reason(order(lines))


def test_an_order_without_lines_is_refused():
    o = order()
    o.lines = []
    o.amounts = Amounts()
    assert "order has no lines" in reason(o)


def test_paid_above_payable_is_refused():
    o = order()
    o.amounts.paid = o.amounts.payable + 1
    assert "paid 5001 exceeds payable 5000" in reason(o)


@pytest.mark.parametrize("field", ["name", "province", "city"])
def test_an_address_missing_a_required_part_is_refused(field):
    assert f"address has no {field}" in reason(order(address=address(**{field: "  "})))


@pytest.mark.parametrize("phone", ["12345", "1" * 21, "138-1234-567x", ""])
def test_a_phone_without_6_to_20_digits_is_refused(phone):
    assert "phone must have 6-20 digits" in reason(order(address=address(phone=phone)))


@pytest.mark.parametrize("phone", ["+86 138-1234-5678", "(010) 6552 1234", "123456", "1" * 20])
def test_a_phone_with_separators_and_6_to_20_digits_passes(phone):
    assert risk_check.handle(order(address=address(phone=phone)), ctx()).kind == "next"


def test_phone_digit_bounds_come_from_settings():
    assert "phone must have 11-11 digits" in reason(order(address=address(phone="123456")),
                                                    phone_min_digits=11, phone_max_digits=11)


def test_a_delivery_needs_a_street_detail():
    assert "no detail" in reason(order(address=address(detail="")))


def test_an_o2o_pickup_needs_no_street_detail():
    o = order(address=address(detail="", pickup_point="PP-BJ-03"))
    assert risk_check.handle(o, ctx()).kind == "next"


def test_a_province_outside_the_served_regions_is_refused():
    assert "province '西藏自治区' is not in the served regions" in reason(order(address=address(province="西藏自治区")))


def test_served_regions_come_from_settings_and_empty_means_everywhere():
    far = order(address=address(province="西藏自治区"))
    assert risk_check.handle(far, ctx(served_provinces=["西藏自治区"])).kind == "next"
    assert risk_check.handle(far, ctx(served_provinces=[])).kind == "next"
    assert "not in the served regions" in reason(order(), served_provinces=["上海市"])


def test_amount_problems_are_reported_before_address_problems():
    o = order(address=address(name=""), payable=1)
    assert "payable 1 !=" in reason(o)


def test_a_refused_order_is_not_marked_ok():
    o = order(payable=1)
    risk_check.handle(o, ctx())
    assert "risk_check" not in o.results
