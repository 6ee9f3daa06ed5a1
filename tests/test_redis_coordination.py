"""What only the Redis adapter can get wrong: races across connections, server-side
TTLs, the script cache, lost data, and fenced locks."""
from __future__ import annotations

import logging
import time

import anyio
import pytest

from oms_pipeline.adapters.redis_coordination import LockTimeout, RedisCoordination

from .test_coordination_contract import delete_keys, redis_coordination

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


@pytest.fixture
async def coord():
    async with redis_coordination() as c:
        yield c


async def gather(*calls) -> list:
    """Run the awaitables concurrently; results in call order."""
    results: list = [None] * len(calls)

    async def run(i: int, call) -> None:
        results[i] = await call

    async with anyio.create_task_group() as tg:
        for i, call in enumerate(calls):
            tg.start_soon(run, i, call)
    return results


async def test_concurrent_takers_never_exceed_the_limit(coord: RedisCoordination):
    taken = await gather(*(coord.take_capacity("flow:WH:1", f"O{i}", 50, 60) for i in range(200)))
    assert taken.count(True) == 50
    assert await coord.count("flow:WH:1") == 50


async def test_one_holder_asking_concurrently_counts_once(coord: RedisCoordination):
    taken = await gather(*(coord.take_capacity("k", "O1", 5, 60) for _ in range(20)))
    assert all(taken)
    assert await coord.count("k") == 1


async def test_one_batch_of_takes_keeps_each_takers_key_holder_limit_and_ttl(coord: RedisCoordination):
    # Takes of one loop turn go as one script call with their fields joined in one string:
    # each must still be judged by its own limit and ttl, empty or odd holders included.
    calls = [("a", "", 1, 30), ("a", "O2", 1, 30), ("b", "O 3,x", 2, 90), ("b", "O4", 2, 90),
             ("b", "O5", 2, 90), ("c", "O6", 0, 30), ("d", "\x1eO7\u00e9", 1, 0.0004)]
    taken = await gather(*(coord.take_capacity(*call) for call in calls))
    assert taken == [True, False, True, True, False, False, True]
    assert await coord.client.smembers(coord.key("b")) == {b"O 3,x", b"O4"}
    assert await coord.client.smembers(coord.key("a")) == {b""}
    assert 29_000 < await coord.client.pttl(coord.key("a")) <= 30_000
    assert 89_000 < await coord.client.pttl(coord.key("b")) <= 90_000
    with pytest.raises(ValueError, match="separator"):
        await coord.take_capacity("a", "O\x1f8", 1, 30)


async def test_the_ttl_is_fixed_at_first_use(coord: RedisCoordination):
    assert await coord.take_capacity("k", "O1", 10, 60)
    first = await coord.client.pttl(coord.key("k"))
    assert 59_000 < first <= 60_000
    await anyio.sleep(0.2)
    assert await coord.take_capacity("k", "O2", 10, 600)  # a later, longer ttl changes nothing
    assert await coord.take_capacity("k", "O1", 10, 600)
    assert await coord.client.pttl(coord.key("k")) <= first - 150


async def test_takes_survive_a_flushed_script_cache(coord: RedisCoordination):
    assert await coord.take_capacity("k", "O1", 2, 60)
    await coord.client.script_flush()  # as after a restart or failover: NOSCRIPT next time
    assert await coord.take_capacity("k", "O2", 2, 60)
    assert not await coord.take_capacity("k", "O3", 2, 60)


async def test_lost_redis_data_only_resets_the_counters(coord: RedisCoordination):
    assert await coord.take_capacity("k", "O1", 1, 60)
    assert not await coord.take_capacity("k", "O2", 1, 60)
    await delete_keys(coord)  # FLUSHALL, limited to this test's prefix
    assert await coord.count("k") == 0
    assert await coord.take_capacity("k", "O2", 1, 60)
    assert await coord.count("k") == 1


async def test_a_waiting_contender_gets_the_lock_next_with_a_larger_token(coord: RedisCoordination):
    events: list[tuple[str, int]] = []

    async def first() -> None:
        async with coord.lock("job", ttl=5, wait=1) as fence:
            events.append(("first in", fence))
            await anyio.sleep(0.3)
            events.append(("first out", fence))

    async def second() -> None:
        await anyio.sleep(0.05)  # let the first one take it
        async with coord.lock("job", ttl=5, wait=2) as fence:
            events.append(("second in", fence))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        tg.start_soon(second)
    assert [name for name, _ in events] == ["first in", "first out", "second in"]
    assert events[2][1] > events[0][1]


async def test_a_dead_holders_lock_is_free_after_its_ttl(coord: RedisCoordination):
    dead = coord.lock("job", ttl=0.3, wait=0)
    await dead.__aenter__()  # the holder dies: it never leaves the block
    started = time.monotonic()
    async with coord.lock("job", ttl=5, wait=2):
        waited = time.monotonic() - started
    assert 0.2 < waited < 1.5
    await dead.__aexit__(None, None, None)  # only to finish its generator: logs the lost lock


async def test_waiting_longer_than_wait_raises_lock_timeout(coord: RedisCoordination):
    async with coord.lock("job", ttl=5, wait=0):
        started = time.monotonic()
        with pytest.raises(LockTimeout):
            async with coord.lock("job", ttl=5, wait=0.2):
                pass
        assert 0.1 < time.monotonic() - started < 1


async def test_a_lock_lost_before_release_is_logged_not_raised(coord: RedisCoordination, caplog):
    with caplog.at_level(logging.WARNING, logger="oms.coordination"):
        async with coord.lock("job", ttl=0.1, wait=0):
            await anyio.sleep(0.2)  # outlives its ttl
            async with coord.lock("job", ttl=5, wait=0):  # so someone else can take it
                pass
    assert any(r.__dict__.get("event") == "lock_lost" for r in caplog.records)
