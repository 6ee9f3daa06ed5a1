"""Readiness of the daemon's dependencies (store, RabbitMQ, Redis), for `GET /readyz`.

Each dependency has a probe: a cheap call that raises or answers False when it
cannot be reached. Probes run concurrently, each bounded by `timeout`, and
their answer is kept for `max_age` seconds, so a load balancer polling /readyz
often costs the dependencies at most one probe each per `max_age`.
"""
from __future__ import annotations

import logging
import time
from typing import Awaitable, Callable

import anyio

log = logging.getLogger("oms.health")
Probe = Callable[[], Awaitable[object]]


class Health:
    def __init__(self, probes: dict[str, list[Probe]], *, max_age: float = 1.0, timeout: float = 2.0) -> None:
        self.probes = probes  # dependency name -> probes that must all pass
        self.max_age = max_age
        self.timeout = timeout
        self._down: list[str] = []
        self._checked = float("-inf")
        self._lock = anyio.Lock()

    async def unreachable(self) -> list[str]:
        """Names of the dependencies that cannot be reached now (at most `max_age` seconds old)."""
        if time.monotonic() - self._checked < self.max_age:
            return self._down
        async with self._lock:  # callers arriving meanwhile share one round of probes
            if time.monotonic() - self._checked >= self.max_age:
                self._down = await self._probe_all()
                self._checked = time.monotonic()
        return self._down

    async def _probe_all(self) -> list[str]:
        ok: dict[str, bool] = {}

        async def check(name: str, probes: list[Probe]) -> None:
            ok[name] = all([await self._passes(name, probe) for probe in probes])

        async with anyio.create_task_group() as tg:
            for name, probes in self.probes.items():
                tg.start_soon(check, name, probes)
        return [name for name in self.probes if not ok[name]]

    async def _passes(self, name: str, probe: Probe) -> bool:
        try:
            with anyio.fail_after(self.timeout):
                if await probe() is not False:
                    return True
            reason = "not connected"
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"; said in the log
            reason = f"{type(exc).__name__}: {exc}"[:300]
        log.warning("dependency unreachable", extra={"event": "unreachable", "dependency": name, "reason": reason})
        return False
