"""In-process coordination for the embedded default (one instance)."""
from __future__ import annotations

from ..clock import Clock


class LocalCoordination:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._counters: dict[str, tuple[int, float]] = {}  # key -> (count, expires_at)

    def _current(self, key: str) -> int:
        entry = self._counters.get(key)
        if entry is None:
            return 0
        if entry[1] <= self._clock.now():
            del self._counters[key]
            return 0
        return entry[0]

    async def take_capacity(self, key: str, limit: int, ttl: float) -> bool:
        used = self._current(key)
        if used >= limit:
            return False
        expires = self._counters[key][1] if used else self._clock.now() + ttl
        self._counters[key] = (used + 1, expires)
        return True

    async def release_capacity(self, key: str) -> None:
        used = self._current(key)
        if used:
            self._counters[key] = (used - 1, self._counters[key][1])

    async def count(self, key: str) -> int:
        return self._current(key)

    async def close(self) -> None:
        self._counters.clear()
