"""Cross-instance coordination: shared counters and locks (Redis in production)."""
from __future__ import annotations

from typing import Protocol


class Coordination(Protocol):
    async def take_capacity(self, key: str, limit: int, ttl: float) -> bool:
        """Atomically count one more use of `key` if fewer than `limit` were counted.

        Returns False (and counts nothing) when the limit is reached. The counter
        expires `ttl` seconds after it was first used (a daily window key plus a
        TTL past the window's end).
        """

    async def release_capacity(self, key: str) -> None:
        """Give one counted use back (the counted work was abandoned)."""

    async def count(self, key: str) -> int:
        """The current count of `key` (0 if unknown)."""

    async def close(self) -> None: ...
