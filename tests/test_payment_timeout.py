"""Unpaid orders are cancelled at their pay deadline; a payment and its timeout never both win."""
from __future__ import annotations

import anyio
import pytest

from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.outcome import NEXT
from oms_pipeline.ports import store as st
from oms_pipeline.stage import StageSpec
from tests.support.runtime import build, make_order, running

pytestmark = pytest.mark.anyio


async def ship(order, ctx):
    return NEXT


def unpaid(i: int, deadline_in: float, clock) -> object:
    order = make_order(i, kind="toc")
    order.pay_deadline = clock.now() + deadline_in
    return order


def paid(order) -> None:
    order.amounts.paid = order.amounts.cash = order.amounts.payable


async def settle(p) -> None:
    for _ in range(20):
        await anyio.sleep(0)


async def test_an_unpaid_order_is_cancelled_once_its_deadline_has_passed_not_before():
    store = MemoryStore()
    p = build([StageSpec("ship", "io", ship)], store=store, kinds=("toc",))
    async with running(p):
        order = unpaid(1, 600, p.clock)
        await p.submit(order, wait_pay=True)
        p.clock.advance(599)
        await settle(p)
        assert (await store.get(order.order_no)).state == st.WAIT_PAY
        p.clock.advance(1)  # exactly at the deadline a payment is still taken (api.py `_pay`)
        await settle(p)
        assert (await store.get(order.order_no)).state == st.WAIT_PAY
        p.clock.advance(0.001)
        with anyio.fail_after(5):
            await p.wait_until(lambda: p.finished.get("@cancelled") == 1)
    stored = await store.get(order.order_no)
    assert (stored.state, stored.status) == (st.CANCELLED, "CANCELLED")
    assert [(e.from_status, e.to_status) for e in await store.events(order.order_no)] == [
        ("CREATED", "WAIT_PAY"), ("WAIT_PAY", "CANCELLED")]


async def test_a_payment_before_the_deadline_wins_and_the_timer_changes_nothing():
    store = MemoryStore()
    p = build([StageSpec("ship", "io", ship)], store=store, kinds=("toc",))
    async with running(p):
        order = unpaid(1, 600, p.clock)
        await p.submit(order, wait_pay=True)
        p.clock.advance(599.9)
        assert await p.release(order.order_no, "paid", paid)
        p.clock.advance(1)
        with anyio.fail_after(5):
            await p.wait_until(lambda: p.finished.get("@done") == 1)
        await settle(p)
    assert p.finished == {"@done": 1}
    assert [e.to_status for e in await store.events(order.order_no)] == [
        "WAIT_PAY", "PAID", "IN_FULFILMENT", "DISPATCHED"]


async def test_a_payment_after_the_timeout_is_refused():
    store = MemoryStore()
    p = build([StageSpec("ship", "io", ship)], store=store, kinds=("toc",))
    async with running(p):
        order = unpaid(1, 10, p.clock)
        await p.submit(order, wait_pay=True)
        p.clock.advance(10.001)
        with anyio.fail_after(5):
            await p.wait_until(lambda: p.finished.get("@cancelled") == 1)
        assert not await p.release(order.order_no, "paid late", paid)
    assert (await store.get(order.order_no)).state == st.CANCELLED


async def test_deadlines_are_re_armed_after_a_restart(tmp_path):
    from oms_pipeline.adapters.sqlite_store import SqliteStore
    path = str(tmp_path / "oms.sqlite3")
    store = SqliteStore(path)
    await store.open()
    p = build([StageSpec("ship", "io", ship)], store=store, kinds=("toc",))
    async with running(p):
        order = unpaid(1, 60, p.clock)
        await p.submit(order, wait_pay=True)
    await store.close()
    again = SqliteStore(path)
    await again.open()
    p2 = build([StageSpec("ship", "io", ship)], store=again, clock=p.clock, kinds=("toc",))
    async with running(p2):
        with anyio.fail_after(5):
            await p2.wait_until(lambda: p2.timers.pending == 1)
        p.clock.advance(60.001)
        with anyio.fail_after(5):
            await p2.wait_until(lambda: p2.finished.get("@cancelled") == 1)
    assert (await again.get(order.order_no)).state == st.CANCELLED
    await again.close()
