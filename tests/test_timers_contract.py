"""One contract for every timers adapter: in-process heap and RabbitMQ delay queues.

Each adapter comes with a way to let time pass. The in-process adapter runs on a
VirtualClock (one unit = one virtual second, moved by `clock.set`). RabbitMQ's
TTLs follow the wall clock, so there one unit is 0.1 real second (tiers 0.2 s
and 1 s), time passes by sleeping, and `settle` covers the adapter's precision
(fires within half the smallest tier) plus broker latency.
"""
from __future__ import annotations

import anyio
import pytest

from oms_pipeline.adapters.memory_timers import MemoryTimers
from oms_pipeline.clock import SystemClock, VirtualClock
from tests.test_rabbitmq_timers import rabbit_timers

pytestmark = pytest.mark.anyio


class VirtualTime:
    unit, settle = 1.0, 0.0

    def __init__(self) -> None:
        self.clock = VirtualClock()
        self.timers = MemoryTimers(self.clock)
        self.start = self.clock.now()

    def at(self, units: float) -> float:
        return self.start + units * self.unit

    async def advance_to(self, units: float) -> None:
        self.clock.set(self.at(units))

    async def pending(self) -> int:
        return self.timers.pending


class RealTime(VirtualTime):
    unit, settle = 0.1, 0.3

    def __init__(self, timers) -> None:
        self.clock = SystemClock()
        self.timers = timers
        self.start = self.clock.now()

    async def advance_to(self, units: float) -> None:
        await anyio.sleep(max(0.0, self.at(units) - self.clock.now()))

    async def pending(self) -> int:
        return await self.timers.refresh_pending()  # the property is a cached metric


@pytest.fixture(params=["memory", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
async def timers(request, anyio_backend):
    if request.param == "memory":
        yield VirtualTime()
        return
    async with rabbit_timers(tiers=(0.2, 1.0)) as rabbit:
        yield RealTime(rabbit)


async def collect(h, steps, *, settle=True):
    """Run the timers through `steps`; every firing is checked against the clock (never early)."""
    fired = []

    async def on_due(due):
        now = h.clock.now()
        assert all(d.at <= now for d in due), "a timer fired before its time"
        fired.extend(due)

    async with anyio.create_task_group() as tg:
        tg.start_soon(h.timers.run, on_due)
        for action in steps:
            await action()
            await anyio.sleep(0.01)
        if settle:
            await anyio.sleep(h.settle)
        tg.cancel_scope.cancel()
    return fired


async def test_timers_fire_at_their_time_in_deadline_order(timers):
    h = timers

    async def schedule():
        await h.timers.schedule("resume", "B", h.at(20))
        await h.timers.schedule("resume", "A", h.at(10))
        await h.timers.schedule("pay_deadline", "C", h.at(30))

    fired = await collect(h, [schedule, lambda: h.advance_to(9), lambda: h.advance_to(25),
                              lambda: h.advance_to(30)])
    assert [(d.purpose, d.order_no, d.at) for d in fired] == [
        ("resume", "A", h.at(10)), ("resume", "B", h.at(20)), ("pay_deadline", "C", h.at(30))]
    assert await h.pending() == 0


async def test_an_earlier_timer_scheduled_while_sleeping_wakes_first(timers):
    h = timers

    async def late():
        await h.timers.schedule("resume", "late", h.at(3600))

    async def early():
        await h.timers.schedule("resume", "early", h.at(5))

    fired = await collect(h, [late, early, lambda: h.advance_to(5)])
    assert [d.order_no for d in fired] == ["early"]
    assert await h.pending() == 1


async def test_nothing_fires_before_its_time(timers):
    h = timers

    async def schedule():
        await h.timers.schedule("resume", "X", h.at(10))

    fired = await collect(h, [schedule, lambda: h.advance_to(9)], settle=False)
    assert fired == [] and await h.pending() == 1


async def test_timers_scheduled_together_each_fire_once_at_their_time(timers):
    """An intake batch's pay deadlines (many at one instant) and a restart's re-armed timers
    (spread out), scheduled in one call: each fires once, none early, the later ones still wait."""
    h = timers
    batch = [("pay_deadline", f"P{i:03d}", h.at(10)) for i in range(300)]
    spread = [("resume", f"R{i}", h.at(12 + i)) for i in range(3)]

    async def schedule():
        await h.timers.schedule_many(batch + spread + [("resume", "L", h.at(3600))])

    fired = await collect(h, [schedule, lambda: h.advance_to(9), lambda: h.advance_to(15)])
    assert sorted((d.purpose, d.order_no, d.at) for d in fired) == sorted(batch + spread)
    assert [d.order_no for d in fired[-3:]] == ["R0", "R1", "R2"]
    assert await h.pending() == 1
