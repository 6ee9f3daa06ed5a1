"""Intake: a validated request becomes an order with a number, stored and started.

One code path for every way orders arrive (HTTP API, broker queues, the
benchmark): `create()` takes already validated requests. Idempotent on
(source, external id): a retried request returns the first order's number.

Stock (oms_pipeline/stock.py) is reserved BEFORE the order is committed, so a
committed order always has its stock; an order whose stock cannot be reserved
is refused and never created. Then the commit, then (orders that need no
payment) the confirm. A retried request draws a new number and reserves under
it before the store says it is a duplicate: those reservations are released at
once. A crash between reserve and commit leaves reservations of an order that
does not exist: the reconciler releases them after `stock.reservation_ttl`.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, NamedTuple

from . import generator, schemas, states
from .config import Settings
from .order import Order
from .order_no import OrderNumbers
from .pipeline import Pipeline, ShuttingDown
from .stock import Stock, StockUnavailable

BLOCK = 1000  # order numbers reserved from the store at a time


class Created(NamedTuple):
    order_no: str
    created: bool
    status: str
    pay_deadline: float | None
    payable: int
    refused: str = ""  # not created, and why (e.g. "out of stock: SKU@WH")


class Intake:
    def __init__(self, pipeline: Pipeline, settings: Settings, stock: Stock | None = None) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.stock = stock
        # Fault injection for the crash tests: called with the orders after their stock is
        # reserved and before they are committed; raising there is dying at that moment.
        self.after_reserve: Callable[[list[Order]], None] | None = None
        daemon = settings.daemon
        self._blocks: deque[int] = deque()
        self._available = 0
        self._numbers = OrderNumbers(daemon.order_no_key.encode(), daemon.instance_id,
                                     lambda n: self._blocks.popleft(), block=BLOCK)

    def request_body(self, body: bytes) -> dict[str, Any]:
        """A request body (JSON) checked against the order schema, as `create` takes it; raises
        schemas.Invalid listing every field error. The API, the broker intake and the benchmark
        call this. A valid body is decoded and checked in one call (`schemas.ORDER_FAST`); any
        other goes through `request`, which names every error."""
        request = schemas.ORDER_FAST.parse(body)
        if request is None:
            return self.request(schemas.decode_json(body))
        self._check_lines(len(request["lines"]))
        return request

    def request(self, data: Any) -> dict[str, Any]:
        """A decoded request body checked against the order schema, as `create` takes it; raises
        schemas.Invalid listing every field error."""
        order = schemas.validate(schemas.OrderIn, data)
        self._check_lines(len(order.lines))
        return order.model_dump(mode="json", exclude_none=True)

    def _check_lines(self, count: int) -> None:
        max_lines = self.settings.intake.max_lines
        if count > max_lines:
            raise schemas.Invalid([{"path": "lines", "reason": f"more than {max_lines} lines"}])

    async def _reserve_numbers(self, n: int) -> None:
        """Make sure n numbers are reserved: blocks come from the store, so a
        restart never hands out a number twice."""
        while self._available < n:
            name = f"order_no:{self.settings.daemon.instance_id}"
            self._blocks.append(await self.pipeline.store.next_block(name, BLOCK) - 1)
            self._available += BLOCK

    async def create(self, requests: list[dict[str, Any]]) -> list[Created]:
        await self._reserve_numbers(len(requests))
        now = self.pipeline.clock.now()
        orders = []
        for request in requests:
            self._available -= 1
            orders.append(self._order(request, self._numbers.next(now), now))
        refused: dict[int, str] = {}
        if self.stock is not None:
            for i, order in enumerate(orders):
                try:
                    reason = await self.stock.reserve(order)  # before the commit: see the docstring
                except StockUnavailable:  # this order holds nothing; the batch's others give theirs back
                    for j in range(i):
                        if j not in refused:
                            await self.stock.release(orders[j])
                    raise
                if reason:
                    refused[i] = reason
        if self.after_reserve is not None:
            self.after_reserve(orders)
        results: dict[int, tuple[str, bool]] = {}
        try:
            for wait_pay in (True, False):
                picked = [i for i, o in enumerate(orders) if i not in refused and states.needs_prepayment(o) == wait_pay]
                if picked:
                    done = await self.pipeline.submit_many([orders[i] for i in picked], wait_pay=wait_pay)
                    results.update(zip(picked, done))
        except ShuttingDown:  # raised before anything was stored: nothing of these orders exists
            if self.stock is not None:
                for i, order in enumerate(orders):
                    if i not in results and i not in refused:
                        await self.stock.release(order)
            raise
        # Any other failure leaves reservations the store may or may not have orders for:
        # the reconciler tells them apart after the TTL.
        for i in list(refused):
            # A retry of an order taken in before (or earlier in this batch) gets that order, not
            # "out of stock": its stock is held under the first order's number.
            existing = await self.pipeline.store.find_external(orders[i].source, orders[i].external_id)
            if existing is not None:
                del refused[i]
                results[i] = (existing, False)
        if self.stock is not None:
            for i, (order_no, created) in results.items():
                order = orders[i]
                if not created and "stock" in order.results:
                    await self.stock.release(order)  # a duplicate: the first order holds the stock
                elif not states.needs_prepayment(order):
                    await self.stock.confirm(order)  # needs no payment: sold at once
        return [Created("", False, "", None, 0, refused[i]) if i in refused else self._answer(orders[i], *results[i])
                for i in range(len(orders))]

    def _order(self, request: dict[str, Any], order_no: str, now: float) -> Order:
        order = generator.to_order(request, order_no, now)
        if states.needs_prepayment(order):
            order.pay_deadline = now + self.settings.payment.timeout_for(order.kind)
        return order

    def _answer(self, order: Order, order_no: str, created: bool) -> Created:
        if created:
            return Created(order_no, True, order.status, order.pay_deadline, order.amounts.payable)
        return Created(order_no, False, "", None, 0)  # the caller looks the original up
