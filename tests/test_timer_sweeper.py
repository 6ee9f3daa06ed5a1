"""The sweeper: wake-ups and pay deadlines the broker lost are found in the store and fired."""
from __future__ import annotations

import anyio
import pytest

from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.outcome import NEXT, park
from oms_pipeline.ports import store as st
from oms_pipeline.stage import StageSpec
from tests.support.runtime import build, make_order, running

pytestmark = pytest.mark.anyio


class LostTimers:
    """A broker that loses every timer (what the sweeper is the safety net for)."""

    def __init__(self, timers) -> None:
        self.inner = timers
        self.lost = 0

    async def schedule(self, purpose: str, order_no: str, at: float) -> None:
        self.lost += 1

    async def schedule_many(self, timers) -> None:
        self.lost += len(timers)

    def __getattr__(self, name):
        return getattr(self.inner, name)


async def settle() -> None:
    for _ in range(30):
        await anyio.sleep(0)


async def wait_then_ship(order, ctx):
    if "waited" in order.results:
        return NEXT
    order.results["waited"] = True
    return park(ctx.clock.now() + 60, "wait a minute")


async def test_lost_pay_deadlines_and_wake_ups_are_fired_once_overdue_by_the_grace():
    store = MemoryStore()
    p = build([StageSpec("ship", "io", wait_then_ship)], store=store, kinds=("toc", "tob"),
              settings={"broker": {"sweep_grace": 30.0}})
    p.timers = LostTimers(p.timers)
    async with running(p):
        unpaid = make_order(1, kind="toc")
        unpaid.pay_deadline = p.clock.now() + 600
        await p.submit(unpaid, wait_pay=True)
        parked = make_order(2, kind="tob")
        await p.submit(parked)
        await settle()
        assert (await store.get(parked.order_no)).state == st.PARKED
        assert p.timers.lost == 2  # the pay deadline and the wake-up both went nowhere
        p.clock.advance(80)  # the wake-up is 20 s overdue: within the grace, the sweeper leaves it
        assert await p.sweep() == 0
        p.clock.advance(20)
        assert await p.sweep() == 1
        await settle()
        assert (await store.get(parked.order_no)).state == st.DONE
        p.clock.advance(600)  # the pay deadline is 100 s overdue
        assert await p.sweep() == 1
        assert (await store.get(unpaid.order_no)).state == st.CANCELLED
        assert await p.sweep() == 0


class CommitThenFail(MemoryStore):
    """The first create commits, then the caller sees the store go away (what a database restart
    during the commit looks like from the daemon)."""

    failed = False

    async def create(self, orders):
        results = await super().create(orders)
        if not self.failed:
            self.failed = True
            raise st.StoreUnavailable("connection lost during the commit")
        return results


async def ship(order, ctx):
    return NEXT


async def test_an_order_created_while_the_caller_saw_the_store_fail_is_restarted_by_the_sweeper():
    store = CommitThenFail()
    p = build([StageSpec("pack", "io", ship), StageSpec("ship", "io", ship)], store=store,
              settings={"broker": {"sweep_grace": 30.0}})
    async with running(p):
        order = make_order(1)
        with pytest.raises(st.StoreUnavailable):
            await p.submit(order)
        assert await p.submit(make_order(1)) == (order.order_no, False)  # the caller's retry: already made
        other = make_order(2)
        await p.submit(other)
        await settle()
        assert (await store.get(order.order_no)).state == st.QUEUED  # stranded: nothing works on it
        assert (await store.get(other.order_no)).state == st.DONE
        assert await p.sweep() == 0  # within the grace
        p.clock.advance(31)
        assert await p.sweep() == 1  # the finished order is not started again, the stranded one is
        await settle()
        assert (await store.get(order.order_no)).state == st.DONE
        assert [h.stage for h in await store.history(order.order_no)] == ["intake", "pack", "ship"]
        assert await p.sweep() == 0


async def test_the_sweeper_leaves_queued_orders_in_flight_here_alone():
    gate = anyio.Event()

    async def held(order, ctx):
        await gate.wait()
        return NEXT

    store = MemoryStore()
    p = build([StageSpec("pack", "io", held)], store=store, settings={"broker": {"sweep_grace": 30.0}})
    async with running(p):
        order = make_order(1)
        await p.submit(order)
        await settle()
        p.clock.advance(120)
        assert await p.sweep() == 0  # queued and old, but this instance is working on it
        gate.set()
        await settle()
        assert (await store.get(order.order_no)).state == st.DONE
        assert [h.stage for h in await store.history(order.order_no)] == ["intake", "pack"]
