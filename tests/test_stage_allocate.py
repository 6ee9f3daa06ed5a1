"""allocate: order-level amounts spread over the lines to the cent, never leaving a line negative."""
from __future__ import annotations

from fractions import Fraction

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oms_pipeline.generator import generate, to_order
from oms_pipeline.order import Address, Amounts, Line, Order, encode
from oms_pipeline.stage import CpuContext
from stages import allocate
from stages.allocate import AMOUNTS, DEDUCTIONS, largest_remainder

CTX = CpuContext("allocate", 1_700_000_000.0, dict(allocate.SPEC.defaults))


def line(no, price, qty=1, **kw) -> Line:
    return Line(line_no=no, sku=f"SKU-{no}", qty=qty, unit_price=price, **kw)


def order(lines, discount=0, coupon=0, points=0, freight=0, payable=None) -> Order:
    goods = sum(x.goods for x in lines)
    if payable is None:
        payable = goods - discount - coupon - points + freight
    return Order(order_no="O1", source="app", external_id="app-1", kind="toc", member_id="M1",
                 consignee=Address(name="王伟", phone="13812345678", province="北京市", city="北京市"),
                 lines=lines, amounts=Amounts(discount=discount, coupon=coupon, points=points, freight=freight,
                                              payable=payable))


def shares(o: Order, field: str) -> list[int]:
    return [getattr(x, field) for x in sorted(o.lines, key=lambda x: x.line_no)]


def assert_conserved(o: Order) -> None:
    for field in AMOUNTS + ("payable",):
        assert sum(shares(o, field)) == getattr(o.amounts, field), field
    for x in o.lines:
        assert x.payable == x.goods - x.discount - x.coupon - x.points + x.freight >= 0


# largest_remainder ------------------------------------------------------------------------------

def test_largest_remainder_gives_left_over_units_to_the_largest_fractions():
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]
    assert largest_remainder(100, [50, 30, 20]) == [50, 30, 20]
    assert largest_remainder(7, [2, 3, 5]) == [1, 2, 4]  # exact 1.4, 2.1, 3.5: the .5 gets the cent


def test_largest_remainder_breaks_ties_towards_the_lower_index():
    assert largest_remainder(2, [1, 1, 1]) == [1, 1, 0]
    assert largest_remainder(1, [3, 3]) == [1, 0]


def test_largest_remainder_gives_zero_weights_nothing():
    assert largest_remainder(5, [0, 1, 0, 1]) == [0, 3, 0, 2]
    assert largest_remainder(0, [0, 0]) == [0, 0]


@pytest.mark.parametrize("total, weights", [(1, [0, 0]), (1, []), (-1, [1]), (1, [2, -1])])
def test_largest_remainder_refuses_what_cannot_be_spread(total, weights):
    with pytest.raises(ValueError):
        largest_remainder(total, weights)


@given(st.integers(0, 10**9), st.lists(st.integers(0, 10**7), min_size=1, max_size=12).filter(any))
def test_largest_remainder_sums_exactly_and_each_share_is_within_one_unit(total, weights):
    result = largest_remainder(total, weights)
    assert sum(result) == total
    for share, w in zip(result, weights):
        assert abs(share * sum(weights) - total * w) < sum(weights)


# the stage --------------------------------------------------------------------------------------

def test_amounts_are_spread_by_goods_and_sum_to_the_order_totals():
    o = order([line(1, 6000), line(2, 3000), line(3, 1000)], discount=1000, coupon=500, points=99, freight=800)
    assert allocate.handle(o, CTX).kind == "next"
    assert shares(o, "discount") == [600, 300, 100]
    assert shares(o, "coupon") == [300, 150, 50]
    assert shares(o, "points") == [59, 30, 10]  # 59.4, 29.7, 9.9: the left-over cent goes to .9
    assert shares(o, "freight") == [480, 240, 80]
    assert shares(o, "payable") == [5521, 2760, 920]
    assert_conserved(o)


def test_gift_lines_at_zero_price_get_no_share():
    o = order([line(1, 3333), line(2, 0, gift_of=1), line(3, 6667)], discount=1001, freight=600)
    assert allocate.handle(o, CTX).kind == "next"
    gift = o.lines[1]
    assert (gift.discount, gift.coupon, gift.points, gift.freight, gift.payable) == (0, 0, 0, 0, 0)
    assert_conserved(o)


def test_freight_goes_to_physical_lines_only():
    o = order([line(1, 5000, virtual=True), line(2, 2000), line(3, 3000)], freight=1001)
    assert allocate.handle(o, CTX).kind == "next"
    assert shares(o, "freight") == [0, 400, 601]


def test_freight_on_an_all_virtual_order_goes_to_manual():
    outcome = allocate.handle(order([line(1, 5000, virtual=True)], freight=600), CTX)
    assert outcome.kind == "manual"
    assert "freight 600" in outcome.reason and "virtual" in outcome.reason


def test_an_all_virtual_order_without_freight_is_allocated():
    o = order([line(1, 10000, virtual=True, qty=2), line(2, 20000, virtual=True)], discount=3)
    assert allocate.handle(o, CTX).kind == "next"
    assert shares(o, "discount") == [2, 1]


def test_deductions_on_an_order_without_goods_go_to_manual():
    outcome = allocate.handle(order([line(1, 0)], coupon=100, freight=200, payable=100), CTX)
    assert outcome.kind == "manual" and "coupon 100 but no line has goods" in outcome.reason


def test_a_negative_order_amount_goes_to_manual():
    outcome = allocate.handle(order([line(1, 1000)], discount=-5), CTX)
    assert outcome.kind == "manual" and "negative discount -5" in outcome.reason


def test_rounded_up_cents_never_stack_a_line_below_zero():
    # Three 1-cent lines: on its own, largest remainder gives both the discount and the coupon
    # cent to line 1 (tie to the lowest line) and line 1 would pay -1.
    o = order([line(1, 1), line(2, 1), line(3, 1)], discount=1, coupon=1)
    assert allocate.handle(o, CTX).kind == "next"
    assert shares(o, "payable") == [0, 0, 1]
    assert_conserved(o)


def test_a_virtual_line_whose_deductions_exceed_its_goods_goes_to_manual():
    # Deductions above the goods are covered only by freight, which virtual lines do not carry.
    o = order([line(1, 1000, virtual=True), line(2, 1000)], discount=300, coupon=2000, freight=600)
    outcome = allocate.handle(o, CTX)
    assert outcome.kind == "manual"
    assert "line 1 (SKU-1) would have payable -150" in outcome.reason
    assert shares(o, "payable") == [0, 0], "a refused allocation leaves the lines untouched"


def test_order_payable_that_disagrees_with_its_terms_goes_to_manual():
    outcome = allocate.handle(order([line(1, 1000)], discount=100, payable=1000), CTX)
    assert outcome.kind == "manual"
    assert "lines add up to payable 900 but the order's payable is 1000" in outcome.reason


def test_ties_go_to_the_lower_line_number_whatever_the_list_order():
    o = order([line(3, 100), line(1, 100), line(2, 100)], discount=2)
    allocate.handle(o, CTX)
    assert shares(o, "discount") == [1, 1, 0]


def test_running_again_gives_the_same_allocation():
    o = order([line(1, 777, qty=3), line(2, 1234), line(3, 99, qty=7)], discount=333, coupon=500, freight=600)
    allocate.handle(o, CTX)
    first = encode(o)
    allocate.handle(o, CTX)
    assert encode(o) == first


def test_every_generated_order_that_passes_risk_check_is_allocated():
    for i, request in enumerate(generate(1500, seed=5)):
        o = to_order(request, f"O{i}", 1_700_000_000.0)
        if max(o.amounts.discount, o.amounts.coupon, o.amounts.points) > o.goods:
            continue  # risk_check sends these to manual before allocate
        assert allocate.handle(o, CTX).kind == "next", request
        assert_conserved(o)


# properties -------------------------------------------------------------------------------------

@st.composite
def orders(draw) -> Order:
    n = draw(st.integers(1, 8))
    top = draw(st.sampled_from([3, 50_000]))  # tiny prices make rounded-up cents collide on one line
    lines = [line(i + 1, draw(st.integers(0, top)), qty=draw(st.integers(1, 5)), virtual=draw(st.booleans()))
             for i in range(n)]
    goods = sum(x.goods for x in lines)
    physical = sum(x.goods for x in lines if not x.virtual)
    freight = draw(st.integers(0, 2_000)) if physical else 0
    # Exact line payables stay >= 0: deductions may eat into freight only when every line carries some.
    room = goods + freight if all(not x.virtual for x in lines) else goods
    discount = draw(st.integers(0, min(goods, room)))
    coupon = draw(st.integers(0, min(goods, room - discount)))
    points = draw(st.integers(0, min(goods, room - discount - coupon)))
    return order(draw(st.permutations(lines)), discount, coupon, points, freight)  # list order must not matter


@settings(max_examples=400, deadline=None)
@given(orders())
def test_allocation_sums_to_the_cent_with_no_negative_line_and_fair_shares(o):
    assert allocate.handle(o, CTX).kind == "next"
    assert_conserved(o)
    goods = sum(x.goods for x in o.lines)
    physical = sum(x.goods for x in o.lines if not x.virtual)
    for x in o.lines:
        for field in DEDUCTIONS:
            exact = Fraction(getattr(o.amounts, field) * x.goods, goods) if goods else 0
            assert abs(getattr(x, field) - exact) < 1, (field, x)
        exact = Fraction(o.amounts.freight * (0 if x.virtual else x.goods), physical) if physical else 0
        assert abs(x.freight - exact) < 1, ("freight", x)


@settings(max_examples=100, deadline=None)
@given(orders())
def test_allocation_is_a_pure_function_of_the_order(o):
    twin = msgspec.json.decode(encode(o), type=Order)
    allocate.handle(o, CTX)
    allocate.handle(twin, CTX)
    assert encode(o) == encode(twin)
