"""Intake: a validated request becomes an order with a number, stored and started.

One code path for every way orders arrive (HTTP API, broker queues, the
benchmark): `create()` takes already validated requests. Idempotent on
(source, external id): a retried request returns the first order's number.
"""
from __future__ import annotations

from collections import deque
from typing import Any, NamedTuple

from . import generator, states
from .config import Settings
from .order import Order
from .order_no import OrderNumbers
from .pipeline import Pipeline

BLOCK = 1000  # order numbers reserved from the store at a time


class Created(NamedTuple):
    order_no: str
    created: bool
    status: str
    pay_deadline: float | None
    payable: int


class Intake:
    def __init__(self, pipeline: Pipeline, settings: Settings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        daemon = settings.daemon
        self._blocks: deque[int] = deque()
        self._available = 0
        self._numbers = OrderNumbers(daemon.order_no_key.encode(), daemon.instance_id,
                                     lambda n: self._blocks.popleft(), block=BLOCK)

    async def _reserve(self, n: int) -> None:
        """Make sure n numbers are reserved: blocks come from the store, so a
        restart never hands out a number twice."""
        while self._available < n:
            name = f"order_no:{self.settings.daemon.instance_id}"
            self._blocks.append(await self.pipeline.store.next_block(name, BLOCK) - 1)
            self._available += BLOCK

    async def create(self, requests: list[dict[str, Any]]) -> list[Created]:
        await self._reserve(len(requests))
        now = self.pipeline.clock.now()
        orders = []
        for request in requests:
            self._available -= 1
            orders.append(self._order(request, self._numbers.next(), now))
        results: dict[int, tuple[str, bool]] = {}
        for wait_pay in (True, False):
            picked = [i for i, o in enumerate(orders) if states.needs_prepayment(o) == wait_pay]
            if picked:
                done = await self.pipeline.submit_many([orders[i] for i in picked], wait_pay=wait_pay)
                results.update(zip(picked, done))
        return [self._answer(orders[i], *results[i]) for i in range(len(orders))]

    def _order(self, request: dict[str, Any], order_no: str, now: float) -> Order:
        order = generator.to_order(request, order_no, now)
        if states.needs_prepayment(order):
            order.pay_deadline = now + self.settings.payment.timeout_for(order.kind)
        return order

    def _answer(self, order: Order, order_no: str, created: bool) -> Created:
        if created:
            return Created(order_no, True, order.status, order.pay_deadline, order.amounts.payable)
        return Created(order_no, False, "", None, 0)  # the caller looks the original up
