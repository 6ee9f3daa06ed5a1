"""One contract for every coordination adapter (in-process now; Redis joins the fixture)."""
from __future__ import annotations

import pytest

from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.clock import VirtualClock

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["local"])
def coord(request):
    clock = VirtualClock()
    return LocalCoordination(clock), clock


async def test_capacity_holds_at_its_limit(coord):
    c, _ = coord
    taken = [await c.take_capacity("flow:WH:1", f"O{i}", 3, 60) for i in range(5)]
    assert taken == [True, True, True, False, False]
    assert await c.count("flow:WH:1") == 3


async def test_a_holder_is_counted_once_however_often_it_asks(coord):
    c, _ = coord
    for _ in range(3):
        assert await c.take_capacity("k", "O1", 2, 60)
    assert await c.count("k") == 1
    assert await c.take_capacity("k", "O2", 2, 60)
    assert await c.take_capacity("k", "O1", 2, 60)  # already a holder: still in, even at the limit
    assert not await c.take_capacity("k", "O3", 2, 60)


async def test_release_gives_the_slot_back(coord):
    c, _ = coord
    assert await c.take_capacity("k", "O1", 1, 60)
    assert not await c.take_capacity("k", "O2", 1, 60)
    await c.release_capacity("k", "O1")
    assert await c.take_capacity("k", "O2", 1, 60)
    await c.release_capacity("k", "nobody")  # releasing what was never taken changes nothing
    assert await c.count("k") == 1


async def test_counters_expire_after_their_ttl(coord):
    c, clock = coord
    assert await c.take_capacity("k", "O1", 1, 60)
    clock.advance(59)
    assert not await c.take_capacity("k", "O2", 1, 60)
    clock.advance(1)
    assert await c.count("k") == 0
    assert await c.take_capacity("k", "O2", 1, 60)
