from __future__ import annotations

import pytest

from oms_pipeline import states as s
from oms_pipeline.order import KINDS, Address, Amounts, Line, Order


def make_order(kind: str = "toc", payment_method: str = "online", payable: int = 1000) -> Order:
    return Order(order_no="100000000000000001", source="app", external_id="e", kind=kind,
                 member_id="M1", payment_method=payment_method,
                 consignee=Address(name="张伟", phone="13800000000", province="北京市", city="北京市"),
                 lines=[Line(line_no=1, sku="SKU-000001", qty=1, unit_price=payable)],
                 amounts=Amounts(payable=payable))


def walk(order: Order, *path: str) -> list[s.Event]:
    return [s.transition(order, state, at=float(i)) for i, state in enumerate(path, start=1)]


FULFIL = (s.IN_FULFILMENT, s.DISPATCHED, s.SHIPPED, s.DELIVERED, s.COMPLETED)


@pytest.mark.parametrize("kind", ["tob", "third_party", "reissue", "exchange", "pullback"])
def test_kinds_without_payment_go_straight_to_fulfilment(kind):
    order = make_order(kind, "none")
    assert s.initial_state(order) == s.IN_FULFILMENT
    walk(order, *FULFIL)
    assert order.status == s.COMPLETED
    with pytest.raises(s.IllegalTransition):
        s.transition(make_order(kind, "none"), s.WAIT_PAY, 1.0)


@pytest.mark.parametrize("method", ["online", "mixed"])
def test_toc_online_happy_path_goes_via_wait_pay(method):
    order = make_order("toc", method)
    assert s.initial_state(order) == s.WAIT_PAY
    events = walk(order, s.WAIT_PAY, s.PAID, *FULFIL)
    assert [e.to_state for e in events] == [s.WAIT_PAY, s.PAID, *FULFIL]
    assert list(order.timestamps) == [e.to_state for e in events]


def test_toc_cod_skips_wait_pay_and_pays_at_delivery():
    order = make_order("toc", "cod")
    assert s.initial_state(order) == s.IN_FULFILMENT
    assert s.legal_targets(order, s.CREATED) == {s.IN_FULFILMENT, s.CANCELLED}
    walk(order, *FULFIL)
    with pytest.raises(s.IllegalTransition):
        s.transition(make_order("toc", "cod"), s.WAIT_PAY, 1.0)


def test_transition_records_timestamp_and_returns_event():
    order = make_order()
    event = s.transition(order, s.WAIT_PAY, at=123.5)
    assert event == s.Event(order_no=order.order_no, from_state=s.CREATED, to_state=s.WAIT_PAY,
                            at=123.5, kind="toc")
    assert order.status == s.WAIT_PAY and order.timestamps == {s.WAIT_PAY: 123.5}
    with pytest.raises(AttributeError):
        event.at = 0.0  # events are immutable


def test_illegal_transition_names_kind_and_states_and_changes_nothing():
    order = make_order()
    walk(order, s.WAIT_PAY)
    with pytest.raises(s.IllegalTransition, match=r"kind toc\): WAIT_PAY -> SHIPPED") as err:
        s.transition(order, s.SHIPPED, 9.0)
    assert isinstance(err.value, ValueError)
    assert (err.value.kind, err.value.from_state, err.value.to_state) == ("toc", s.WAIT_PAY, s.SHIPPED)
    assert order.status == s.WAIT_PAY and s.SHIPPED not in order.timestamps


def test_unknown_target_state_is_illegal():
    with pytest.raises(s.IllegalTransition):
        s.transition(make_order(), "PAYING", 1.0)


def test_terminal_states_have_no_way_out():
    assert {st for st in s.STATES if s.is_terminal(st)} == {s.COMPLETED, s.CANCELLED, s.REFUNDED}
    for key in s.TABLES:
        for state in s.TERMINAL:
            assert s.legal_targets(key, state) == frozenset()


def test_every_non_terminal_state_can_move_and_every_target_is_a_known_state():
    for key, table in s.TABLES.items():
        for state, targets in table.items():
            assert state in s.STATES and targets <= set(s.STATES), key
            assert targets or s.is_terminal(state), (key, state)


def test_every_kind_has_a_table():
    for kind in KINDS:
        assert s.legal_targets(kind, s.CREATED)
    with pytest.raises(KeyError, match="no state table"):
        s.legal_targets("barter", s.CREATED)


def test_unpaid_order_cancels_directly_paid_one_via_request():
    unpaid = make_order()
    walk(unpaid, s.WAIT_PAY, s.CANCELLED)
    paid = make_order()
    walk(paid, s.WAIT_PAY, s.PAID)
    with pytest.raises(s.IllegalTransition):
        s.transition(paid, s.CANCELLED, 3.0)
    walk(paid, s.CANCEL_REQUESTED, s.CANCELLED)


def test_cancel_after_dispatch_intercepts_then_becomes_a_return_if_too_late():
    order = make_order("tob", "none")
    walk(order, s.IN_FULFILMENT, s.DISPATCHED, s.INTERCEPTING, s.RETURN_REQUESTED, s.RETURNED,
         s.REFUNDED)
    assert s.is_terminal(order.status)


def test_rejected_cod_parcel_closes_without_refund_service_orders_too():
    cod = make_order("toc", "cod")
    walk(cod, s.IN_FULFILMENT, s.DISPATCHED, s.SHIPPED, s.REJECTED, s.RETURNED, s.CANCELLED)
    reissue = make_order("reissue", "none")
    walk(reissue, s.IN_FULFILMENT, s.DISPATCHED, s.SHIPPED, s.DELIVERED, s.RETURN_REQUESTED,
         s.RETURNED)
    assert s.legal_targets(reissue, s.RETURNED) == {s.CANCELLED}


def test_fulfilment_detours_come_back():
    order = make_order("exchange", "none")
    walk(order, s.IN_FULFILMENT, s.MANUAL_REVIEW, s.IN_FULFILMENT, s.PARKED, s.IN_FULFILMENT,
         s.SPLIT, s.COMPLETED)


def test_tabs_follow_the_order_through_its_life():
    order = make_order()
    seen = [s.tab(order)]
    for state in (s.WAIT_PAY, s.PAID, s.IN_FULFILMENT, s.DISPATCHED, s.SHIPPED, s.DELIVERED):
        if state == s.PAID:
            order.amounts.paid = order.amounts.payable
        s.transition(order, state, 1.0)
        seen.append(s.tab(order))
    assert seen == ["to_pay", "to_pay", "to_ship", "to_ship", "to_ship", "to_receive", "to_review"]
    order.results["reviewed"] = True
    assert s.tab(order) == "closed"


def test_tab_uses_payment_status_not_only_order_status():
    order = make_order()
    walk(order, s.WAIT_PAY)
    order.amounts.paid = order.amounts.payable  # payment arrived, state not yet moved
    assert s.tab(order) == "to_ship"


def test_orders_needing_no_prepayment_are_never_to_pay():
    for kind, method in [("toc", "cod"), ("tob", "none"), ("third_party", "none")]:
        assert s.tab(make_order(kind, method)) == "to_ship"


def test_cancelled_tab_depends_on_whether_money_was_paid():
    unpaid = make_order()
    walk(unpaid, s.WAIT_PAY, s.CANCELLED)
    assert s.tab(unpaid) == "closed"
    paid = make_order()
    walk(paid, s.WAIT_PAY, s.PAID, s.CANCEL_REQUESTED)
    paid.amounts.paid = 1000
    assert s.tab(paid) == "after_sales"
    s.transition(paid, s.CANCELLED, 5.0)
    assert s.tab(paid) == "after_sales"


@pytest.mark.parametrize("state", [s.CANCEL_REQUESTED, s.INTERCEPTING, s.RETURN_REQUESTED,
                                   s.RETURNED, s.REJECTED, s.REFUNDED])
def test_reverse_states_show_under_after_sales(state):
    order = make_order()
    order.status = state
    assert s.tab(order) == "after_sales"
