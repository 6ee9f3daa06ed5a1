"""Stage 5 `allocate`: spread order-level amounts over the lines to the cent (seed 001 订单分摊).

Seed 002: "拆单需要把运费、优惠、积分分摊到正价单一商品上，方便退款退货以及财务结算".
A partial return refunds the returned lines' allocated amounts, and split
children sum their lines, so each amount's line shares must add up exactly to
the order's amount and every line's payable must stay >= 0.

Discount, coupon and points are spread by goods (qty * unit_price), so zero-price
gift lines get nothing; freight is spread over physical lines only (virtual
goods are not carried). Each share is the exact proportional share rounded
down or up (largest remainder: the left-over cents go to the largest
fractions, ties to the lower line number). Rounding each amount on its own can
stack rounded-up deductions on one line (three 1-cent lines, 1 cent discount
and 1 cent coupon: both go to line 1, payable -1), so a line that would go
below 0 hands such a cent to a line that can take it. Whenever
a line's exact payable is >= 0 its allocated payable is too; otherwise (a
virtual line whose deductions exceed its goods, and no freight to absorb them)
the order goes to manual.
"""
from __future__ import annotations

from math import lcm
from typing import Sequence

from oms_pipeline.order import Line, Order
from oms_pipeline.outcome import NEXT, Outcome, PermanentError, manual
from oms_pipeline.stage import CpuContext, StageSpec

DEDUCTIONS = ("discount", "coupon", "points")
AMOUNTS = DEDUCTIONS + ("freight",)


def largest_remainder(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`: each share is floor or ceil of the exact
    share, the shares sum to `total`, left-over units go to the largest remainders
    (ties to the lower index)."""
    if total < 0 or any(w < 0 for w in weights):
        raise ValueError(f"largest_remainder needs total >= 0 and weights >= 0, got {total}, {weights}")
    weight = sum(weights)
    if weight == 0:
        if total:
            raise ValueError(f"cannot spread {total} over zero weights")
        return [0] * len(weights)
    if total == 0:
        return [0] * len(weights)
    shares = [total * w // weight for w in weights]
    remainders = [total * w % weight for w in weights]
    by_remainder = sorted(range(len(weights)), key=lambda i: (-remainders[i], i))
    for i in by_remainder[:total - sum(shares)]:
        shares[i] += 1
    return shares


class _Lift:
    """Moves rounded-up units between rows so each row's signed sum reaches its target.

    `values[i][j]` is row i's signed share of column j, floor or ceil of the exact
    signed share. A row below its target rises in a column where it was rounded
    down, and a row of that column that was rounded up falls instead, if it can
    spare the unit, or itself rises in another column (an alternating path, as
    in bipartite matching). Column sums never change. A path always exists while
    each target is at most the row's exact signed sum rounded down, because a
    rounding of the whole table that keeps every row at least there exists.
    """

    def __init__(self, values: list[list[int]], floors: list[list[int]], exact: list[list[bool]],
                 target: list[int]) -> None:
        self.values, self.floors, self.exact, self.target = values, floors, exact, target
        self.rows, self.cols = len(values), len(values[0]) if values else 0

    def run(self) -> list[list[int]]:
        for i in range(self.rows):
            while sum(self.values[i]) < self.target[i]:
                path = self._path_from(i, set(), set())
                if path is None:  # impossible (see above): to manual rather than mis-book money
                    raise PermanentError(f"no rounding lifts line index {i} to {self.target[i]}")
                for row, col, delta in path:
                    self.values[row][col] += delta
        return self.values

    def _can_rise(self, i: int, j: int) -> bool:
        return not self.exact[i][j] and self.values[i][j] == self.floors[i][j]

    def _can_fall(self, i: int, j: int) -> bool:
        return not self.exact[i][j] and self.values[i][j] == self.floors[i][j] + 1

    def _path_from(self, i: int, seen_rows: set[int], seen_cols: set[int]) -> list | None:
        seen_rows.add(i)
        for j in range(self.cols):
            if j in seen_cols or not self._can_rise(i, j):
                continue
            seen_cols.add(j)
            donors = [k for k in range(self.rows) if k not in seen_rows and self._can_fall(k, j)]
            for k in donors:
                if sum(self.values[k]) > self.target[k]:
                    return [(i, j, 1), (k, j, -1)]
            for k in donors:
                rest = None if k in seen_rows else self._path_from(k, seen_rows, seen_cols)
                if rest is not None:
                    return [(i, j, 1), (k, j, -1)] + rest
        return None


def apportion(columns: Sequence[tuple[int, Sequence[int], int]], row_min: Sequence[int]) -> list[list[int]]:
    """Each column (total, weights, sign) spread over the rows by largest remainder,
    then each row's signed sum (sign -1: taken off, +1: added) lifted to row_min[i]
    where that is possible without leaving floor/ceil of any exact share, i.e. up
    to the row's exact signed sum rounded down. Returns the (unsigned) shares, by column."""
    shares = [largest_remainder(total, list(weights)) for total, weights, _ in columns]
    rows = len(row_min)
    if all(sum(sign * shares[j][i] for j, (_, _, sign) in enumerate(columns)) >= row_min[i]
           for i in range(rows)):
        return shares  # every row already at its minimum: no cent needs to move
    values = [[sign * shares[j][i] for j, (_, _, sign) in enumerate(columns)] for i in range(rows)]
    floors = [[0] * len(columns) for _ in range(rows)]
    exact = [[True] * len(columns) for _ in range(rows)]
    # Exact row sums over one common denominator, so fractions of different columns add up.
    unit = lcm(*(sum(weights) or 1 for _, weights, _ in columns))
    row_exact = [0] * rows  # numerators over `unit`
    for j, (total, weights, sign) in enumerate(columns):
        weight = sum(weights) or 1
        for i, w in enumerate(weights):
            floors[i][j], rest = divmod(sign * total * w, weight)
            exact[i][j] = rest == 0
            row_exact[i] += sign * total * w * (unit // weight)
    target = [min(row_min[i], row_exact[i] // unit) for i in range(rows)]
    lifted = _Lift(values, floors, exact, target).run()
    return [[sign * lifted[i][j] for i in range(rows)] for j, (_, _, sign) in enumerate(columns)]


def _precondition(order: Order, lines: list[Line]) -> str:
    """Why the amounts cannot be spread at all ("" when they can)."""
    a = order.amounts
    for name in AMOUNTS:
        if getattr(a, name) < 0:
            return f"negative {name} {getattr(a, name)}"
    if any(line.goods < 0 for line in lines):
        return "a line has negative goods (qty * unit_price)"
    goods = sum(line.goods for line in lines)
    for name in DEDUCTIONS:
        if getattr(a, name) and goods <= 0:
            return f"{name} {getattr(a, name)} but no line has goods to carry it"
    if a.freight and not any(not line.virtual and line.goods > 0 for line in lines):
        return f"freight {a.freight} on an order with no physical priced line (virtual goods carry no freight)"
    return ""


def shares(order: Order) -> list[tuple[Line, int, int, int, int, int]] | str:
    """(line, discount, coupon, points, freight, payable) per line, by line number, or why the
    amounts cannot be spread. Changes nothing (the reverse flow asks it of orders not yet allocated)."""
    lines = sorted(order.lines, key=lambda line: line.line_no)  # the tie-break order
    problem = _precondition(order, lines)
    if problem:
        return problem
    goods = [line.goods for line in lines]
    physical = [0 if line.virtual else line.goods for line in lines]
    a = order.amounts
    # Largest remainder per amount; only a line it would drive below 0 gets cents moved.
    discount, coupon, points, freight = apportion(
        [(a.discount, goods, -1), (a.coupon, goods, -1), (a.points, goods, -1), (a.freight, physical, 1)],
        row_min=[-g for g in goods])
    payable = [g - d - c - p + f for g, d, c, p, f in zip(goods, discount, coupon, points, freight)]
    for line, amount in zip(lines, payable):
        if amount < 0:
            return (f"line {line.line_no} ({line.sku}) would have payable {amount}:"
                    f" its share of discount, coupon and points exceeds its goods and freight")
    if sum(payable) != a.payable:
        return f"lines add up to payable {sum(payable)} but the order's payable is {a.payable}"
    return list(zip(lines, discount, coupon, points, freight, payable))


def handle(order: Order, ctx: CpuContext) -> Outcome:
    found = shares(order)
    if isinstance(found, str):
        return manual(f"allocate: {found}")
    for line, discount, coupon, points, freight, payable in found:
        line.discount, line.coupon, line.points = discount, coupon, points
        line.freight, line.payable = freight, payable
    return NEXT


SPEC = StageSpec(
    "allocate", "cpu", handle,
    description="spread discount, coupon, points (by goods) and freight (by physical goods) over the lines"
                " to the cent by largest remainder; line payable >= 0 and sums equal the order's",
    defaults={},
)
