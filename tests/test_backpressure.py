"""A slow stage: upstream queues sit at their bound, the producer waits, nothing grows."""
from __future__ import annotations

import anyio
import pytest

from oms_pipeline.bqueue import MIN_SHARE, BoundedQueue
from oms_pipeline.outcome import NEXT
from oms_pipeline.stage import StageSpec
from tests.support.runtime import build, make_order, running

pytestmark = pytest.mark.anyio


async def test_batches_respect_the_bound_and_share():
    q: BoundedQueue[int] = BoundedQueue(100)
    for i in range(100):
        await q.put(i)
    assert len(q) == 100 and q.room() == 0
    assert await q.get_batch(100, share=4) == list(range(25))  # a quarter of 100
    assert await q.get_batch(100, share=8) == list(range(25, 25 + MIN_SHARE))  # not 75/8: at least MIN_SHARE
    assert await q.get_batch(4) == [41, 42, 43, 44]  # never more than the limit
    assert await q.get_batch(3, share=8) == [45, 46, 47]


async def test_a_shared_small_backlog_goes_whole_to_one_consumer():
    q: BoundedQueue[int] = BoundedQueue(100)
    await q.put_many(list(range(10)))
    assert await q.get_batch(256, share=32) == list(range(10))  # one batch of 10, not ten of one


async def test_a_full_queue_makes_its_producer_wait_until_a_consumer_takes():
    q: BoundedQueue[int] = BoundedQueue(2)
    await q.put_many([1, 2])
    done = anyio.Event()

    async def producer():
        await q.put_many([3, 4])
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(producer)
        await anyio.sleep(0.01)
        assert not done.is_set() and q.waiting_producers == 1
        assert await q.get_batch(1) == [1]
        await anyio.sleep(0.01)
        assert not done.is_set()  # room for 3, not yet for 4
        assert await q.get_batch(5) == [2, 3]
        with anyio.fail_after(1):
            await done.wait()
    assert await q.get_batch(5) == [4]


async def test_resize_wakes_waiting_producers():
    q: BoundedQueue[int] = BoundedQueue(1)
    await q.put(1)
    async with anyio.create_task_group() as tg:
        tg.start_soon(q.put, 2)
        await anyio.sleep(0.01)
        q.resize(3)
        await anyio.sleep(0.01)
        assert len(q) == 2


async def test_slow_stage_holds_upstream_at_its_bound_and_stalls_intake():
    gate = anyio.Event()

    async def fast(order, ctx):
        return NEXT

    async def slow(order, ctx):
        await gate.wait()
        return NEXT

    p = build([StageSpec("fast", "io", fast), StageSpec("slow", "io", slow)],
              settings={"stage_defaults": {"io": {"pool": 2, "queue": 5, "batch": 5, "timeout": 60}}})
    submitted = 0

    async def producer():
        nonlocal submitted
        for i in range(100):
            await p.submit(make_order(i))
            submitted += 1

    async with running(p) as tg:
        tg.start_soon(producer)
        await anyio.sleep(0.2)
        # slow: 2 in flight + 5 queued; fast: its batch blocked putting + 5 queued.
        assert len(p.workers["slow"].queue) == 5
        assert len(p.workers["fast"].queue) == 5
        assert p.workers["fast"].queue.waiting_producers == 1  # intake is waiting
        held = submitted
        await anyio.sleep(0.1)
        assert submitted == held < 100
        gate.set()
        with anyio.fail_after(5):
            await p.wait_until(lambda: p.total_finished() == 100)
    assert submitted == 100
