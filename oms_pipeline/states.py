"""The order state machine: result states, per order kind (DESIGN R-3, seed 004).

States name what has happened (PAID, not PAYING): an order only moves when a
step has finished. Each kind has its own transition table because kinds differ
in how money moves: ToC online orders wait for payment; COD collects it at
delivery; ToB and third-party orders are settled on account later (seed 001),
so a return there is credited (REFUNDED); reissue, exchange and pull-back
orders carry no money, so a return just closes them (CANCELLED).

The after-sales window sits between DELIVERED and COMPLETED: returns are
requested while DELIVERED, and COMPLETED is reached when the window closes, so
terminal states (COMPLETED, CANCELLED, REFUNDED) are absorbing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import msgspec

if TYPE_CHECKING:
    from .order import Order

# Forward states.
CREATED = "CREATED"
WAIT_PAY = "WAIT_PAY"
PAID = "PAID"
IN_FULFILMENT = "IN_FULFILMENT"
SPLIT = "SPLIT"  # a parent whose children flow on; it follows them
MANUAL_REVIEW = "MANUAL_REVIEW"
PARKED = "PARKED"  # waiting for a time (effective time, flow window)
DISPATCHED = "DISPATCHED"  # handed to WMS or the supplier
SHIPPED = "SHIPPED"
DELIVERED = "DELIVERED"
COMPLETED = "COMPLETED"
CANCELLED = "CANCELLED"
# Reverse states.
CANCEL_REQUESTED = "CANCEL_REQUESTED"
INTERCEPTING = "INTERCEPTING"  # dispatched; WMS / supplier asked to stop it
RETURN_REQUESTED = "RETURN_REQUESTED"
RETURNED = "RETURNED"  # goods back in the warehouse
REFUNDED = "REFUNDED"
REJECTED = "REJECTED"  # refused by the consignee at delivery (拒收)

STATES = (CREATED, WAIT_PAY, PAID, IN_FULFILMENT, SPLIT, MANUAL_REVIEW, PARKED, DISPATCHED,
          SHIPPED, DELIVERED, COMPLETED, CANCELLED, CANCEL_REQUESTED, INTERCEPTING,
          RETURN_REQUESTED, RETURNED, REFUNDED, REJECTED)
TERMINAL = frozenset({COMPLETED, CANCELLED, REFUNDED})

Table = Mapping[str, frozenset[str]]


def _table(**edges: tuple[str, ...]) -> dict[str, frozenset[str]]:
    return {state: frozenset(targets) for state, targets in edges.items()}


# Fulfilment and the reverse flow, shared by every kind. A cancel before
# dispatch stops the pipeline; after dispatch WMS is asked to intercept; once
# the goods are out, the cancel becomes a return (seed 001 "逆向").
_FULFILMENT = _table(
    IN_FULFILMENT=(SPLIT, MANUAL_REVIEW, PARKED, DISPATCHED, CANCEL_REQUESTED),
    MANUAL_REVIEW=(IN_FULFILMENT, CANCEL_REQUESTED),
    PARKED=(IN_FULFILMENT, CANCEL_REQUESTED),
    SPLIT=(DISPATCHED, COMPLETED, CANCELLED, CANCEL_REQUESTED),  # follows its children
    DISPATCHED=(SHIPPED, INTERCEPTING),
    SHIPPED=(DELIVERED, REJECTED, RETURN_REQUESTED),
    DELIVERED=(COMPLETED, RETURN_REQUESTED),
    CANCEL_REQUESTED=(CANCELLED, IN_FULFILMENT),  # back to work if the cancel is refused
    CANCELLED=(),
    INTERCEPTING=(CANCELLED, RETURN_REQUESTED),  # too late: it becomes a return
    RETURN_REQUESTED=(RETURNED, DELIVERED),  # DELIVERED: withdrawn or refused
    REJECTED=(RETURNED,),
)

_PREPAID_START = _table(
    CREATED=(WAIT_PAY, CANCELLED),
    # CANCELLED: payment timeout or buyer cancel, nothing to refund. MANUAL_REVIEW: a payment
    # arrived whose amount differs from the payable; it is recorded and a person decides
    # (a replay then starts fulfilment: MANUAL_REVIEW -> IN_FULFILMENT).
    WAIT_PAY=(PAID, CANCELLED, MANUAL_REVIEW),
    PAID=(IN_FULFILMENT, CANCEL_REQUESTED),
)
_NO_PREPAYMENT_START = _table(CREATED=(IN_FULFILMENT, CANCELLED))


def _kind_table(start: Table, after_return: tuple[str, ...]) -> dict[str, frozenset[str]]:
    return {**_FULFILMENT, **start, RETURNED: frozenset(after_return)}


# "toc" is ToC paid online (or mixed); "toc/cod" is ToC cash on delivery, where
# a rejected parcel was never paid (CANCELLED) but a returned one was (REFUNDED).
TABLES: dict[str, dict[str, frozenset[str]]] = {
    "toc": _kind_table(_PREPAID_START, (REFUNDED,)),
    "toc/cod": _kind_table(_NO_PREPAYMENT_START, (REFUNDED, CANCELLED)),
    "tob": _kind_table(_NO_PREPAYMENT_START, (REFUNDED,)),
    "third_party": _kind_table(_NO_PREPAYMENT_START, (REFUNDED,)),
    "reissue": _kind_table(_NO_PREPAYMENT_START, (CANCELLED,)),
    "exchange": _kind_table(_NO_PREPAYMENT_START, (CANCELLED,)),
    "pullback": _kind_table(_NO_PREPAYMENT_START, (CANCELLED,)),
}


class IllegalTransition(ValueError):
    def __init__(self, kind: str, from_state: str, to_state: str, order_no: str = "") -> None:
        self.kind, self.from_state, self.to_state = kind, from_state, to_state
        who = f"order {order_no} " if order_no else ""
        super().__init__(f"{who}(kind {kind}): {from_state} -> {to_state} is not a legal transition")


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One state change, as published to subscribers (seed 004 订单回告)."""

    order_no: str
    from_state: str
    to_state: str
    at: float
    kind: str


def table_key(order: Order) -> str:
    """Which table governs an order: its kind, with COD as its own ToC variant."""
    if order.kind == "toc" and order.payment_method == "cod":
        return "toc/cod"
    return order.kind


def _table_for(kind_or_order: str | Order) -> Table:
    key = kind_or_order if isinstance(kind_or_order, str) else table_key(kind_or_order)
    try:
        return TABLES[key]
    except KeyError:
        raise KeyError(f"no state table for order kind {key!r}; known: {', '.join(TABLES)}") from None


def legal_targets(kind_or_order: str | Order, state: str) -> frozenset[str]:
    return _table_for(kind_or_order).get(state, frozenset())


def is_terminal(state: str) -> bool:
    return state in TERMINAL


def needs_prepayment(order: Order) -> bool:
    return WAIT_PAY in legal_targets(order, CREATED)


def initial_state(order: Order) -> str:
    """Where intake leaves a new order: waiting for payment, or straight to work."""
    return WAIT_PAY if needs_prepayment(order) else IN_FULFILMENT


def apply(order: Order, to_state: str, at: float) -> str:
    """Move `order` to `to_state` at time `at` and return the state it left;
    an illegal move raises IllegalTransition and changes nothing."""
    from_state = order.status
    table = TABLES.get("toc/cod" if order.kind == "toc" and order.payment_method == "cod" else order.kind)
    if table is None or to_state not in table.get(from_state, ()):
        raise IllegalTransition(table_key(order), from_state, to_state, order.order_no)
    order.status = to_state
    order.timestamps[to_state] = at  # the latest arrival; events keep the full history
    return from_state


def transition(order: Order, to_state: str, at: float) -> Event:
    """`apply`, returning the transition as an Event."""
    from_state = apply(order, to_state, at)
    return Event(order_no=order.order_no, from_state=from_state, to_state=to_state, at=at, kind=order.kind)


# Customer tabs (seed 002: 待付款、待发货、待收货、待评价、退款/售后); "closed"
# covers what only the 全部 tab shows.
_TAB_BY_STATE = {
    PAID: "to_ship", IN_FULFILMENT: "to_ship", SPLIT: "to_ship", MANUAL_REVIEW: "to_ship",
    PARKED: "to_ship", DISPATCHED: "to_ship",
    SHIPPED: "to_receive",
    CANCEL_REQUESTED: "after_sales", INTERCEPTING: "after_sales",
    RETURN_REQUESTED: "after_sales", RETURNED: "after_sales", REJECTED: "after_sales",
    REFUNDED: "after_sales",
}


def _unpaid(order: Order) -> bool:
    # Payment status, not only order status: a payment that has arrived but not
    # yet moved the order must not show "to pay" again.
    return needs_prepayment(order) and order.amounts.paid < order.amounts.payable


def tab(order: Order) -> str:
    status = order.status
    if status in (CREATED, WAIT_PAY):
        return "to_pay" if _unpaid(order) else "to_ship"
    if status in (DELIVERED, COMPLETED):
        return "closed" if order.results.get("reviewed") else "to_review"
    if status == CANCELLED:
        # A cancelled order the customer paid for shows where its refund is.
        return "after_sales" if order.amounts.paid > 0 else "closed"
    return _TAB_BY_STATE[status]


# Tabs whose choice depends on more than the status (payment, review, refund): see `tab`.
_TABS_BY_DETAIL = {
    CREATED: ("to_pay", "to_ship"), WAIT_PAY: ("to_pay", "to_ship"),
    DELIVERED: ("to_review", "closed"), COMPLETED: ("to_review", "closed"),
    CANCELLED: ("after_sales", "closed"),
}
TABS = ("to_pay", "to_ship", "to_receive", "to_review", "after_sales", "closed")


def statuses_for_tab(name: str) -> tuple[str, ...]:
    """Every status an order in tab `name` can have (`tab` decides the ambiguous ones from
    the order itself); in STATES order. An unknown tab raises KeyError."""
    if name not in TABS:
        raise KeyError(f"no tab {name!r}; known: {', '.join(TABS)}")
    return tuple(s for s in STATES if name in _TABS_BY_DETAIL.get(s, (_TAB_BY_STATE.get(s),)))
