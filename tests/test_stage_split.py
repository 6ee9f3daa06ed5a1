"""split: child orders by warehouse, zone, supplier and date, conserving every cent."""
from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oms_pipeline import flags
from oms_pipeline.generator import generate, to_order
from oms_pipeline.order import ZONES, Address, Amounts, Line, Order, encode
from oms_pipeline.outcome import PermanentError
from oms_pipeline.stage import CpuContext
from stages import allocate, split
from stages.split import SPLIT_KEYS

NOW = 1_700_000_000.0
AMOUNT_FIELDS = tuple(Amounts.__struct_fields__)


def ctx(**settings) -> CpuContext:
    return CpuContext("split", NOW, {**split.SPEC.defaults, **settings})


def line(no, price=1000, wh="WH-BJ", zone="ambient", **kw) -> Line:
    return Line(line_no=no, sku=f"SKU-{no}", qty=1, unit_price=price, warehouse=wh, zone=zone, **kw)


def allocated(lines, discount=0, coupon=0, points=0, freight=0, paid=None, **fields) -> Order:
    """An order whose amounts have been spread over its lines, as split expects."""
    goods = sum(x.goods for x in lines)
    payable = goods - discount - coupon - points + freight
    amounts = Amounts(discount=discount, coupon=coupon, points=points, freight=freight, payable=payable,
                      paid=payable if paid is None else paid, cash=payable if paid is None else paid)
    fields = {"source": "app", "kind": "toc", **fields}
    o = Order(order_no="P123", external_id="app-9", member_id="M7",
              consignee=Address(name="王伟", phone="13812345678", province="北京市", city="北京市", detail="建设路1号"),
              lines=lines, amounts=amounts, status="PAID", created_at=NOW - 60, timestamps={"PAID": NOW - 30},
              **fields)
    o.flags = flags.derive(o)
    assert allocate.handle(o, CpuContext("allocate", NOW, {})).kind == "next"
    return o


def children_of(o: Order, **settings) -> list[Order]:
    outcome = split.handle(o, ctx(**settings))
    assert outcome.kind == "split", outcome
    return list(outcome.children)


def line_nos(children) -> list[list[int]]:
    return [[x.line_no for x in c.lines] for c in children]


def assert_conserved(parent: Order, children: list[Order]) -> None:
    for field in AMOUNT_FIELDS:
        assert sum(getattr(c.amounts, field) for c in children) == getattr(parent.amounts, field), field
    assert sorted(x.line_no for c in children for x in c.lines) == sorted(x.line_no for x in parent.lines)
    for c in children:
        for field in ("discount", "coupon", "points", "freight", "payable"):
            assert getattr(c.amounts, field) == sum(getattr(x, field) for x in c.lines), field


def test_an_order_that_ships_as_one_is_not_split():
    o = allocated([line(1), line(2, price=500)])
    assert split.handle(o, ctx()).kind == "next"
    assert o.results["split"] == "single"


def test_lines_from_two_warehouses_become_two_children_numbered_from_1():
    o = allocated([line(1, wh="WH-SH"), line(2, wh="WH-BJ"), line(3, wh="WH-SH")], discount=300, freight=600)
    children = children_of(o)
    assert [c.order_no for c in children] == ["P123-1", "P123-2"]
    assert [c.external_id for c in children] == ["app-9#1", "app-9#2"]
    assert line_nos(children) == [[1, 3], [2]]
    assert o.results["split"] == ["P123-1", "P123-2"]
    assert_conserved(o, children)


@pytest.mark.parametrize("field, values", [
    ("zone", ("ambient", "frozen_low")),
    ("supplier", ("", "SUP-01")),
    ("delivery_date", ("2023-11-20", "2023-11-21")),
])
def test_zone_supplier_and_delivery_date_each_separate_children(field, values):
    o = allocated([line(1, **{field: values[0]}), line(2, **{field: values[1]}), line(3, **{field: values[0]})])
    assert line_nos(children_of(o)) == [[1, 3], [2]]


def test_every_one_of_the_five_zones_ships_apart():
    o = allocated([line(i + 1, zone=zone) for i, zone in enumerate(ZONES)])
    assert line_nos(children_of(o)) == [[1], [2], [3], [4], [5]]


def test_a_child_carries_the_parents_order_fields_and_only_its_parent_in_results():
    """Of the parent's results a child carries its number and what it pays (audit scores the
    customer's order as a whole), nothing the stages before split produced."""
    o = allocated([line(1), line(2, zone="chilled_low")], remark="周末送货", invoice_title="个人",
                  delivery_promise="scheduled", payment_method="mixed", source="mini", kind="third_party",
                  presale=True)
    o.results["risk_check"] = "ok"
    for child in children_of(o):
        for field in ("member_id", "consignee", "kind", "source", "payment_method", "remark", "invoice_title",
                      "delivery_promise", "presale", "status", "created_at", "timestamps"):
            assert getattr(child, field) == getattr(o, field), field
        assert child.parent_no == "P123"
        assert child.results == {"parent": "P123", "parent_payable": o.amounts.payable}
        assert child.consignee is not o.consignee


def test_a_gift_stays_with_its_main_line_whatever_its_own_zone():
    o = allocated([line(1, wh="WH-SH"), line(2, wh="WH-BJ"), line(3, price=0, wh="", zone="frozen_low", gift_of=2)])
    assert line_nos(children_of(o)) == [[1], [2, 3]]


def test_bundle_components_stay_together_with_their_bundle():
    o = allocated([line(1), line(2, price=0, wh="WH-SH"),
                   line(3, price=0, zone="chilled_high", bundle_of=2), line(4, price=0, zone="frozen_low", bundle_of=2),
                   line(5, zone="frozen_low")])
    o.lines[1].bundle = True
    assert line_nos(children_of(o)) == [[1], [2, 3, 4], [5]]


def test_components_whose_bundle_line_is_gone_still_ship_together():
    o = allocated([line(1), line(3, zone="chilled_high", bundle_of=2), line(4, zone="frozen_low", bundle_of=2)])
    assert line_nos(children_of(o)) == [[1], [3, 4]]


def test_virtual_lines_go_into_one_virtual_child_whatever_their_warehouse():
    o = allocated([line(1, virtual=True, wh=""), line(2), line(3, virtual=True, wh="WH-SH")], freight=600)
    children = children_of(o)
    assert line_nos(children) == [[1, 3], [2]]
    assert flags.has(children[0].flags, "virtual") and not flags.has(children[1].flags, "virtual")
    assert children[0].amounts.freight == 0
    assert_conserved(o, children)


def test_paid_is_apportioned_by_the_childrens_payable_to_the_cent():
    o = allocated([line(1, price=1001), line(2, price=1001, wh="WH-SH"), line(3, price=1001, wh="WH-GZ")],
                  discount=1)
    o.amounts.non_cash, o.amounts.cash = 1000, 1002
    children = children_of(o)
    assert [c.amounts.payable for c in children] == [1000, 1001, 1001]
    assert [c.amounts.paid for c in children] == [1000, 1001, 1001]
    assert sum(c.amounts.non_cash for c in children) == 1000
    assert sum(c.amounts.cash for c in children) == 1002
    assert_conserved(o, children)


def test_unpaid_parent_gives_unpaid_children():
    o = allocated([line(1), line(2, wh="WH-SH")], paid=0)
    assert [c.amounts.paid for c in children_of(o)] == [0, 0]


def test_child_flags_are_derived_from_the_childs_own_lines():
    o = allocated([line(1, price=600_000), line(2, zone="frozen_low", wh="WH-SH"),
                   line(3, price=0, gift_of=2, wh="WH-SH")])
    assert flags.has(o.flags, "valuable") and flags.value(o.flags, "cold_chain") == "2"
    first, second = children_of(o)
    assert flags.has(first.flags, "valuable") and not flags.has(first.flags, "cold_chain")
    assert not flags.has(second.flags, "valuable") and flags.value(second.flags, "cold_chain") == "2"
    assert flags.has(second.flags, "gift") and not flags.has(first.flags, "gift")


def test_invoice_and_remark_flags_are_kept_from_the_parent():
    o = allocated([line(1), line(2, wh="WH-SH")])
    o.flags = flags.set_flag(flags.set_flag(o.flags, "invoice"), "remark")  # set upstream, not from fields
    for child in children_of(o):
        assert flags.has(child.flags, "invoice") and flags.has(child.flags, "remark")


def test_a_replayed_split_builds_the_same_children():
    o = allocated([line(3, wh="WH-SH"), line(1), line(2, zone="chilled_low")], discount=7, coupon=500, freight=800)
    first = [encode(c) for c in children_of(o)]
    assert [encode(c) for c in children_of(o)] == first


def test_lines_not_yet_allocated_go_to_manual():
    o = allocated([line(1), line(2, wh="WH-SH")], discount=100)
    o.lines[0].discount = 0
    outcome = split.handle(o, ctx())
    assert outcome.kind == "manual"
    assert "lines' discount add up to 50, not the order's 100 (allocate must run first)" in outcome.reason


def test_the_split_keys_come_from_settings():
    o = allocated([line(1), line(2, zone="frozen_low"), line(3, wh="WH-SH")])
    assert line_nos(children_of(o, keys=["warehouse"])) == [[1, 2], [3]]


def test_an_unknown_split_key_is_a_configuration_error():
    with pytest.raises(PermanentError, match="unknown split keys"):
        split.handle(allocated([line(1)]), ctx(keys=["colour"]))


def test_generated_orders_split_conserving_every_amount():
    seen = Counter()
    for i, request in enumerate(generate(1500, seed=13)):
        o = to_order(request, f"O{i}", NOW)
        if max(o.amounts.discount, o.amounts.coupon, o.amounts.points) > o.goods:
            continue  # risk_check sends these to manual
        o.amounts.paid = o.amounts.payable if o.payment_method in ("online", "mixed") else 0
        assert allocate.handle(o, CpuContext("allocate", NOW, {})).kind == "next"
        outcome = split.handle(o, ctx())
        seen[outcome.kind] += 1
        if outcome.kind == "split":
            assert_conserved(o, list(outcome.children))
    assert seen["split"] > 100 and seen["next"] > 100


# properties -------------------------------------------------------------------------------------

@st.composite
def orders(draw) -> Order:
    n = draw(st.integers(1, 10))
    lines = []
    for no in range(1, n + 1):
        kind = draw(st.sampled_from(["main", "main", "gift", "component"])) if no > 1 else "main"
        anchor = draw(st.integers(1, no - 1)) if kind != "main" else None
        lines.append(Line(
            line_no=no, sku=f"SKU-{no}", qty=draw(st.integers(1, 3)),
            unit_price=0 if kind == "gift" else draw(st.integers(0, 30_000)),
            warehouse=draw(st.sampled_from(["WH-BJ", "WH-SH", ""])), zone=draw(st.sampled_from(ZONES)),
            supplier=draw(st.sampled_from(["", "", "SUP-01"])), virtual=draw(st.booleans()),
            delivery_date=draw(st.sampled_from([None, "2023-11-20", "2023-11-22"])),
            gift_of=anchor if kind == "gift" else None, bundle_of=anchor if kind == "component" else None))
    goods = sum(x.goods for x in lines)
    physical = any(not x.virtual and x.goods for x in lines)
    discount = draw(st.integers(0, goods // 2))
    coupon = draw(st.integers(0, goods - discount))
    freight = draw(st.integers(0, 1_200)) if physical else 0
    paid_all = draw(st.booleans())
    o = allocated(draw(st.permutations(lines)), discount=discount, coupon=coupon, freight=freight, paid=0)
    if paid_all:
        o.amounts.paid = o.amounts.payable
        o.amounts.non_cash = draw(st.integers(0, o.amounts.payable))
        o.amounts.cash = o.amounts.payable - o.amounts.non_cash
    return o


@settings(max_examples=300, deadline=None)
@given(orders())
def test_split_conserves_every_amount_and_puts_every_line_in_exactly_one_child(o):
    outcome = split.handle(o, ctx())
    if outcome.kind == "next":
        assert len(split.groups(o.lines)) == 1
        return
    assert outcome.kind == "split"
    children = list(outcome.children)
    assert_conserved(o, children)
    counts = Counter(x.line_no for c in children for x in c.lines)
    assert set(counts.values()) == {1}
    home = {x.line_no: c.order_no for c in children for x in c.lines}
    for x in o.lines:
        for anchor in (x.gift_of, x.bundle_of):
            if anchor is not None:
                assert home[x.line_no] == home[anchor], "a gift or component left its line"
    for c in children:
        keys = {("virtual",) if x.virtual else (x.warehouse, x.zone, x.supplier, x.delivery_date or "")
                for x in c.lines if x.gift_of is None and x.bundle_of is None}
        assert len(keys) <= 1, "one child mixes warehouses, zones, suppliers, dates or virtual goods"
        assert all(x >= 0 for x in (c.amounts.paid, c.amounts.cash, c.amounts.non_cash))
        assert c.amounts.paid <= c.amounts.payable


def test_split_keys_are_the_documented_ones():
    assert SPLIT_KEYS == ("warehouse", "zone", "supplier", "delivery_date")
