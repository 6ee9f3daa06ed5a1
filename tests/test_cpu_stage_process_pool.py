"""A `cpu` stage in process mode runs its handler in another process and brings the order back."""
from __future__ import annotations

import os

import anyio
import pytest

from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.clock import SystemClock
from oms_pipeline.order import decode
from oms_pipeline.stage import StageSpec
from tests import cpu_handlers
from tests.support.runtime import build, make_order, running

pytestmark = pytest.mark.anyio


async def test_cpu_stage_on_the_process_pool():
    store = MemoryStore()
    p = build([StageSpec("risk", "cpu", cpu_handlers.record_pid), StageSpec("boom", "cpu", cpu_handlers.explode)],
              store=store, clock=SystemClock(),
              settings={"stages": {"risk": {"mode": "process", "settings": {"threshold": 7}},
                                   "boom": {"mode": "process"}},
                        "stage_defaults": {"retry": {"max_attempts": 1}}})
    try:
        async with running(p):
            for i in range(20):
                await p.submit(make_order(i))
            with anyio.fail_after(60):
                await p.wait_until(lambda: p.total_finished() == 20)
    finally:
        p.stop()
    assert p.finished == {"@manual": 20}  # the second stage always fails
    stored = await store.get("T00000000000000003")
    order = decode(stored.doc)
    assert order.results["pid"] != os.getpid() and order.results["threshold"] == 7
    last = (await store.history("T00000000000000003"))[-1]
    assert "ValueError: bad amounts" in last.reason
