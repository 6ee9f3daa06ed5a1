"""A one-line progress bar on stderr, redrawn a few times a second."""
from __future__ import annotations

import sys
import time
from typing import Callable

import anyio


class Progress:
    def __init__(self, label: str, total: int, sent: Callable[[], int], finished: Callable[[], int],
                 *, enabled: bool = True, width: int = 30) -> None:
        self.label = label
        self.total = total
        self.sent = sent
        self.finished = finished
        self.enabled = enabled
        self.width = width
        self.started = time.perf_counter()

    async def run(self) -> None:
        self.started = time.perf_counter()
        try:
            while True:
                self.draw()
                await anyio.sleep(0.2)
        finally:
            self.draw(final=True)

    def draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        done, total = self.finished(), max(1, self.total)
        filled = self.width * min(done, total) // total
        elapsed = max(1e-9, time.perf_counter() - self.started)
        line = (f"\r{self.label:<22} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{done}/{self.total} done, {self.sent()} sent, {done / elapsed:,.0f}/s")
        print(line, end="\n" if final else "", file=sys.stderr, flush=True)
