"""Every stage outcome, retries with backoff, timeouts and handler failures."""
from __future__ import annotations

import anyio
import pytest

from oms_pipeline import outcome as oc
from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.ports import store as st
from oms_pipeline.stage import StageSpec
from tests.support.runtime import build, make_order, running

pytestmark = pytest.mark.anyio


async def step_next(order, ctx):
    order.results[ctx.stage] = "ran"
    return oc.NEXT


def spec(name, handler=step_next, kind="io"):
    return StageSpec(name, kind, handler)



async def finish(p, n=1):
    with anyio.fail_after(5):
        await p.wait_until(lambda: p.total_finished() >= n)


async def test_next_and_skip_walk_the_path_and_record_history():
    async def skipper(order, ctx):
        return oc.skip("not for this order")

    store = MemoryStore()
    p = build([spec("a"), spec("b", skipper), spec("c")], store=store)
    async with running(p):
        await p.submit(make_order(1))
        await finish(p)
    assert p.finished == {"@done": 1}
    history = [(h.stage, h.outcome) for h in await store.history("T00000000000000001")]
    assert history == [("intake", "created"), ("a", "next"), ("b", "skip"), ("c", "next")]


async def test_park_resumes_the_same_stage_when_the_virtual_clock_reaches_it():
    async def release_at_noon(order, ctx):
        due = order.created_at + 3600
        return oc.NEXT if ctx.now() >= due else oc.park(due, "not yet effective")

    p = build([spec("a"), spec("wait", release_at_noon), spec("c")])
    clock = p.clock
    async with running(p):
        order = make_order(1)
        order.created_at = clock.now()
        await p.submit(order)
        with anyio.fail_after(5):
            await p.wait_until(lambda: p.timers.pending == 1)
        assert p.total_finished() == 0
        clock.advance(3599)
        await anyio.sleep(0.01)
        assert p.total_finished() == 0
        clock.advance(1)
        await finish(p)
    assert p.finished == {"@done": 1}
    moves = [(e.from_status, e.to_status) for e in await p.store.events(order.order_no)]
    assert moves == [("CREATED", "IN_FULFILMENT"), ("IN_FULFILMENT", "PARKED"), ("PARKED", "IN_FULFILMENT"),
                     ("IN_FULFILMENT", "DISPATCHED")]


async def test_exceptions_retry_with_backoff_then_go_to_manual():
    calls = []

    async def flaky(order, ctx):
        calls.append(ctx.now())
        raise ConnectionError("WMS unavailable")

    store = MemoryStore()
    p = build([spec("a", flaky)], store=store,
              settings={"stage_defaults": {"retry": {"max_attempts": 3, "base_delay": 2.0, "factor": 3.0}}})
    async with running(p):
        await p.submit(make_order(1))
        for attempt, delay in ((1, 2.0), (2, 6.0)):
            with anyio.fail_after(5):
                await p.wait_until(lambda: len(calls) == attempt and p.timers.pending == 1)
            p.clock.advance(delay)
        await finish(p)
    assert [round(b - a, 6) for a, b in zip(calls, calls[1:])] == [2.0, 6.0]  # exponential backoff
    assert p.finished == {"@manual": 1}
    stored = await store.get("T00000000000000001")
    assert stored.state == st.MANUAL and stored.stage == "a"
    last = (await store.history("T00000000000000001"))[-1]
    assert last.outcome == "manual" and "gave up after 3 attempts" in last.reason
    assert "ConnectionError: WMS unavailable" in last.reason


async def test_permanent_error_goes_to_manual_at_once():
    async def broken(order, ctx):
        raise oc.PermanentError("address has no province")

    p = build([spec("a", broken)])
    async with running(p):
        await p.submit(make_order(1))
        await finish(p)
    assert p.finished == {"@manual": 1}
    assert p.workers["a"].stats.processed["manual"] == 1


async def test_stage_timeout_is_a_retry():
    async def slow(order, ctx):
        await anyio.sleep(10)
        return oc.NEXT

    p = build([spec("a", slow)], settings={"stage_defaults": {"io": {"pool": 4, "timeout": 0.05},
                                                              "retry": {"max_attempts": 1}}})
    async with running(p):
        await p.submit(make_order(1))
        await finish(p)
    assert p.finished == {"@manual": 1}
    assert p.workers["a"].stats.processed["retry"] == 1


async def test_cancel_and_manual_outcomes_end_the_order_with_their_reason():
    async def decide(order, ctx):
        return oc.cancel("cheat") if order.member_id == "m1" else oc.manual("remark needs review")

    ends = []
    p = build([spec("audit", decide), spec("after")])
    p.listeners.append(lambda end, reason, order: ends.append((order.order_no[-1], end, reason)))
    async with running(p):
        await p.submit(make_order(1))
        await p.submit(make_order(2))
        await finish(p, 2)
    assert sorted(ends) == [("1", "@cancelled", "cheat"), ("2", "@manual", "remark needs review")]


async def test_a_manual_order_is_replayed_from_the_exception_centre():
    fixed = {"ok": False}

    async def needs_fix(order, ctx):
        return oc.NEXT if fixed["ok"] else oc.manual("stock short")

    store = MemoryStore()
    p = build([spec("a", needs_fix), spec("b")], store=store)
    async with running(p):
        await p.submit(make_order(1))
        await finish(p)
        fixed["ok"] = True
        assert await p.release("T00000000000000001", "replayed by operator")
        await finish(p, 2)
    assert p.finished == {"@manual": 1, "@done": 1}
    assert (await store.get("T00000000000000001")).state == st.DONE
    moves = [e.to_status for e in await store.events("T00000000000000001")]
    assert moves == ["IN_FULFILMENT", "MANUAL_REVIEW", "IN_FULFILMENT", "DISPATCHED"]


async def test_split_children_flow_on_and_the_parent_ends_when_they_do():
    async def split_by_line(order, ctx):
        children = []
        for i in (1, 2):
            child = make_order(100 + i)
            child.order_no = f"{order.order_no}-{i}"
            children.append(child)
        return oc.split(children)

    store = MemoryStore()
    p = build([spec("split", split_by_line, "io"), spec("ship")], store=store)
    async with running(p):
        await p.submit(make_order(1))
        await finish(p, 3)
        with anyio.fail_after(5):
            while (await store.get("T00000000000000001")).state != st.DONE:
                await anyio.sleep(0.01)
    assert p.finished == {"@split": 1, "@done": 2}
    children = await store.children("T00000000000000001")
    assert [c.order_no for c in children] == ["T00000000000000001-1", "T00000000000000001-2"]
    assert all(c.state == st.DONE for c in children)
    assert [h.stage for h in await store.history(children[0].order_no)] == ["split", "ship"]


async def test_a_handler_that_returns_garbage_goes_to_manual():
    async def wrong(order, ctx):
        return "ok"

    p = build([spec("a", wrong)])
    async with running(p):
        await p.submit(make_order(1))
        await finish(p)
    assert p.finished == {"@manual": 1}


async def test_duplicate_intake_gives_the_same_order_once():
    p = build([spec("a")])
    async with running(p):
        first = await p.submit(make_order(1))
        again = make_order(1)
        again.order_no = "T99999999999999999"  # a retried request gets a new number drawn
        second = await p.submit(again)
        await finish(p)
    assert first == ("T00000000000000001", True)
    assert second == ("T00000000000000001", False)
    assert p.finished == {"@done": 1}
