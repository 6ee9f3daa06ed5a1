"""A bounded FIFO queue that hands out batches.

`asyncio.Queue` moves one item per `get()`; a stage worker wants every order
already waiting (one checkpoint wait per batch). Producers wait while the queue
is at its bound: that wait is the pipeline's backpressure.
"""
from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")

# The fewest items a consumer takes when it shares a backlog with others (while any are
# queued): orders arrive a producer's batch at a time, and a small batch split `share`
# ways made batches of one or two, each paying a slot's whole round (measured: `audit`
# and `flow_limit` at 3-6 orders a batch in a production run). The calls of a batch
# wait side by side, so a bigger batch waits no longer.
MIN_SHARE = 16


class BoundedQueue(Generic[T]):
    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.maxsize = maxsize
        self._items: deque[T] = deque()
        self._getters: deque[asyncio.Future] = deque()
        self._putters: deque[asyncio.Future] = deque()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def waiting_producers(self) -> int:
        return sum(1 for f in self._putters if not f.done())

    def room(self) -> int:
        return self.maxsize - len(self._items)

    async def put(self, item: T) -> None:
        while len(self._items) >= self.maxsize:
            await self._wait(self._putters)
        self._items.append(item)
        _wake(self._getters)

    async def put_many(self, items: list[T]) -> None:
        """Put in order, waiting for room whenever the queue is at its bound."""
        if len(items) <= self.maxsize - len(self._items):
            self._items.extend(items)
            _wake(self._getters)
            return
        for item in items:
            if len(self._items) >= self.maxsize:
                _wake(self._getters)
                await self._wait(self._putters)
                while len(self._items) >= self.maxsize:
                    await self._wait(self._putters)
            self._items.append(item)
        _wake(self._getters)

    def put_front(self, items: list[T]) -> None:
        """Give back taken items (shutdown); may exceed the bound briefly."""
        self._items.extendleft(reversed(items))
        _wake(self._getters)

    def wake_all(self) -> None:
        """Wake every waiting consumer (they get an empty batch): used at shutdown."""
        while _wake(self._getters):
            pass

    async def get_batch(self, limit: int, share: int = 1) -> list[T]:
        """Up to `limit` items, but only 1/`share` of what is queued, so that
        `share` consumers split a backlog instead of one taking it all.
        Returns an empty list when woken with nothing queued (see `wake_all`)."""
        if not self._items:
            await self._wait(self._getters)
        items = self._items
        n = min(limit, len(items), max(-(-len(items) // share), MIN_SHARE))
        batch = [items.popleft() for _ in range(n)]
        for _ in range(n):
            if not _wake(self._putters):
                break
        if items:
            _wake(self._getters)  # more left: let another consumer start
        return batch

    def resize(self, maxsize: int) -> None:
        """A new bound (live reload). Shrinking never drops items; producers wait until below it."""
        self.maxsize = max(1, maxsize)
        for _ in range(max(0, self.room())):
            if not _wake(self._putters):
                break

    def drain(self) -> list[T]:
        items = list(self._items)
        self._items.clear()
        for _ in range(len(self._putters)):
            _wake(self._putters)
        return items

    async def _wait(self, waiters: deque[asyncio.Future]) -> None:
        fut = asyncio.get_running_loop().create_future()
        waiters.append(fut)
        try:
            await fut
        except BaseException:
            fut.cancel()
            # We may have been woken and cancelled at once: pass the wake-up on.
            if fut.done() and not fut.cancelled():
                _wake(waiters)
            raise


def _wake(waiters: deque[asyncio.Future]) -> bool:
    while waiters:
        fut = waiters.popleft()
        if not fut.done():
            fut.set_result(None)
            return True
    return False
