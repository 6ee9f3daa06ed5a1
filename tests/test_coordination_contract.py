"""One contract for every coordination adapter: in-process and Redis."""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from uuid import uuid4

import anyio
import pytest

from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.adapters.redis_coordination import RedisCoordination
from oms_pipeline.clock import VirtualClock

from .conftest import require_service

pytestmark = pytest.mark.anyio

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
REDIS_SLACK = 0.02  # Redis expires a key just after (not at) its deadline, in whole ms


@asynccontextmanager
async def redis_coordination(**options) -> AsyncIterator[RedisCoordination]:
    """An open adapter on a prefix of its own, whose keys are deleted afterwards."""
    require_service("Redis", REDIS_HOST, REDIS_PORT)
    prefix = f"oms-test:{uuid4().hex}:"
    async with RedisCoordination(f"redis://{REDIS_HOST}:{REDIS_PORT}/0", prefix=prefix, **options) as c:
        try:
            yield c
        finally:
            await delete_keys(c)


async def delete_keys(c: RedisCoordination) -> None:
    """Delete every key under the adapter's prefix (SCAN, never KEYS: other users share Redis)."""
    keys = [key async for key in c.client.scan_iter(match=c.prefix + "*", count=500)]
    if keys:
        await c.client.delete(*keys)


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
async def coord(request):
    clock = VirtualClock()
    if request.param == "local":
        yield LocalCoordination(clock), clock
        return
    async with redis_coordination() as c:
        yield c, clock  # the clock is unused: Redis TTLs run on the server's real time


class Expiry:
    """A TTL and a way to let time pass that both adapters feel.

    The local adapter reads the VirtualClock, so a long TTL passes instantly;
    Redis expires keys in real time, so it gets a short TTL and real sleeps.
    """

    def __init__(self, ttl: float, tick: float, advance: Callable[[float], Awaitable[None]]) -> None:
        self.ttl, self.tick, self._advance = ttl, tick, advance

    async def __call__(self, seconds: float) -> None:
        await self._advance(seconds)


@pytest.fixture
def expire(coord) -> Expiry:
    c, clock = coord
    if isinstance(c, LocalCoordination):
        async def advance(seconds: float) -> None:
            clock.advance(seconds)
        return Expiry(60, 1, advance)

    async def sleep(seconds: float) -> None:
        await anyio.sleep(seconds + REDIS_SLACK)
    return Expiry(0.3, 0.1, sleep)


async def test_capacity_holds_at_its_limit(coord):
    c, _ = coord
    taken = [await c.take_capacity("flow:WH:1", f"O{i}", 3, 60) for i in range(5)]
    assert taken == [True, True, True, False, False]
    assert await c.count("flow:WH:1") == 3


async def test_several_takes_at_once_answer_each_in_order(coord):
    """take_capacities: each take as take_capacity would answer it, in the order given (a key at
    its limit refuses, a holder already counted is let in again, keys are counted apart)."""
    c, _ = coord
    assert await c.take_capacity("audit:member:M1", "O0", 1, 60)
    answers = await c.take_capacities([("audit:member:M1", "O1", 1, 60), ("audit:phone:138", "O1", 1, 60),
                                       ("audit:member:M1", "O0", 1, 60)])
    assert answers == [False, True, True]
    assert await c.count("audit:member:M1") == 1 and await c.count("audit:phone:138") == 1
    assert await c.take_capacities([]) == []


async def test_concurrent_takers_never_overshoot_the_limit(coord):
    """Hundreds of orders asking at once (on Redis they travel together in one pipeline): exactly
    `limit` get in, repeated askers are counted once, and each caller gets its own answer."""
    c, _ = coord
    answers: dict[str, list[bool]] = {}

    async def ask(holder: str) -> None:
        answers.setdefault(holder, []).append(await c.take_capacity("flow:WH:burst", holder, 50, 60))

    async with anyio.create_task_group() as tg:
        for i in range(300):
            tg.start_soon(ask, f"O{i % 200}")  # O0..O99 ask twice
    granted = {holder for holder, got in answers.items() if got[0]}
    assert len(granted) == 50 and await c.count("flow:WH:burst") == 50
    assert all(len(set(got)) == 1 for got in answers.values())  # a holder's two answers agree


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


async def test_counters_expire_after_their_ttl(coord, expire):
    c, _ = coord
    assert await c.take_capacity("k", "O1", 1, expire.ttl)
    await expire(expire.ttl - expire.tick)  # just before the end: still full
    assert not await c.take_capacity("k", "O2", 1, expire.ttl)
    await expire(expire.tick)  # the window's end
    assert await c.count("k") == 0
    assert await c.take_capacity("k", "O2", 1, expire.ttl)
