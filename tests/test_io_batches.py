"""An `io` slot's batch: handlers that wait, wait side by side; each keeps its own timeout."""
from __future__ import annotations

import anyio
import pytest

from oms_pipeline.outcome import NEXT
from oms_pipeline.ports import store as st
from oms_pipeline.stage import StageSpec
from tests.support.runtime import all_orders, build, make_order, running

pytestmark = pytest.mark.anyio

ONE_SLOT = {"stage_defaults": {"io": {"pool": 1, "batch": 10, "queue": 100, "timeout": 30}}}


async def one_try(spec: StageSpec, orders: int, *, timeout: float):
    """`orders` orders through `spec` on one slot with this timeout and no retries: the pipeline
    and its stored orders once all have finished."""
    settings = {"stage_defaults": {"io": {**ONE_SLOT["stage_defaults"]["io"], "timeout": timeout},
                                   "retry": {"max_attempts": 1}}}
    p = build([spec], settings=settings)
    async with running(p):
        await p.submit_many([make_order(i) for i in range(orders)])
        with anyio.fail_after(5):
            await p.wait_until(lambda: p.total_finished() == orders)
    return p, await all_orders(p.store)


async def test_the_waiting_handlers_of_one_batch_wait_together():
    arrived, everyone = 0, anyio.Event()

    async def barrier(order, ctx):  # returns only once all ten are inside at the same time
        nonlocal arrived
        arrived += 1
        if arrived == 10:
            everyone.set()
        await everyone.wait()
        return NEXT

    p = build([StageSpec("barrier", "io", barrier)], settings=ONE_SLOT)
    async with running(p):
        await p.submit_many([make_order(i) for i in range(10)])
        with anyio.fail_after(5):  # one at a time, the first would wait for the stage timeout (30 s)
            await p.wait_until(lambda: p.total_finished() == 10)
    assert {r.state for r in (await all_orders(p.store)).values()} == {st.DONE}


async def test_a_stuck_handler_times_out_alone_and_its_batch_goes_on():
    async def sometimes_stuck(order, ctx):
        await anyio.sleep(0)
        if order.external_id == "ext-3":
            await anyio.sleep_forever()
        return NEXT

    p, rows = await one_try(StageSpec("stuck", "io", sometimes_stuck), 6, timeout=0.2)
    stuck = make_order(3).order_no
    assert {no: r.state for no, r in rows.items() if no != stuck} == dict.fromkeys(
        [make_order(i).order_no for i in (0, 1, 2, 4, 5)], st.DONE)
    assert rows[stuck].state == st.MANUAL
    assert any("stuck: timed out after 0.2s" in h.reason for h in await p.store.history(stuck))


async def test_handlers_waiting_on_futures_resume_when_theirs_is_done_each_as_it_goes_on():
    """The common wait (a counter's answer in a future) is resumed by the slot itself; a handler
    that waits again, fails after its wait, or whose future never comes, still ends as it would
    in a task of its own."""
    import asyncio

    from oms_pipeline.outcome import PermanentError
    loop = asyncio.get_running_loop()
    answers = {i: loop.create_future() for i in range(5)}
    cleaned = []

    async def counter(order, ctx):
        i = int(order.external_id.split("-")[1])
        try:
            await answers[i]
            if i == 1:
                await answers[0]  # done already: no wait
                await anyio.sleep(0.01)  # a second, real wait
            if i == 2:
                raise PermanentError("refused after the answer")
            return NEXT
        finally:
            cleaned.append(i)

    for i in (0, 1, 2, 3):  # 4's answer never comes
        loop.call_later(0.05, answers[i].set_result, True)
    p, rows = await one_try(StageSpec("counter", "io", counter), 5, timeout=0.5)
    states = {i: rows[make_order(i).order_no].state for i in range(5)}
    assert states == {0: st.DONE, 1: st.DONE, 2: st.MANUAL, 3: st.DONE, 4: st.MANUAL}
    assert any("counter: refused after the answer" in h.reason for h in await p.store.history(make_order(2).order_no))
    assert any("counter: timed out after 0.5s" in h.reason for h in await p.store.history(make_order(4).order_no))
    assert sorted(cleaned) == [0, 1, 2, 3, 4]  # the timed-out one was cancelled, its cleanup ran
