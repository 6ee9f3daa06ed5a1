"""Delayed wake-ups: parked orders, retry backoff, payment deadlines.

In production these are RabbitMQ delayed messages; embedded, an in-process
timer heap. A timer only names the order and why; the store decides whether
the wake-up still applies (the order may have moved on meanwhile).
"""
from __future__ import annotations

from typing import Awaitable, Callable, NamedTuple, Protocol


class Due(NamedTuple):
    purpose: str  # "resume" (park/retry) | "pay_deadline"
    order_no: str
    at: float


class Timers(Protocol):
    async def schedule(self, purpose: str, order_no: str, at: float) -> None: ...

    async def schedule_many(self, timers: list[tuple[str, str, float]]) -> None:
        """Schedule (purpose, order number, at) timers together (an intake batch's pay deadlines,
        re-arming after a restart): the adapter may carry timers due together in one message."""

    async def run(self, on_due: Callable[[list[Due]], Awaitable[None]]) -> None:
        """Deliver due timers until cancelled."""

    @property
    def pending(self) -> int: ...
