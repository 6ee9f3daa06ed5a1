"""One holder at a time per key (an order number), with no lock left behind for idle keys."""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator


class KeyedLock:
    def __init__(self) -> None:
        self._locks: dict[str, list] = {}  # key -> [lock, holders and waiters]

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[key]

    def __contains__(self, key: str) -> bool:
        return key in self._locks

    def __len__(self) -> int:
        """Keys held or waited for now."""
        return len(self._locks)
