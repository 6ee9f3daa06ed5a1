"""What reversing lines of an order owes: money and stock, to the cent and to the unit (DESIGN R-5).

Money. A reversed line gives back its allocated amounts (`allocate`: the
line's payable after its share of discount, coupon and points, plus its share
of freight): a partial return keeps the promotion on the lines kept, and the
lines kept pay no more than before. Units of one line are settled
cumulatively (`share`): reversing u of q units gives back
floor(total * reversed_after / q) - floor(total * reversed_before / q), so one
line reversed in any number of steps gives back exactly its total. Freight
comes back with a cancel (nothing was shipped); a return or a rejection keeps
it unless `reverse.refund_freight_on_return`. ToB and third-party orders are
settled on account later: their reversed amounts are credited in that
settlement (`fms.credit_note`), never refunded. Refunds never exceed what was
paid: each is capped by what is left, cash first, then the stored-value part
(non_cash); points go back to the points account line by line; the coupon goes
back to the member once every line is reversed (it was spent on the order).

Stock. Units a cancelled order never confirmed (still waiting for payment)
release its reservations whole; sold units come back by restock, per line and
per reverse order, keyed so each comes back once.

The ledger lives in the order document, `results["reverse"]`: units reversed
per line and amounts given back per account, so every call knows what earlier
ones did, whichever path (a reverse request, a stage's cancel, the payment
timeout) cancelled the order.
"""
from __future__ import annotations

from typing import Any

from stages.allocate import shares as allocation_shares

from . import states
from .commands import command
from .order import Order
from .ports.store import Command
from .stock import holds_stock, reservation_key

ACCOUNTS = ("cash", "non_cash", "points", "coupon")
ON_ACCOUNT = ("tob", "third_party")  # settled later, on account: credited, never refunded


def share(total: int, qty: int, before: int, units: int) -> int:
    """Cents of `total` (spread over `qty` units) that units before+1 .. before+units carry."""
    if qty <= 0:
        return 0
    return total * (before + units) // qty - total * before // qty


def ledger(order: Order) -> dict[str, Any]:
    return order.results.setdefault("reverse", {"lines": {}, "given": {a: 0 for a in ACCOUNTS}, "stock": {}})


def reversed_units(order: Order, line_no: int) -> int:
    return (order.results.get("reverse") or {}).get("lines", {}).get(str(line_no), 0)


def open_units(order: Order) -> dict[int, int]:
    """Units per line not reversed yet."""
    return {line.line_no: line.qty - reversed_units(order, line.line_no) for line in order.lines
            if line.qty - reversed_units(order, line.line_no) > 0}


SHARES = ("discount", "coupon", "points", "freight", "payable")


def line_amounts(order: Order) -> dict[int, dict[str, int]]:
    """Each line's share of discount, coupon, points, freight and its payable: as `allocate`
    left them, or as it would spread them now."""
    lines = order.lines
    if sum(line.payable for line in lines) == order.amounts.payable and any(line.payable for line in lines):
        return {line.line_no: {name: getattr(line, name) for name in SHARES} for line in lines}
    found = allocation_shares(order)
    if isinstance(found, str):  # amounts that cannot be spread: all on the first line
        first = min(line.line_no for line in lines)
        return {line.line_no: {name: getattr(order.amounts, name) if line.line_no == first else 0
                               for name in SHARES} for line in lines}
    return {line.line_no: dict(zip(SHARES, values)) for line, *values in found}


class Reversal:
    """Money and stock for one reverse order (`tag`) reversing `units` of some lines."""

    def __init__(self, order: Order, tag: str, *, freight: bool, reason: str) -> None:
        self.order = order
        self.tag = tag
        self.freight = freight
        self.reason = reason
        self.money = 0  # cents this reversal gives back through the payment channel
        self.commands: list[Command] = []

    def lines(self, units: dict[int, int]) -> "Reversal":
        amounts = line_amounts(self.order)
        book = ledger(self.order)
        by_no = {line.line_no: line for line in self.order.lines}
        owed, points = 0, 0
        for line_no, u in sorted(units.items()):
            line = by_no[line_no]
            before = book["lines"].get(str(line_no), 0)
            u = min(u, line.qty - before)
            if u <= 0:
                continue
            mine = amounts[line_no]
            owed += share(mine["payable"] - (0 if self.freight else mine["freight"]), line.qty, before, u)
            points += share(mine["points"], line.qty, before, u)
            book["lines"][str(line_no)] = before + u
            self._stock(line, before, u)
        self._money(owed)
        self._credit("points", "account.credit", points)
        if not open_units(self.order):
            self._credit("coupon", "promo.unbind", self.order.amounts.coupon - book["given"]["coupon"])
        return self

    def rest(self) -> "Reversal":
        """Every unit not reversed yet (a whole cancel): and with the last of them, whatever
        was paid (or is owed on account) and not yet given back (freight, rounding, an
        unallocated order)."""
        self.lines(open_units(self.order))
        book = ledger(self.order)
        owed = self.order.amounts.payable if self.order.kind in ON_ACCOUNT else self.order.amounts.paid
        self._money(owed - book["given"]["cash"] - book["given"]["non_cash"] - book.get("credited", 0))
        return self

    def _money(self, cents: int) -> None:
        if self.order.kind in ON_ACCOUNT:
            return self._credit_note(cents)
        a, given = self.order.amounts, ledger(self.order)["given"]
        cash = min(cents, a.cash - given["cash"]) if a.cash or a.non_cash else min(cents, a.paid - given["cash"])
        non_cash = min(cents - max(cash, 0), a.non_cash - given["non_cash"])
        for method, amount in (("cash", cash), ("non_cash", non_cash)):
            if amount > 0:
                given[method] += amount
                self.money += amount
                self.commands.append(command("fms.refund", f"{self.order.order_no}:{self.tag}:refund:{method}",
                                             order_no=self.order.order_no, amount=amount, method=method,
                                             reason=self.reason))

    def _credit_note(self, cents: int) -> None:
        """ToB and third-party orders are settled on account later (seed 001): what their reversed
        units carried is credited in that settlement, not refunded."""
        book = ledger(self.order)
        cents = min(cents, self.order.amounts.payable - book.get("credited", 0))
        if cents <= 0:
            return
        book["credited"] = book.get("credited", 0) + cents
        self.commands.append(command("fms.credit_note", f"{self.order.order_no}:{self.tag}:credit_note",
                                     order_no=self.order.order_no, amount=cents, reason=self.reason))

    def _credit(self, account: str, topic: str, cents: int) -> None:
        if cents <= 0:
            return
        ledger(self.order)["given"][account] += cents
        self.commands.append(command(topic, f"{self.order.order_no}:{self.tag}:{account}",
                                     order_no=self.order.order_no, member_id=self.order.member_id,
                                     account=account, amount=cents))

    def _stock(self, line: Any, before: int, units: int) -> int:
        """Commands giving back what `units` of the line hold; returns the units of stock given."""
        held = stock_of(self.order, line)
        if held is None:
            return 0
        root, sku, warehouse, qty = held
        give = share(qty, line.qty, before, units)
        if give <= 0:
            return 0
        book = ledger(self.order)["stock"]
        reservation = reservation_key(root, sku, warehouse)
        if states.IN_FULFILMENT not in self.order.timestamps:
            # Never started (unpaid): nothing was sold; the reservation goes back whole, once.
            if book.get(reservation) != "released":
                book[reservation] = "released"
                self.commands.append(command("inventory.release", f"{reservation}:release", reservation=reservation))
            return give
        book[f"{sku}@{warehouse}"] = book.get(f"{sku}@{warehouse}", 0) + give
        self.commands.append(command("inventory.restock", f"{self.order.order_no}:{self.tag}:restock:{line.line_no}",
                                     reservation=reservation, sku=sku, warehouse=warehouse, qty=give))
        return give


def stock_of(order: Order, line: Any) -> tuple[str, str, str, int] | None:
    """(reservation order no, sku, warehouse, units reserved for the line) or None when the line holds
    no stock of ours. A bundle's reservation is carried by its first component line (`fill`
    replaces the bundle by its components); a split child's lines hold stock under its parent's."""
    record = order.results.get("stock") or {}
    if line.bundle_of is None:
        recorded = record.get("lines", {}).get(str(line.line_no)) if holds_stock(line) else None
    elif line.line_no == min(x.line_no for x in order.lines if x.bundle_of == line.bundle_of):
        recorded = record.get("lines", {}).get(str(line.bundle_of))
    else:
        recorded = None
    if recorded is None:
        return None
    sku, warehouse, qty = recorded
    return record.get("root", order.order_no), sku, warehouse, qty


def shrink(order: Order, units: dict[int, int], tag: str, reason: str) -> tuple[list[Command], int]:
    """A partial cancel before anything shipped: the order itself gets smaller. The units leave
    their lines, and the lines' shares leave the order's amounts, so the stages still to run
    (allocate, dispatch) see only what is left; the money those units carried and their stock
    go back. Returns (commands, cents refunded)."""
    amounts = line_amounts(order)
    reversal = Reversal(order, tag, freight=True, reason=reason)
    owed = points = 0
    for line in order.lines:
        u = min(units.get(line.line_no, 0), line.qty)
        if u <= 0:
            continue
        cut = {name: share(value, line.qty, 0, u) for name, value in amounts[line.line_no].items()}
        given = reversal._stock(line, 0, u)
        if given:  # the line now holds that much less of its reservation
            record = order.results["stock"]["lines"][str(line.line_no if line.bundle_of is None else line.bundle_of)]
            record[2] -= given
        line.qty -= u
        for name, value in cut.items():
            setattr(order.amounts, name, getattr(order.amounts, name) - value)
            if getattr(line, name):
                setattr(line, name, getattr(line, name) - value)
        owed += cut["payable"]
        points += cut["points"]
    order.lines = [line for line in order.lines if line.qty > 0]
    reversal._money(owed)
    reversal._credit("points", "account.credit", points)
    return reversal.commands, reversal.money


def cancel_everything(order: Order, reason: str, tag: str = "cancel") -> list[Command]:
    """A whole cancel (any path): every unit back, every cent paid back, the coupon and points back."""
    if order.children:
        return []  # a split parent: each child settles its own lines
    return Reversal(order, tag, freight=True, reason=reason).rest().commands
