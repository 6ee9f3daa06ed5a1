"""The simulated downstream systems' side of RabbitMQ: consume the published commands, apply them.

In production the relay publishes commands to `<prefix>.events`; the
downstream systems (finance, inventory, WMS, TMS, promotions, accounts,
notifications) are simulated inside the daemon, so the daemon also runs their
consumer. Real downstream systems would bind queues of their own to the
exchange (e.g. finance: `fms.#`) and this consumer would not run.

Topology, declared once by `open()`::

    <prefix>.events (topic) ─► <prefix>.downstream   bound to fms.#, inventory.#, wms.#, tms.#,
                                                      promo.#, account.#, notify.#
    retries      ─► (default exchange) ─► <prefix>.downstream          x-retry-count + 1
    dead letters ─► (default exchange) ─► <prefix>.downstream.dead     x-retry-count, x-dead-reason

Each delivery is applied with `relay.execute` (commands.apply, idempotent by
the message id, which is the command's key) and acked after it returned, so a
redelivery (a crash, a reconnect: PITFALL 14) has no second effect. Failures:

* a transient one (a downstream outage, anything unexpected): the delivery is
  held for a backoff (`retry_delay`, doubling, at most 30 s; it keeps its
  prefetch slot, so a failing downstream slows the consumer down rather than
  spinning), then republished to the back of the queue with its own
  `x-retry-count` header one higher (RabbitMQ's x-death count is not reliable
  for republished messages, PITFALL 18) and acked once the copy is confirmed;
* after `max_retries` retries, or at once when the command can never succeed
  (unknown topic, a payload it rejects): republished to `<prefix>.downstream.dead`
  with the reason in `x-dead-reason`, and logged at error level.

If the republish itself fails (the broker went away) the delivery is nacked
with requeue: it comes back with its count unchanged. Deliveries are
bounded by `prefetch` (set before consuming, PITFALL 13); aiormq's callback
only hands each one over to our own tasks (PITFALL 6).
"""
from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import aio_pika
import anyio
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import ChannelPreconditionFailed

from ..relay import CommandRefused, execute
from .rabbitmq_publisher import declare_events_exchange, events_exchange

from .rabbitmq_common import DEAD_CHANNEL, Connected, quietly

log = logging.getLogger(__name__)

BINDINGS = ("fms.#", "inventory.#", "wms.#", "tms.#", "promo.#", "account.#", "notify.#")
RETRY_HEADER = "x-retry-count"
REASON_HEADER = "x-dead-reason"
MAX_RETRY_DELAY = 30.0


class DownstreamConfigError(RuntimeError):
    """The broker already holds the downstream queues with other arguments."""


class RabbitDownstream(Connected):
    def __init__(self, url: str, ports: Any, *, prefix: str = "oms", prefetch: int = 200,
                 max_retries: int = 5, retry_delay: float = 0.5) -> None:
        self.exchange_name = events_exchange(prefix)
        self.queue_name = f"{prefix}.downstream"
        self.dead_queue_name = f"{prefix}.downstream.dead"
        self.ports = ports
        self._url = url
        self._prefix = prefix
        self._prefetch = prefetch
        self._max_retries = max_retries
        self._retry_delay = retry_delay
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._publisher: aio_pika.abc.AbstractChannel | None = None
        self.applied = self.retried = self.dead = 0  # counts, for tests and logs

    # -- lifecycle ------------------------------------------------------------

    async def open(self) -> None:
        self._connection = await aio_pika.connect_robust(self._url)
        try:
            await declare_events_exchange(self._connection, self._prefix)
            await self._declare()
            self._publisher = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        except BaseException:
            await self.close()
            raise



    async def _declare(self) -> None:
        """Once, on a throw-away channel (PITFALL 12): a mismatch stops startup."""
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(self.queue_name, durable=True, robust=False)
            for pattern in BINDINGS:
                await queue.bind(self.exchange_name, pattern, robust=False)
            await channel.declare_queue(self.dead_queue_name, durable=True, robust=False)
        except ChannelPreconditionFailed as exc:
            raise DownstreamConfigError(
                f"RabbitMQ queue {self.queue_name!r} or {self.dead_queue_name!r} exists with other "
                f"arguments ({exc}). Refusing to start: delete it or use another broker.prefix.") from exc
        finally:
            await quietly(channel.close(), "downstream")

    # -- consuming ------------------------------------------------------------

    async def run(self) -> None:
        """Consume until cancelled; unacked deliveries go back to the queue when the channel closes."""
        channel = await self._connection.channel()
        try:
            await channel.set_qos(prefetch_count=self._prefetch)  # before consume (PITFALL 13)
            queue = await channel.declare_queue(self.queue_name, passive=True)
            send, receive = anyio.create_memory_object_stream[AbstractIncomingMessage](self._prefetch)
            tag = await queue.consume(partial(_hand_over, send))
            try:
                with send, receive:
                    async with anyio.create_task_group() as tg:
                        for _ in range(self._prefetch):  # every held delivery can be worked on at once
                            tg.start_soon(self._work, receive)
            finally:
                with anyio.move_on_after(5, shield=True):  # stop deliveries first (PITFALL 15)
                    await quietly(queue.cancel(tag), "downstream")
        finally:
            with anyio.move_on_after(5, shield=True):
                await quietly(channel.close(), "downstream")

    async def _work(self, receive) -> None:
        async for message in receive:
            await self.handle(message)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        topic = message.type or message.routing_key or ""
        try:
            await execute(self.ports, topic, message.message_id or "", message.body)
        except CommandRefused as exc:
            await self._dead_letter(message, str(exc))
        except Exception as exc:  # noqa: BLE001 - transient or unexpected: retried, then dead-lettered
            await self._retry(message, exc)
        else:
            self.applied += 1
            await quietly(message.ack(), "downstream")

    async def _retry(self, message: AbstractIncomingMessage, error: Exception) -> None:
        count = retry_count(message)
        if count >= self._max_retries:
            await self._dead_letter(message, f"gave up after {count} retries: {error!r}")
            return
        await anyio.sleep(min(self._retry_delay * 2 ** count, MAX_RETRY_DELAY))
        log.warning("downstream command failed, retrying: %r", error,
                    extra={"event": "downstream_retry", "message_id": message.message_id, "retry": count + 1})
        if await self._republish(message, self.queue_name, {RETRY_HEADER: count + 1}):
            self.retried += 1

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        log.error("downstream command dead-lettered: %s", reason,
                  extra={"event": "downstream_dead_letter", "message_id": message.message_id,
                         "topic": message.type, "queue": self.dead_queue_name})
        if await self._republish(message, self.dead_queue_name,
                                 {RETRY_HEADER: retry_count(message), REASON_HEADER: reason[:1000],
                                  "x-dead-at": time.time()}):
            self.dead += 1

    async def _republish(self, message: AbstractIncomingMessage, queue: str, headers: dict[str, Any]) -> bool:
        """A confirmed copy with new headers, then the ack; on a broker failure the delivery is
        requeued as it is. True if the copy went out."""
        copy = aio_pika.Message(message.body, headers={**(message.headers or {}), **headers},
                                content_type=message.content_type, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                message_id=message.message_id, type=message.type or message.routing_key,
                                timestamp=message.timestamp)
        try:
            await self._publisher.default_exchange.publish(copy, queue, mandatory=True, timeout=10)
        except DEAD_CHANNEL as exc:
            log.warning("downstream: could not republish to %s, requeued: %r", queue, exc)
            await quietly(message.nack(requeue=True), "downstream")
            return False
        await quietly(message.ack(), "downstream")
        return True


def retry_count(message: AbstractIncomingMessage) -> int:
    try:
        return max(0, int((message.headers or {}).get(RETRY_HEADER, 0)))
    except (TypeError, ValueError):
        return 0


async def _hand_over(send, message: AbstractIncomingMessage) -> None:
    try:
        await send.send(message)
    except (anyio.ClosedResourceError, anyio.BrokenResourceError):
        pass  # run() has ended: the channel closes and the broker requeues the message

