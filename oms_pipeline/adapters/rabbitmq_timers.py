"""Timers on RabbitMQ delay queues: one queue per delay tier, no plugin needed.

Topology, declared once by `open()` (a mismatch is a fatal configuration error)::

    schedule ─► <prefix>.delay (direct) ─► <prefix>.delay.<tier>s   x-message-ttl = tier
                                                 │ expired: dead-lettered
    schedule (due) ─► <prefix>.due (direct) ◄────┘
                           └─► <prefix>.timers.due ─► run()

Every message in a tier queue has the same TTL, so the head always expires
first: no head-of-line blocking (PITFALL 17), unlike per-message TTL.

Ladder, with s = the smallest tier and r = at - now: a timer goes to the
largest tier <= r + s/2, so it reaches the due queue at most s/2 after `at`.
`run()` re-parks a timer that arrives early the same way, so a 2 h 10 min park
walks 3600 s, 3600 s, 600 s. Nothing in the process holds a parked timer:
memory stays flat whatever is scheduled.

Why r + s/2 and not r: a timer armed for exactly a tier's length (a pay
deadline of `payment.timeout`, which the daemon adds to the tiers) has a
remaining time a few milliseconds short of that tier by the time it is
published. Rounded down it would walk the whole ladder below (600 s: 120, 120,
120, 120, 30, 30, 30, 5, ... ), every step a consume and a confirmed publish;
with the half-tier allowance it parks once and is consumed once. That is what
lets 200,000 pending pay deadlines fire on time (bench/RESULTS.md).

Precision:
  * r >= s/2: parked in tiers, each at most s/2 past `at` in total;
  * r < s/2 (or due): straight to the due queue; `run()` keeps it unacked in
    memory (at most `prefetch` of them) until `at`.
So a timer fires in [at, at + s/2], plus broker and consumer latency
(milliseconds unless the consumer is behind). Never before `at`.

Packs: `schedule_many` puts timers due within PACK_WINDOW (50 ms) of each other
into one message, parked until the last of them (so the first fires at most
50 ms later than alone). An intake batch's pay deadlines share one instant, so
a batch of 100 shop orders costs one confirmed publish and one delivery
instead of 100 each: that publish was ~12% of intake's CPU on a 200,000-order
run. The pending count (a metric) counts messages, a pack once.

Delivery is at least once; the pipeline tolerates a timer seen twice (the store
decides whether a wake-up still applies). Duplicates come from a redelivery
after a reconnect (acks for the old channel are dropped, PITFALL 14), from a
crash between re-parking and acking, or after `on_due` raised (nack + requeue).
Loss: dead-lettering from a tier queue to the due queue is not confirmed by
the broker, so a broker crash can lose a timer in that hop. The store is the
source of truth for wake times: the pipeline re-arms parked orders from it at
start, and its sweeper re-fires timers the broker lost.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import time
from dataclasses import dataclass
from functools import partial
from typing import Awaitable, Callable

import aio_pika
import anyio
import orjson
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelPreconditionFailed, PublishError

from ..clock import Clock
from ..ports.timers import Due

from .rabbitmq_common import DEAD_CHANNEL, Connected, ack_below, live_channel, quietly

log = logging.getLogger(__name__)

DEFAULT_TIERS = (1, 5, 30, 120, 600, 3600, 21600)
DUE_KEY = "due"
# Unacked deliveries of the due queue. A batch is acked once its callback returns, so prefetch is
# how much the broker can send ahead meanwhile: at 500 a 200,000-deadline burst fell ~1.5 s
# behind (the consumer waited on its own acks); at 2,000 it keeps up (bench/RESULTS.md).
DEFAULT_PREFETCH = 2000
# schedule_many: timers due within PACK_WINDOW seconds of each other share a message, at most
# PACK_MAX of them; at most PUBLISHES_IN_FLIGHT messages await their confirms at once.
PACK_WINDOW = 0.05
PACK_MAX = 500
PUBLISHES_IN_FLIGHT = 256


def with_deadlines(tiers: tuple[float, ...], deadlines: tuple[float, ...]) -> tuple[float, ...]:
    """The tiers plus a tier per standard deadline (the pay timeouts), so a timer armed for one
    of them parks once instead of walking the ladder below it."""
    return tuple(sorted(set(tiers) | set(deadlines)))


class TimersConfigError(RuntimeError):
    """The broker already holds this topology with other arguments."""


@dataclass(frozen=True)
class Topology:
    prefix: str
    tiers: tuple[float, ...]  # ascending seconds

    @property
    def delay_exchange(self) -> str:
        return f"{self.prefix}.delay"

    @property
    def due_exchange(self) -> str:
        return f"{self.prefix}.due"

    @property
    def due_queue(self) -> str:
        return f"{self.prefix}.timers.due"

    @staticmethod
    def tier_key(tier: float) -> str:
        return f"{tier:g}s"

    def tier_queue(self, tier: float) -> str:
        return f"{self.delay_exchange}.{self.tier_key(tier)}"

    @property
    def queues(self) -> tuple[str, ...]:
        return (*(self.tier_queue(t) for t in self.tiers), self.due_queue)

    @property
    def exchanges(self) -> tuple[str, ...]:
        return (self.delay_exchange, self.due_exchange)


class RabbitTimers(Connected):
    def __init__(self, url: str, clock: Clock, *, prefix: str = "oms",
                 tiers: tuple[float, ...] = DEFAULT_TIERS, prefetch: int = DEFAULT_PREFETCH,
                 pending_refresh: float = 5.0, publish_retry_for: float = 30.0) -> None:
        if not tiers or min(tiers) <= 0:
            raise ValueError("tiers must be positive seconds")
        self.topology = Topology(prefix, tuple(sorted(tiers)))
        self._url = url
        self._clock = clock
        self._prefetch = prefetch
        self._pending_refresh = pending_refresh
        self._publish_retry_for = publish_retry_for
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publisher: aio_pika.abc.AbstractChannel | None = None
        self._stats: aio_pika.abc.AbstractChannel | None = None
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        self._held = _Held()
        self._queued = 0
        self.reparked = 0  # timers that came back early and went into a tier again (each a broker round trip)
        self._refreshed = float("-inf")

    # -- lifecycle ------------------------------------------------------------

    async def open(self) -> None:
        self._connection = await aio_pika.connect_robust(self._url)
        try:
            await self._declare()
            # Confirms + on_return_raises: an unroutable timer is an error, not a log line (PITFALL 16).
            self._publisher = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            for name in self.topology.exchanges:
                self._exchanges[name] = await self._publisher.get_exchange(name, ensure=False)
            self._stats = await self._connection.channel()
            await self.refresh_pending()
        except BaseException:
            await self.close()
            raise



    async def _declare(self) -> None:
        """Declare on a throw-away channel: a robust channel would replay the declares on every
        reconnect, and a drifted argument would then loop on 406 (PITFALL 12)."""
        topo = self.topology
        channel = await self._connection.channel()
        try:
            delay = await channel.declare_exchange(topo.delay_exchange, "direct", durable=True, robust=False)
            due_exchange = await channel.declare_exchange(topo.due_exchange, "direct", durable=True, robust=False)
            due = await channel.declare_queue(topo.due_queue, durable=True, robust=False)
            await due.bind(due_exchange, DUE_KEY, robust=False)
            for tier in topo.tiers:
                queue = await channel.declare_queue(topo.tier_queue(tier), durable=True, robust=False, arguments={
                    "x-message-ttl": round(tier * 1000),
                    "x-dead-letter-exchange": topo.due_exchange,
                    "x-dead-letter-routing-key": DUE_KEY})
                await queue.bind(delay, topo.tier_key(tier), robust=False)
        except ChannelPreconditionFailed as exc:
            raise TimersConfigError(
                f"RabbitMQ timers topology {topo.prefix!r} conflicts with queues/exchanges already on the "
                f"broker ({exc}). Refusing to start: delete them or use another prefix.") from exc
        finally:
            await quietly(channel.close(), "timers")

    # -- scheduling -----------------------------------------------------------

    async def schedule(self, purpose: str, order_no: str, at: float) -> None:
        await self._park(_one(purpose, order_no, at), at)

    async def schedule_many(self, timers: list[tuple[str, str, float]]) -> None:
        """Timers due within PACK_WINDOW of each other travel as one message (up to PACK_MAX): an
        intake batch's pay deadlines are one publish and one delivery, not one each. The message
        parks until its last `at`, so its first fires at most PACK_WINDOW late. The messages are
        published side by side, at most PUBLISHES_IN_FLIGHT awaiting their confirms."""
        packs = _packs(sorted(timers, key=lambda t: t[2]))
        if len(packs) == 1:
            await self._park(*packs[0])
            return
        limit = anyio.Semaphore(PUBLISHES_IN_FLIGHT)

        async def one(body: bytes, at: float) -> None:
            async with limit:
                await self._park(body, at)

        try:
            async with anyio.create_task_group() as tg:
                for pack in packs:
                    tg.start_soon(one, *pack)
        except BaseExceptionGroup as group:
            raise _sole(group)

    async def _park(self, body: bytes, at: float) -> None:
        """Publish with a confirm, retrying while connect_robust restores the channel (a lost
        confirm can then leave a duplicate, which the pipeline tolerates). Unroutable raises
        PublishError at once: the topology is wrong and retrying will not help."""
        give_up = time.monotonic() + self._publish_retry_for
        while True:
            exchange, key = self._route(at - self._clock.now())
            message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                       content_type="application/json")
            try:
                await self._exchanges[exchange].publish(message, key, mandatory=True)
                return
            except PublishError:
                raise
            except DEAD_CHANNEL:
                if time.monotonic() >= give_up:
                    raise
                await anyio.sleep(0.5)

    def _route(self, remaining: float) -> tuple[str, str]:
        """(exchange, routing key) for a timer `remaining` seconds away; see the module docstring."""
        topo = self.topology
        allowance = topo.tiers[0] / 2
        if remaining < allowance:
            return topo.due_exchange, DUE_KEY
        tier = topo.tiers[bisect.bisect_right(topo.tiers, remaining + allowance) - 1]
        return topo.delay_exchange, topo.tier_key(tier)

    # -- pending (a metric) ---------------------------------------------------

    @property
    def pending(self) -> int:
        """Timers waiting: ready messages in the tier and due queues (refreshed every few seconds
        while `run()` runs) plus the ones `run()` holds until their `at`."""
        return self._queued + len(self._held)

    async def refresh_pending(self) -> int:
        total = 0
        for name in self.topology.queues:
            queue = await self._stats.declare_queue(name, passive=True, robust=False)
            total += queue.declaration_result.message_count or 0
        self._queued, self._refreshed = total, time.monotonic()
        return self.pending

    async def _refresh_if_stale(self) -> None:
        if time.monotonic() - self._refreshed < self._pending_refresh:
            return
        try:
            await self.refresh_pending()
        except DEAD_CHANNEL as exc:  # a metric: never stop delivering timers for it
            self._refreshed = time.monotonic()
            log.warning("timers: could not refresh pending count: %r", exc)

    # -- delivering -----------------------------------------------------------

    async def run(self, on_due: Callable[[list[Due]], Awaitable[None]]) -> None:
        channel = await self._connection.channel()
        try:
            await channel.set_qos(prefetch_count=self._prefetch)  # before consume (PITFALL 13)
            queue = await channel.declare_queue(self.topology.due_queue, passive=True)
            # aiormq runs the callback in its own tasks: it only hands over (PITFALL 6).
            send, receive = anyio.create_memory_object_stream[AbstractIncomingMessage](self._prefetch)
            tag = await queue.consume(partial(_hand_over, send))
            try:
                with send, receive:
                    await self._deliver_forever(receive, on_due)
            finally:
                # Stop deliveries first; whatever is unacked is requeued when the channel closes (PITFALL 15).
                with anyio.move_on_after(5, shield=True):
                    await quietly(queue.cancel(tag), "timers")
        finally:
            self._held = _Held()
            with anyio.move_on_after(5, shield=True):
                await quietly(channel.close(), "timers")

    async def _deliver_forever(self, receive, on_due) -> None:
        self._held = held = _Held()
        unacked = _Unacked()  # held or being re-parked: a multiple-ack must stay below them
        try:
            # Re-parks run beside the loop: waiting for their confirms batch by batch stalls the
            # due queue under load. Prefetch bounds how many are in flight.
            async with anyio.create_task_group() as reparks:
                while True:
                    batch = await self._take(receive, held.next_at())
                    now = self._clock.now()
                    fire, junk = [], []
                    for message in batch:
                        decoded = _decode(message)
                        if decoded is None:
                            junk.append(message)
                            continue
                        at, dues = decoded
                        if at <= now:
                            fire.append((message, dues))
                        elif at - now < self.topology.tiers[0] / 2:
                            held.push(message, at, dues)
                            unacked.add(message)
                        else:
                            unacked.add(message)
                            reparks.start_soon(self._repark, message, at, unacked)
                    for message, dues in held.pop_due(now):
                        unacked.discard(message)
                        fire.append((message, dues))
                    await self._fire(fire, on_due)
                    await self._ack([m for m, _ in fire] + junk, unacked)
                    await self._refresh_if_stale()
        except BaseExceptionGroup as group:
            raise _sole(group)

    async def _take(self, receive, wake_at: float | None) -> list[AbstractIncomingMessage]:
        """Wait for a message (or the next held `at`, or a pending refresh), then drain what is ready."""
        timeout = self._pending_refresh
        if wake_at is not None:
            timeout = min(timeout, max(0.0, wake_at - self._clock.now()))
        with anyio.move_on_after(timeout):
            batch = [await receive.receive()]
            while len(batch) < self._prefetch:
                try:
                    batch.append(receive.receive_nowait())
                except anyio.WouldBlock:
                    break
            return batch
        return []

    async def _repark(self, message: AbstractIncomingMessage, at: float, unacked: _Unacked) -> None:
        """Back into the tiers (the next tier down); the delivery is acked once the copy is confirmed.
        Unroutable ends run(); a broker away for longer than the retries requeues the delivery."""
        try:
            await self._park(message.body, at)
            self.reparked += 1
            await quietly(message.ack(), "timers")
        except PublishError:
            raise
        except DEAD_CHANNEL as exc:
            log.warning("timers: could not re-park %r, requeued: %r", message.body[:200], exc)
            await quietly(message.nack(requeue=True), "timers")
        finally:
            unacked.discard(message)  # only now: a multiple-ack covering an ack in flight is a 406

    async def _fire(self, fire: list[tuple[AbstractIncomingMessage, list[Due]]], on_due) -> None:
        if not fire:
            return
        try:
            await on_due(sorted((due for _, dues in fire for due in dues), key=lambda due: due.at))
        except BaseException:
            with anyio.CancelScope(shield=True):  # back to the queue for another try
                for message, _ in fire:
                    await quietly(message.nack(requeue=True), "timers")
            raise

    async def _ack(self, messages: list[AbstractIncomingMessage], unacked: _Unacked) -> None:
        """One multiple-ack per channel for the part of the batch below every still-unacked delivery."""
        by_channel: dict[int, list[AbstractIncomingMessage]] = {}
        for message in messages:
            channel = live_channel(message)
            if channel is not None:  # a dead channel's messages were requeued by the broker (PITFALL 14)
                by_channel.setdefault(id(channel), []).append(message)
        for key, group in by_channel.items():
            await ack_below(group, unacked.floor(key), "timers")


class _Held:
    """Timers that reached the due queue less than half the smallest tier early: kept unacked
    (bounded by prefetch) until their `at`, since a tier would overshoot and the due queue would
    hand them straight back."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, AbstractIncomingMessage, list[Due]]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, message: AbstractIncomingMessage, at: float, dues: list[Due]) -> None:
        heapq.heappush(self._heap, (at, next(self._seq), message, dues))

    def next_at(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[tuple[AbstractIncomingMessage, list[Due]]]:
        out = []
        while self._heap and self._heap[0][0] <= now:
            _, _, message, dues = heapq.heappop(self._heap)
            out.append((message, dues))
        return out


class _Unacked:
    """(channel, delivery tag) of deliveries that outlive their batch."""

    def __init__(self) -> None:
        self._keys: dict[int, tuple[int, int]] = {}  # id(message) -> (id(channel), tag)

    def add(self, message: AbstractIncomingMessage) -> None:
        channel = live_channel(message)
        if channel is not None:
            self._keys[id(message)] = (id(channel), message.delivery_tag)

    def discard(self, message: AbstractIncomingMessage) -> None:
        self._keys.pop(id(message), None)

    def floor(self, channel_key: int) -> float:
        return min((tag for key, tag in self._keys.values() if key == channel_key), default=float("inf"))


async def _hand_over(send, message: AbstractIncomingMessage) -> None:
    try:
        await send.send(message)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass  # run() has ended: the channel closes and the broker requeues the message


def _one(purpose: str, order_no: str, at: float) -> bytes:
    """The body of a message carrying one timer."""
    return orjson.dumps({"purpose": purpose, "order_no": order_no, "at": at})


def _packs(timers: list[tuple[str, str, float]]) -> list[tuple[bytes, float]]:
    """(body, at) messages for timers sorted by `at`: one timer as {purpose, order_no, at}; several
    due within PACK_WINDOW as {"at": the last one's, "timers": [[purpose, order_no, at], ...]}."""
    out: list[tuple[bytes, float]] = []
    i = 0
    while i < len(timers):
        j = i + 1
        while j < len(timers) and j - i < PACK_MAX and timers[j][2] - timers[i][2] <= PACK_WINDOW:
            j += 1
        if j - i == 1:
            out.append((_one(*timers[i]), timers[i][2]))
        else:
            at = timers[j - 1][2]
            out.append((orjson.dumps({"at": at, "timers": timers[i:j]}), at))
        i = j
    return out


def _decode(message: AbstractIncomingMessage) -> tuple[float, list[Due]] | None:
    """(when the message is due, its timers): one timer, or a pack of them."""
    try:
        body = orjson.loads(message.body)
        if "timers" in body:
            return float(body["at"]), [Due(str(p), str(no), float(at)) for p, no, at in body["timers"]]
        due = Due(body["purpose"], body["order_no"], float(body["at"]))
        return due.at, [due]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.error("timers: dropping an undecodable timer message: %r", message.body[:200])
        return None


def _sole(group: BaseExceptionGroup) -> BaseException:
    """run() raises what on_due (or a re-park) raised, not a group around it."""
    return group.exceptions[0] if len(group.exceptions) == 1 else group



