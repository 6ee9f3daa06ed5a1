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
