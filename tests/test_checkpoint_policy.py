"""`checkpoint = false` on a stage: an order going straight on from it is not written there, but
its history still lists every stage, rests and status changes are always written, and a restart
resumes from the last checkpoint and runs the stages after it again."""
from __future__ import annotations

import anyio
import pytest

from oms_pipeline import outcome as oc
from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.ports import store as st
from oms_pipeline.stage import StageSpec
from tests.support.runtime import build, make_order, running

pytestmark = pytest.mark.anyio


class CountingStore(MemoryStore):
    """Records which boundaries reached the store, one list per checkpoint() call."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[tuple[str, str, str]] = []

    async def checkpoint(self, records):
        self.written.extend((r.order_no, r.from_stage, r.state) for r in records)
        return await super().checkpoint(records)


def stages(*names, **handlers):
    async def step(order, ctx):
        order.results[ctx.stage] = "ran"
        return oc.NEXT
    return [StageSpec(n, "io", handlers.get(n, step)) for n in names]


NO_CHECKPOINTS = {"stage_defaults": {"io": {"pool": 4, "checkpoint": False}}}


async def finish(p, n=1):
    with anyio.fail_after(5):
        await p.wait_until(lambda: p.total_finished() >= n)


async def test_straight_hops_are_not_written_but_the_history_lists_every_stage():
    store = CountingStore()
    p = build(stages("a", "b", "c", "d"), store=store, settings=NO_CHECKPOINTS)
    async with running(p):
        await p.submit(make_order(1))
        await finish(p)
    no = make_order(1).order_no
    assert store.written == [(no, "d", st.DONE)]  # only the end: a, b, c went straight on
    history = [(h.stage, h.outcome) for h in await store.history(no)]
    assert history == [("intake", "created"), ("a", "next"), ("b", "next"), ("c", "next"), ("d", "next")]
    assert (await store.get(no)).doc  # the end carries the document with every stage's result


async def test_by_default_io_stages_write_their_boundaries_and_cpu_stages_do_not():
    def compute(order, ctx):
        order.results[ctx.stage] = "computed"
        return oc.NEXT

    store = CountingStore()
    specs = [*stages("a"), StageSpec("b", "cpu", compute), *stages("c")]
    p = build(specs, store=store)
    async with running(p):
        await p.submit(make_order(1))
        await finish(p)
    no = make_order(1).order_no
    assert store.written == [(no, "a", st.QUEUED), (no, "c", st.DONE)]
    assert [h.stage for h in await store.history(no)] == ["intake", "a", "b", "c"]


async def test_one_stage_may_keep_its_checkpoint():
    store = CountingStore()
    settings = {"stage_defaults": {"io": {"pool": 4, "checkpoint": False}}, "stages": {"b": {"checkpoint": True}}}
    p = build(stages("a", "b", "c"), store=store, settings=settings)
    async with running(p):
        await p.submit(make_order(1))
        await finish(p)
    no = make_order(1).order_no
    assert store.written == [(no, "b", st.QUEUED), (no, "c", st.DONE)]
    assert [h.stage for h in await store.history(no)] == ["intake", "a", "b", "c"]


async def test_a_park_is_always_written_and_carries_the_stages_before_it():
    async def wait_an_hour(order, ctx):
        due = order.created_at + 3600
        return oc.NEXT if ctx.now() >= due else oc.park(due, "not yet effective")

    store = CountingStore()
    p = build(stages("a", "b", "wait", "c", wait=wait_an_hour), store=store, settings=NO_CHECKPOINTS)
    async with running(p):
        order = make_order(1)
        order.created_at = p.clock.now()
        await p.submit(order)
        with anyio.fail_after(5):
            await p.wait_until(lambda: p.timers.pending == 1)
        parked = await store.get(order.order_no)
        assert (parked.state, parked.stage) == (st.PARKED, "wait")
        assert [h.stage for h in await store.history(order.order_no)] == ["intake", "a", "b", "wait"]
        p.clock.advance(3600)
        await finish(p)
    # Woken up the order changes status (PARKED -> IN_FULFILMENT): that boundary is written too.
    assert [w[1:] for w in store.written] == [("wait", st.PARKED), ("wait", st.QUEUED), ("c", st.DONE)]


async def test_a_restart_resumes_from_the_last_checkpoint_and_replays_the_stages_after_it():
    """A crash after stage b ran (its boundary not written) replays b: its downstream effect
    must be keyed, which is why only stages whose effects are idempotent may drop checkpoints."""
    store = MemoryStore()
    gate = anyio.Event()
    runs: list[str] = []

    async def record(order, ctx):
        runs.append(ctx.stage)
        return oc.NEXT

    async def hang(order, ctx):
        runs.append(ctx.stage)
        await gate.wait()
        return oc.NEXT

    settings = {"stage_defaults": {"io": {"pool": 4, "checkpoint": False}}, "stages": {"a": {"checkpoint": True}}}
    first = build(stages("a", "b", "c", a=record, b=record, c=hang), store=store, settings=settings)
    async with running(first):
        await first.submit(make_order(1))
        with anyio.fail_after(5):
            while runs != ["a", "b", "c"]:
                await anyio.sleep(0.01)
    # The first instance is gone mid-stage c (cancelled: as good as killed for the store).
    no = make_order(1).order_no
    assert ((await store.get(no)).state, (await store.get(no)).stage) == (st.QUEUED, "b")
    runs.clear()
    gate.set()
    second = build(stages("a", "b", "c", a=record, b=record, c=record), store=store, settings=settings)
    async with running(second):
        await finish(second)
    assert runs == ["b", "c"]
    assert [h.stage for h in await store.history(no)] == ["intake", "a", "b", "c"]
