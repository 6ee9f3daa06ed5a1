"""Cross-instance coordination: shared counters and locks (Redis in production)."""
from __future__ import annotations

from typing import Protocol, Sequence


class Coordination(Protocol):
    async def take_capacity(self, key: str, holder: str, limit: int, ttl: float) -> bool:
        """Atomically count `holder` (an order number) as a user of `key` if fewer
        than `limit` holders are counted.

        Idempotent per holder: a holder already counted gets True again and is
        not counted twice, so a stage replayed after a crash never uses up
        capacity twice. Returns False (counting nothing) when the limit is
        reached. The counter expires `ttl` seconds after it was first used (a
        daily window key plus a TTL past the window's end).
        """

    async def take_capacities(self, takes: Sequence[tuple[str, str, int, float]]) -> list[bool]:
        """Several `take_capacity(key, holder, limit, ttl)` at once, answered in order: one
        round trip for all of them where the adapter has round trips."""

    async def release_capacity(self, key: str, holder: str) -> None:
        """Give the holder's use back (the counted work was abandoned)."""

    async def count(self, key: str) -> int:
        """How many holders `key` counts now (0 if unknown)."""

    async def close(self) -> None: ...
