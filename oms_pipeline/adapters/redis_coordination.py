"""Coordination across daemon instances on Redis: capacity counters and fenced locks.

Redis is not the source of truth for effects: PostgreSQL is. Every counted
effect is also recorded in the order's checkpoint (results["flow_limit"],
results["audit_counted"]), so a lost Redis (restart without persistence, a
failover that drops recent writes, a flushed database) only resets the
counters: a window starts counting again from zero and may admit up to one
extra window's worth of orders; nothing already done is undone or repeated.
Fencing counters reset with it too, so a consumer that stores fencing tokens
must accept a restart of the sequence (e.g. pair the token with its own epoch).

Capacity: one Redis SET of holders per key. `take_capacity` is one Lua script
(atomic on the server, so concurrent takers never overshoot the limit), run
through `register_script`, which reloads the script after NOSCRIPT (restart,
failover, SCRIPT FLUSH; PITFALLS #22). The key's TTL is set only when the key
is created, so a window's expiry stays fixed at its first use.

Calls made in the same turn of the event loop (every slot of a stage asks at
once under load) go to Redis together, as one pipeline: one round trip and
one socket write for all of them, each script still atomic on its own. The
client's CPU per call, not Redis, was the limit (bench/RESULTS.md).

One difference from LocalCoordination: Redis deletes a set once its last holder
is released, so a key emptied by releases starts a fresh TTL at its next take.
The window lives in the key's name (day, hour), so this only delays forgetting.

Locks (`lock(key, ttl, wait)`, not in the port yet): redis-py's Lock with both
`timeout` and `blocking_timeout` always set and a new Lock per acquisition
(PITFALLS #21), plus a fencing token: an INCR counter per lock key, taken by a
script only while the lock is still ours, so tokens grow in acquisition order.

Time: TTLs here are real (server) time; a VirtualClock does not move them.
"""
from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Self

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockNotOwnedError

log = logging.getLogger("oms.coordination")

LOCK_POLL = 0.05  # seconds between attempts while waiting for a lock

# KEYS[1] holders set; ARGV: holder, limit, ttl in ms.
TAKE_CAPACITY = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
return 1
"""

# KEYS[1] lock, KEYS[2] its fencing counter; ARGV[1] our lock token.
# Fencing only while we still hold the lock keeps tokens in acquisition order.
FENCE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('INCR', KEYS[2]) end
return false
"""


class LockTimeout(TimeoutError):
    """The lock could not be had within `wait` seconds."""


NOT_OPEN = "RedisCoordination is not open: await open() first"


async def _not_open(*args: object, **kwargs: object) -> None:
    raise RuntimeError(NOT_OPEN)


def _ms(seconds: float) -> int:
    """Redis TTLs are whole milliseconds; a positive TTL never rounds down to 'delete now'."""
    return max(1, round(seconds * 1000)) if seconds > 0 else 0


def _fail_on_error(calls: list[tuple[list, list, asyncio.Future]]):
    """A pipeline that failed as a whole (connection lost, timeout) fails every call in it."""
    def done(task: asyncio.Task) -> None:
        error = None if task.cancelled() else task.exception()
        for _, _, future in calls:
            if future.done():
                continue
            if error is None:
                future.cancel()  # the pipeline's task was cancelled (shutdown)
            else:
                future.set_exception(error)
    return done


class RedisCoordination:
    def __init__(self, url: str, *, prefix: str = "oms:", max_connections: int = 32,
                 timeout: float = 5.0) -> None:
        self._url = url
        self.prefix = prefix
        self._max_connections = max_connections
        self._timeout = timeout
        self._redis: Redis | None = None
        self._take = self._fence = _not_open  # the registered scripts, once open
        self._takes: list[tuple[list, list, asyncio.Future]] = []  # take_capacity calls of this loop turn

    async def open(self) -> None:
        # Bounded pool that waits (up to `timeout`) for a free connection instead of
        # raising MaxConnectionsError under bursts (PITFALLS #20).
        pool = BlockingConnectionPool.from_url(
            self._url, max_connections=self._max_connections, timeout=self._timeout,
            socket_timeout=self._timeout, socket_connect_timeout=self._timeout)
        redis = Redis.from_pool(pool)  # the client owns the pool: aclose() closes both
        try:
            await redis.ping()  # fail at start-up, not at the first order
        except BaseException:
            await redis.aclose()
            raise
        self._redis = redis
        self._take = redis.register_script(TAKE_CAPACITY)
        self._fence = redis.register_script(FENCE)

    async def close(self) -> None:
        redis, self._redis = self._redis, None
        self._take = self._fence = _not_open
        if redis is not None:
            await redis.aclose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def client(self) -> Redis:
        """The underlying client (diagnostics and tests)."""
        if self._redis is None:
            raise RuntimeError(NOT_OPEN)
        return self._redis

    def key(self, key: str) -> str:
        return self.prefix + key

    async def ping(self) -> bool:
        """Readiness probe: one PING round trip (raises when Redis cannot be reached)."""
        return bool(await self.client.ping())

    async def take_capacity(self, key: str, holder: str, limit: int, ttl: float) -> bool:
        if self._redis is None:
            raise RuntimeError(NOT_OPEN)
        future = asyncio.get_running_loop().create_future()
        if not self._takes:
            asyncio.get_running_loop().call_soon(self._send_takes)
        self._takes.append(([self.key(key)], [holder, limit, _ms(ttl)], future))
        return bool(await future)

    def _send_takes(self) -> None:
        calls, self._takes = self._takes, []
        task = asyncio.ensure_future(self._run_takes(calls))
        task.add_done_callback(_fail_on_error(calls))

    async def _run_takes(self, calls: list[tuple[list, list, asyncio.Future]]) -> None:
        if len(calls) == 1:
            keys, args, future = calls[0]
            result = await self._take(keys=keys, args=args)
            if not future.done():
                future.set_result(result)
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for keys, args, _ in calls:
                await self._take(keys=keys, args=args, client=pipe)
            results = await pipe.execute(raise_on_error=False)
        for (_, _, future), result in zip(calls, results):
            if future.done():  # its caller gave up (cancelled, timed out)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def release_capacity(self, key: str, holder: str) -> None:
        await self.client.srem(self.key(key), holder)

    async def count(self, key: str) -> int:
        return await self.client.scard(self.key(key))

    @asynccontextmanager
    async def lock(self, key: str, ttl: float, wait: float) -> AsyncIterator[int]:
        """Hold `key` exclusively for at most `ttl` seconds; yields the fencing token.

        Waits up to `wait` seconds, then raises LockTimeout. The lock expires after
        `ttl` even if its holder dies, so a holder must finish (or pass the token to
        whatever it writes, which rejects smaller tokens) within `ttl`. Losing the
        lock before release is logged, not raised: the body's work is already done.
        """
        if ttl < 0.001:  # Lock sends whole milliseconds; 0 would never expire or fail
            raise ValueError(f"lock ttl must be at least 1 ms, got {ttl}")
        name = self.key(f"lock:{key}")
        lock, fence = await self._acquire(name, ttl, wait)
        try:
            yield fence
        finally:
            await self._release(lock, fence)

    async def _acquire(self, name: str, ttl: float, wait: float) -> tuple[Lock, int]:
        # A new Lock per acquisition: a shared Lock's token would be shared by every
        # task on the loop, letting one task release another's lock (PITFALLS #21).
        lock = Lock(self.client, name, timeout=ttl, blocking_timeout=wait,
                    sleep=min(LOCK_POLL, ttl / 2), thread_local=False)
        token = uuid.uuid4().hex
        if not await lock.acquire(token=token):
            raise LockTimeout(f"lock {name!r} not acquired within {wait}s")
        fence = await self._fence(keys=[name, f"{name}:fence"], args=[token])
        if fence is None:  # expired between SET and INCR: nothing left to release
            raise LockTimeout(f"lock {name!r} expired before it was fenced (ttl {ttl}s is too short)")
        return lock, int(fence)

    async def _release(self, lock: Lock, fence: int) -> None:
        # Shielded and bounded: a cancelled holder still frees the lock for the next
        # one rather than leaving it to its TTL, and a hung Redis cannot hold us.
        with anyio.move_on_after(self._timeout, shield=True):
            try:
                await lock.release()
            except LockNotOwnedError:
                log.warning("lock lost before release: its ttl ran out, another holder may "
                            "have run concurrently", extra={"event": "lock_lost",
                                                            "lock": str(lock.name), "fence": fence})
