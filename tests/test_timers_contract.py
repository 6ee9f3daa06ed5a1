"""One contract for every timers adapter (in-process now; RabbitMQ delay queues join the fixture)."""
from __future__ import annotations

import anyio
import pytest

from oms_pipeline.adapters.memory_timers import MemoryTimers
from oms_pipeline.clock import VirtualClock

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["memory"])
def timers(request):
    clock = VirtualClock()
    return MemoryTimers(clock), clock


async def collect(timers, clock, steps):
    fired = []

    async def on_due(due):
        fired.extend(due)

    async with anyio.create_task_group() as tg:
        tg.start_soon(timers.run, on_due)
        for action in steps:
            await action()
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    return fired


async def test_timers_fire_at_their_time_in_deadline_order(timers):
    t, clock = timers
    start = clock.now()

    async def schedule():
        await t.schedule("resume", "B", start + 20)
        await t.schedule("resume", "A", start + 10)
        await t.schedule("pay_deadline", "C", start + 30)

    async def to(seconds):
        clock.set(start + seconds)

    fired = await collect(t, clock, [schedule, lambda: to(9), lambda: to(25), lambda: to(30)])
    assert [(d.purpose, d.order_no, d.at - start) for d in fired] == [
        ("resume", "A", 10), ("resume", "B", 20), ("pay_deadline", "C", 30)]
    assert t.pending == 0


async def test_an_earlier_timer_scheduled_while_sleeping_wakes_first(timers):
    t, clock = timers
    start = clock.now()

    async def late():
        await t.schedule("resume", "late", start + 3600)

    async def early():
        await t.schedule("resume", "early", start + 5)

    async def advance():
        clock.set(start + 5)

    fired = await collect(t, clock, [late, early, advance])
    assert [d.order_no for d in fired] == ["early"]
    assert t.pending == 1


async def test_nothing_fires_before_its_time(timers):
    t, clock = timers

    async def schedule():
        await t.schedule("resume", "X", clock.now() + 1)

    fired = await collect(t, clock, [schedule])
    assert fired == [] and t.pending == 1
