"""In-process timers for the embedded default: a heap and one sleeping task.

Nothing here is durable: on restart the pipeline re-schedules every parked
order from the store (the store is the source of truth for wake times).
"""
from __future__ import annotations

import heapq
import itertools
from typing import Awaitable, Callable

import anyio

from ..clock import Clock
from ..ports.timers import Due


class MemoryTimers:
    def __init__(self, clock: Clock, batch: int = 1000) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = itertools.count()
        self._batch = batch
        self._changed = anyio.Event()
        self._sleeping_until: float | None = None
        self._scope: anyio.CancelScope | None = None

    @property
    def pending(self) -> int:
        return len(self._heap)

    async def schedule(self, purpose: str, order_no: str, at: float) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), purpose, order_no))
        self._changed.set()
        if self._scope is not None and self._sleeping_until is not None and at < self._sleeping_until:
            self._scope.cancel()

    async def schedule_many(self, timers: list[tuple[str, str, float]]) -> None:
        for timer in timers:
            await self.schedule(*timer)

    async def run(self, on_due: Callable[[list[Due]], Awaitable[None]]) -> None:
        while True:
            if not self._heap:
                self._changed = anyio.Event()
                await self._changed.wait()
                continue
            at = self._heap[0][0]
            if at > self._clock.now():
                await self._sleep(at)
                continue
            await on_due(self._pop_due())

    async def _sleep(self, until: float) -> None:
        self._sleeping_until = until
        with anyio.CancelScope() as self._scope:
            await self._clock.sleep_until(until)
        self._scope = self._sleeping_until = None

    def _pop_due(self) -> list[Due]:
        now = self._clock.now()
        due = []
        while self._heap and self._heap[0][0] <= now and len(due) < self._batch:
            at, _, purpose, order_no = heapq.heappop(self._heap)
            due.append(Due(purpose, order_no, at))
        return due
