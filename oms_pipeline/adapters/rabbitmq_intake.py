"""Intake queues on RabbitMQ: upstream systems publish what they would send to the HTTP API.

Topology, declared once by `open()` (a mismatch stops startup, PITFALL 12)::

    upstream ──► <prefix>.intake.orders     durable queues; publish persistent messages
                 <prefix>.intake.payments   through the default exchange with the queue's
                 <prefix>.intake.reverse    name as routing key, with publisher confirms
                 <prefix>.intake.reports

    failed for now ──► <prefix>.intake.retry.<d>s  (fanout exchange + queue, x-message-ttl d)
                            └─ expired: dead-lettered through the default exchange under
                               its own routing key, i.e. back into the queue it came from
    invalid, or failed `intake.delivery_limit` times ──► <prefix>.intake.dead

A dead letter is the message as received (body, properties, headers) plus the
headers `x-oms-reason` (why), `x-oms-queue` (where it came from) and
`x-retry-count` (failed attempts). Failed attempts are counted in our own
`x-retry-count`, never in x-death (PITFALL 18). Publishers should not declare
the intake queues themselves (or only with `passive=True`): the daemon owns
their arguments (a dead-letter route for anything rejected).

Flow: a channel per consumed queue with prefetch `intake.prefetch`, set before
consuming (PITFALL 13). The aio-pika callback only hands the delivery to a
bounded memory stream (PITFALL 6); `intake.workers` tasks take up to
`intake.batch` deliveries at a time, call the queue's handler once for them,
publish dead letters and retries with confirms and `mandatory`, and only then
ack (one multiple-ack below the oldest delivery still in hand). A full
pipeline makes the handler wait, nothing is acked, and the broker stops
delivering at prefetch: a burst waits in RabbitMQ, not in the daemon's memory.

Delivery is at least once. After a reconnect (connect_robust) acks for the
old channel are dropped, since the broker has requeued those deliveries
already (PITFALL 14); handlers are idempotent (orders on source + external id,
payments on payment id), so a redelivery is a duplicate, never a second
effect. The hop from a retry queue back to its queue is the broker's
dead-lettering, which is not confirmed: a broker crash in that hop can lose
the message being retried (its publisher sends it again on its own retry).

Shutdown (PITFALL 15): `stop()` cancels the consumers first, lets the workers
finish what was delivered within the grace period, and leaves the rest
unacked: closing the channel gives it back to the queue.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aio_pika
import anyio
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage
from aio_pika.exceptions import ChannelPreconditionFailed, PublishError

from ..config import IntakeSettings
from ..metrics import IntakeCounts
from ..ports.intake import ACCEPTED, DUPLICATE, INVALID, QUEUES, RETRY, Handler, NotNow, Verdict

from .rabbitmq_common import DEAD_CHANNEL, Connected, ack_below, describe, live_channel, quietly

log = logging.getLogger("oms.intake")

REASON, ORIGIN, RETRIES = "x-oms-reason", "x-oms-queue", "x-retry-count"
# What the broker adds when it dead-letters (the retry hop): never republished (PITFALL 18).
_BROKER_HEADERS = ("x-death", "x-first-death-", "x-last-death-")


class IntakeConfigError(RuntimeError):
    """The broker already holds these queues with other arguments."""


@dataclass(frozen=True)
class Topology:
    prefix: str
    retry_delays: tuple[float, ...]  # seconds before retry 1, 2, ... (the last repeats)

    def queue(self, kind: str) -> str:
        return f"{self.prefix}.intake.{kind}"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.intake.dead"

    def retry(self, delay: float) -> str:
        """The fanout exchange and the TTL queue (same name) of one retry delay."""
        return f"{self.prefix}.intake.retry.{delay:g}s"

    def delay_for(self, failures: int) -> float:
        return self.retry_delays[min(failures, len(self.retry_delays)) - 1]

    @property
    def queues(self) -> tuple[str, ...]:
        return (*(self.queue(k) for k in QUEUES), self.dead, *self.exchanges)  # a retry queue is named as its exchange

    @property
    def exchanges(self) -> tuple[str, ...]:
        return tuple(self.retry(d) for d in sorted(set(self.retry_delays)))


@dataclass(eq=False)
class _Consumed:
    """One consumed queue: its channel, consumer and the stream its workers read."""

    kind: str
    name: str
    handler: Handler
    channel: Any = None
    queue: Any = None
    tag: str = ""
    send: Any = None
    receive: Any = None
    in_hand: _InHand = field(default_factory=lambda: _InHand())
    # Acks and requeues one batch at a time: a multiple-ack must never cover a delivery tag that
    # another worker is about to ack or nack on its own (the broker closes the channel for that).
    settling: anyio.Lock = field(default_factory=anyio.Lock)


class RabbitIntake(Connected):
    def __init__(self, url: str, *, prefix: str = "oms", settings: IntakeSettings = IntakeSettings(),
                 counts: IntakeCounts | None = None, publish_retry_for: float = 10.0) -> None:
        self.topology = Topology(prefix, tuple(settings.retry_delays))
        self.counts = counts or IntakeCounts()
        self._url = url
        self._settings = settings
        self._publish_retry_for = publish_retry_for
        self._handlers: dict[str, Handler] = {}
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._default: AbstractExchange | None = None
        self._retry_exchanges: dict[float, AbstractExchange] = {}
        self._consumed: list[_Consumed] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self._done = anyio.Event()

    # -- lifecycle ------------------------------------------------------------

    def register(self, kind: str, handler: Handler) -> None:
        """The handler of one intake queue; a queue without one is declared but not consumed."""
        if kind not in QUEUES:
            raise ValueError(f"no intake queue {kind!r} (known: {', '.join(QUEUES)})")
        self._handlers[kind] = handler

    @property
    def consumed(self) -> tuple[str, ...]:
        return tuple(self._handlers)

    async def open(self) -> None:
        self._connection = await aio_pika.connect_robust(self._url)
        try:
            await self._declare()
            # Confirms + on_return_raises: an unroutable dead letter is an error, not a log line (PITFALL 16).
            publisher = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._default = publisher.default_exchange
            for delay in sorted(set(self.topology.retry_delays)):
                name = self.topology.retry(delay)
                self._retry_exchanges[delay] = await publisher.get_exchange(name, ensure=False)
        except BaseException:
            await self.close()
            raise



    async def _declare(self) -> None:
        """On a throw-away channel: a robust channel would replay these on every reconnect (PITFALL 12)."""
        topo = self.topology
        channel = await self._connection.channel()
        try:
            rejected = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": topo.dead}
            for kind in QUEUES:
                await channel.declare_queue(topo.queue(kind), durable=True, robust=False, arguments=rejected)
            await channel.declare_queue(topo.dead, durable=True, robust=False)
            for delay in sorted(set(topo.retry_delays)):
                name = topo.retry(delay)
                exchange = await channel.declare_exchange(name, "fanout", durable=True, robust=False)
                # No dead-letter routing key: an expired retry keeps its own, the name of its queue.
                queue = await channel.declare_queue(name, durable=True, robust=False, arguments={
                    "x-message-ttl": round(delay * 1000), "x-dead-letter-exchange": ""})
                await queue.bind(exchange, "", robust=False)
        except ChannelPreconditionFailed as exc:
            raise IntakeConfigError(
                f"RabbitMQ intake queues {topo.prefix!r}.intake.* conflict with queues/exchanges already on the "
                f"broker ({exc}). Refusing to start: delete them or use another broker.prefix.") from exc
        finally:
            await quietly(channel.close(), "intake")

    async def run(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        """Consume every queue that has a handler until `stop()` (or cancellation)."""
        try:
            async with anyio.create_task_group() as self._tg:
                for kind, handler in self._handlers.items():
                    consumed = await self._consume(kind, handler)
                    for _ in range(self._settings.workers):
                        self._tg.start_soon(self._work, consumed)
                task_status.started()
        finally:
            self._done.set()
            with anyio.move_on_after(5, shield=True):
                for consumed in self._consumed:
                    await quietly(consumed.channel.close(), "intake")  # what is still unacked goes back to its queue

    async def stop(self, grace: float) -> None:
        """Cancel the consumers, let the workers finish what was delivered (up to `grace` seconds)."""
        for consumed in self._consumed:
            with anyio.move_on_after(5, shield=True):
                await quietly(consumed.queue.cancel(consumed.tag), "intake")  # deliveries end with Cancel-Ok
            consumed.send.close()  # the workers take what is buffered, then end
        if self._tg is None:
            return
        with anyio.move_on_after(grace):
            await self._done.wait()
        self._tg.cancel_scope.cancel()

    def unacked(self, kind: str) -> int:
        """Deliveries of the queue this process holds and has not settled (at most prefetch)."""
        return sum(len(c.in_hand) for c in self._consumed if c.kind == kind)

    # -- consuming ------------------------------------------------------------

    async def _consume(self, kind: str, handler: Handler) -> _Consumed:
        prefetch = self._settings.prefetch
        consumed = _Consumed(kind, self.topology.queue(kind), handler)
        consumed.channel = await self._connection.channel()
        await consumed.channel.set_qos(prefetch_count=prefetch)  # before consume (PITFALL 13)
        consumed.queue = await consumed.channel.declare_queue(consumed.name, passive=True)
        consumed.send, consumed.receive = anyio.create_memory_object_stream[AbstractIncomingMessage](prefetch)
        self._consumed.append(consumed)
        consumed.tag = await consumed.queue.consume(partial(_hand_over, consumed))
        return consumed

    async def _work(self, consumed: _Consumed) -> None:
        with consumed.receive.clone() as receive:
            while batch := await self._take(receive):
                await self._handle(consumed, batch)

    async def _take(self, receive) -> list[AbstractIncomingMessage]:
        """The next delivery (waiting for it), and whatever else is already buffered, up to a batch."""
        try:
            batch = [await receive.receive()]
        except anyio.EndOfStream:
            return []
        while len(batch) < self._settings.batch:
            try:
                batch.append(receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
        return batch

    async def _handle(self, consumed: _Consumed, batch: list[AbstractIncomingMessage]) -> None:
        try:
            verdicts = await consumed.handler([m.body for m in batch])
        except NotNow:
            return  # left unacked: the broker gives them back when the channel closes
        except Exception as exc:  # noqa: BLE001 - a handler failure is a retry, never the end of intake
            if len(batch) > 1:  # one message may be at fault: the others must not pay for it
                for message in batch:
                    await self._handle(consumed, [message])
                return
            log.warning("intake handler failed", extra={"event": "intake_failed", "queue": consumed.name,
                                                        "reason": describe(exc)})
            verdicts = [Verdict(RETRY, describe(exc))]
        if len(verdicts) != len(batch):
            raise RuntimeError(f"intake handler of {consumed.name} answered {len(verdicts)} verdicts "
                               f"for {len(batch)} messages")
        await self._settle(consumed, batch, verdicts)

    async def _settle(self, consumed: _Consumed, batch: list[AbstractIncomingMessage],
                      verdicts: list[Verdict]) -> None:
        done: list[AbstractIncomingMessage] = []
        back: list[AbstractIncomingMessage] = []
        async with anyio.create_task_group() as tg:  # dead letters and retries confirm concurrently
            for message, verdict in zip(batch, verdicts):
                if verdict.result in (ACCEPTED, DUPLICATE):
                    self.counts.add(consumed.kind, verdict.result)
                    done.append(message)
                else:
                    tg.start_soon(self._divert, consumed, message, verdict, done, back)
        async with consumed.settling:
            for message in back:
                if consumed.in_hand.pop(message) is not None:
                    await quietly(message.nack(requeue=True), "intake")
            await self._ack(consumed, done)

    async def _divert(self, consumed: _Consumed, message: AbstractIncomingMessage, verdict: Verdict,
                      done: list[AbstractIncomingMessage], back: list[AbstractIncomingMessage]) -> None:
        """Dead-letter (invalid, or out of attempts) or retry later; the delivery is acked once the
        copy is confirmed. Not confirmed: back to its queue at once (or already, after a reconnect)."""
        failures = _failures(message) + (verdict.result == RETRY)
        if verdict.result == INVALID or failures >= self._settings.delivery_limit:
            reason = verdict.reason if verdict.result == INVALID else \
                f"failed {failures} times, last: {verdict.reason}"
            result, exchange, key = "dead_lettered", self._default, self.topology.dead
            log.warning("intake message dead-lettered", extra={
                "event": "dead_letter", "queue": consumed.name, "reason": reason, "message_id": message.message_id})
        else:
            reason = verdict.reason
            result, key = "retried", consumed.name
            exchange = self._retry_exchanges[self.topology.delay_for(failures)]
        if await self._publish(exchange, key, message, _headers(message, reason, consumed.name, failures)):
            self.counts.add(consumed.kind, result)
            done.append(message)
        else:
            back.append(message)

    async def _publish(self, exchange: AbstractExchange, key: str, message: AbstractIncomingMessage,
                       headers: dict[str, Any]) -> bool:
        """Publish a copy with a confirm, retrying while connect_robust restores the channel. False when
        the delivery itself is gone meanwhile (the broker redelivers it) or retries ran out. Unroutable
        raises PublishError: the topology is broken and retrying will not help."""
        copy = aio_pika.Message(message.body, headers=headers, content_type=message.content_type,
                                content_encoding=message.content_encoding, message_id=message.message_id,
                                correlation_id=message.correlation_id, timestamp=message.timestamp,
                                app_id=message.app_id, type=message.type,
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        give_up = time.monotonic() + self._publish_retry_for
        while live_channel(message) is not None:
            try:
                await exchange.publish(copy, key, mandatory=True)
                return True
            except PublishError:
                raise
            except DEAD_CHANNEL as exc:
                if time.monotonic() >= give_up:
                    log.warning("intake: could not publish a copy, requeued: %r", exc)
                    return False
                await anyio.sleep(0.5)
        return False

    async def _ack(self, consumed: _Consumed, messages: list[AbstractIncomingMessage]) -> None:
        """One multiple-ack for the settled deliveries below every one still in hand; the rest one by one.
        Deliveries of a channel that died were requeued by the broker: their acks are dropped (PITFALL 14)."""
        in_hand = consumed.in_hand
        live: dict[int, list[AbstractIncomingMessage]] = {}
        for message in messages:
            key = in_hand.pop(message)
            if key is not None and live_channel(message) is not None:
                live.setdefault(key, []).append(message)
        for key, group in live.items():
            await ack_below(group, in_hand.floor(key), "intake")


class _InHand:
    """(channel, delivery tag) of every delivery taken from the broker and not settled yet."""

    def __init__(self) -> None:
        self._keys: dict[int, tuple[int, int]] = {}  # id(message) -> (id(channel), tag)

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, message: AbstractIncomingMessage) -> None:
        channel = live_channel(message)
        if channel is not None:
            self._keys[id(message)] = (id(channel), message.delivery_tag)

    def pop(self, message: AbstractIncomingMessage) -> int | None:
        entry = self._keys.pop(id(message), None)
        return entry[0] if entry else None

    def discard(self, message: AbstractIncomingMessage) -> None:
        self._keys.pop(id(message), None)

    def floor(self, channel_key: int) -> float:
        return min((tag for key, tag in self._keys.values() if key == channel_key), default=float("inf"))


async def _hand_over(consumed: _Consumed, message: AbstractIncomingMessage) -> None:
    consumed.in_hand.add(message)
    try:
        await consumed.send.send(message)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        consumed.in_hand.discard(message)  # stopping: the broker requeues it when the channel closes


def _failures(message: AbstractIncomingMessage) -> int:
    try:
        return max(0, int((message.headers or {}).get(RETRIES, 0)))
    except (TypeError, ValueError):
        return 0


def _headers(message: AbstractIncomingMessage, reason: str, origin: str, failures: int) -> dict[str, Any]:
    headers = {k: v for k, v in (message.headers or {}).items() if not k.startswith(_BROKER_HEADERS)}
    headers.update({REASON: reason[:1000], ORIGIN: origin, RETRIES: failures})
    return headers



