"""Coordination across daemon instances on Redis: capacity counters and fenced locks.

Redis is not the source of truth for effects: PostgreSQL is. Every counted
effect is also recorded in the order's checkpoint (results["flow_limit"],
results["audit_counted"]), so a lost Redis (restart without persistence, a
failover that drops recent writes, a flushed database) only resets the
counters: a window starts counting again from zero and may admit up to one
extra window's worth of orders; nothing already done is undone or repeated.
Fencing counters reset with it too, so a consumer that stores fencing tokens
must accept a restart of the sequence (e.g. pair the token with its own epoch).

Capacity: one Redis SET of holders per key. `take_capacity` runs in a Lua
script (atomic on the server, so concurrent takers never overshoot the limit), run
through `register_script`, which reloads the script after NOSCRIPT (restart,
failover, SCRIPT FLUSH; PITFALLS #22). The key's TTL is set only when the key
is created, so a window's expiry stays fixed at its first use.

Calls made in the same turn of the event loop (every slot of a stage asks at
once under load) go to Redis together, as one call of a script that takes
them all (`TAKE_MANY`, up to MAX_TAKES at once): one command, one round trip
and one reply for all of them, atomic as a whole. The client's CPU per
command, not Redis, was the limit (bench/RESULTS.md). The keys of one call
may live in different hash slots, so on a Redis Cluster the batch would have
to be split by slot first; a single server or a primary with replicas (what
the daemon supports) takes it as it is.

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
from typing import Self, Sequence

import anyio
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockNotOwnedError

log = logging.getLogger("oms.coordination")

LOCK_POLL = 0.05  # seconds between attempts while waiting for a lock

# take_capacity for many takers at once: KEYS[i] is a holders set; ARGV[1] holds its taker's holder,
# limit and ttl in ms as the fields 3i-2..3i of one string, each field after ARG_SEP. One string
# instead of three arguments a taker: the client encodes every argument on its own, in Python, and
# that was most of a take's client CPU (bench/RESULTS.md, "Redis: capacity counters").
TAKE_MANY = """
local joined, fields, from = ARGV[1], {}, 2
while from <= #joined + 1 do
  local stop = string.find(joined, '\\31', from, true) or #joined + 1
  fields[#fields + 1] = string.sub(joined, from, stop - 1)
  from = stop + 1
end
local out = {}
for i = 1, #KEYS do
  local key, holder = KEYS[i], fields[3 * i - 2]
  local count = redis.call('SCARD', key)
  if count < tonumber(fields[3 * i - 1]) then
    redis.call('SADD', key, holder)  -- a holder already in: no change
    if count == 0 then redis.call('PEXPIRE', key, fields[3 * i]) end  -- created now (an empty set is no key)
    out[i] = 1
  else
    out[i] = redis.call('SISMEMBER', key, holder)  -- at the limit: only those already in
  end
end
return out
"""
ARG_SEP = "\x1f"  # before every field of TAKE_MANY's ARGV[1]; a holder may not contain it
MAX_TAKES = 500  # takers per script call: keeps one call to a millisecond or two of Redis time

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


def _fail_on_error(calls: list[tuple[str, str, list[asyncio.Future]]]):
    """A script call that failed (connection lost, timeout) fails every take in it."""
    def done(task: asyncio.Task) -> None:
        error = None if task.cancelled() else task.exception()
        for _, _, futures in calls:
            for future in futures:
                if future.done():
                    continue
                if error is None:
                    future.cancel()  # the call's task was cancelled (shutdown)
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
        self._take_many = self._fence = _not_open  # the registered scripts, once open
        # take_capacity calls of this loop turn: (key, holder, limit) -> (script fields, their futures)
        self._takes: dict[tuple[str, str, int], tuple[str, list[asyncio.Future]]] = {}

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
        self._take_many = redis.register_script(TAKE_MANY)
        self._fence = redis.register_script(FENCE)

    async def close(self) -> None:
        redis, self._redis = self._redis, None
        self._take_many = self._fence = _not_open
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
        self._check(holder)
        return bool(await self._take(key, holder, limit, ttl))

    async def take_capacities(self, takes: Sequence[tuple[str, str, int, float]]) -> list[bool]:
        for _, holder, _, _ in takes:
            self._check(holder)  # before any is queued: all or none go out
        futures = [self._take(*take) for take in takes]  # queued before the first wait: one script call
        try:
            return [bool(await future) for future in futures]
        except BaseException:
            for future in futures:  # one failure raised, not one logged per take never awaited
                if future.done() and not future.cancelled():
                    future.exception()
            raise

    def _check(self, holder: str) -> None:
        if self._redis is None:
            raise RuntimeError(NOT_OPEN)
        if ARG_SEP in holder:
            raise ValueError(f"capacity holder {holder!r} contains the separator {ARG_SEP!r}")

    def _take(self, key: str, holder: str, limit: int, ttl: float) -> asyncio.Future:
        """Queue a take (its holder checked) for this turn of the loop's script call; its answer
        comes in the future. The same holder asking for the same key and limit twice in one turn
        (the split children of one order in audit) goes once: the script would answer the second
        as the first, its holder already counted or the key full without it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._takes:
            loop.call_soon(self._send_takes)
        slot = (key, holder, limit)
        same = self._takes.get(slot)
        if same is None:
            self._takes[slot] = (f"{ARG_SEP}{holder}{ARG_SEP}{limit}{ARG_SEP}{_ms(ttl)}", [future])
        else:
            same[1].append(future)
        return future

    def _send_takes(self) -> None:
        takes, self._takes = self._takes, {}
        calls = [(self.key(key), fields, futures) for (key, _, _), (fields, futures) in takes.items()]
        for i in range(0, len(calls), MAX_TAKES):
            chunk = calls[i:i + MAX_TAKES]
            task = asyncio.ensure_future(self._run_takes(chunk))
            task.add_done_callback(_fail_on_error(chunk))

    async def _run_takes(self, calls: list[tuple[str, str, list[asyncio.Future]]]) -> None:
        results = await self._take_many(keys=[key for key, _, _ in calls],
                                        args=["".join([fields for _, fields, _ in calls])])
        for (_, _, futures), result in zip(calls, results):
            for future in futures:
                if not future.done():  # done: its caller gave up (cancelled, timed out)
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
