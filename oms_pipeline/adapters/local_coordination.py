"""In-process coordination for the embedded default (one instance)."""
from __future__ import annotations

from typing import Sequence

from ..clock import Clock


class LocalCoordination:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._holders: dict[str, tuple[set[str], float]] = {}  # key -> (holders, expires_at)

    def _current(self, key: str) -> set[str] | None:
        entry = self._holders.get(key)
        if entry is not None and entry[1] <= self._clock.now():
            del self._holders[key]
            return None
        return entry[0] if entry else None

    async def take_capacity(self, key: str, holder: str, limit: int, ttl: float) -> bool:
        holders = self._current(key)
        if holders is None:
            holders = set()
            self._holders[key] = (holders, self._clock.now() + ttl)
        if holder in holders:
            return True
        if len(holders) >= limit:
            return False
        holders.add(holder)
        return True

    async def take_capacities(self, takes: Sequence[tuple[str, str, int, float]]) -> list[bool]:
        return [await self.take_capacity(*take) for take in takes]

    async def release_capacity(self, key: str, holder: str) -> None:
        holders = self._current(key)
        if holders is not None:
            holders.discard(holder)

    async def count(self, key: str) -> int:
        return len(self._current(key) or ())

    async def close(self) -> None:
        self._holders.clear()
