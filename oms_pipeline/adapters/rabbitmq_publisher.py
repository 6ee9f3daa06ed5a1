"""The outbox relay's publisher on RabbitMQ: one durable topic exchange, confirmed publishes.

Topology, declared once by `open()` (a mismatch is a fatal configuration error,
PITFALL 12)::

    relay ─► <prefix>.events (topic, durable) ─► queues bound by their consumers
               routing key = the row's topic: order.cancelled, fms.refund, inventory.restock, ...

The daemon owns no queue here: consumers bind their own (the simulated
downstream systems bind `<prefix>.downstream`, adapters/rabbitmq_downstream.py).

Every message: persistent, `type` = the topic (it survives a consumer's
republish to a retry or dead-letter queue, where the routing key changes),
JSON body, `timestamp` = when the checkpoint wrote it (the first row's). A
command: `message_id` = its key (consumers de-duplicate on it), header
`order_no`. Events of one topic go `events_per_message` to a message (a
broker message costs the loop ~40 us, and a claimed batch holds a few
hundred events): header `events` = how many, body a JSON array of
{"message_id": "ORDERNO:event:ID", "order_no", "at", "event"}, consumers
de-duplicating on each event's message id. With `events_per_message = 1` an
event is a message of its own like a command (message id "ORDERNO:event:ID").

Confirms: the channel has publisher confirms and `on_return_raises`, and a
command is published `mandatory`, so a command no queue is bound for is an
error (PITFALL 16): the relay keeps it in the outbox and counts it as
undeliverable. Events are broadcasts: with `relay.mandatory_events = false`
(the default) an event nobody has bound a queue for is dropped by the broker
and confirmed; set it true when every event must reach a bound queue.

A whole batch is in flight at once (one coroutine per message awaiting its
confirm), written to the socket in one turn of the event loop. Rows sharing
a message id (a command written again by a replayed stage) go out once.
`connect_robust` reconnects by itself; a publish during the outage fails and
the relay retries the batch later.
"""
from __future__ import annotations

import asyncio

import aio_pika
import aiormq
import orjson
from aio_pika.exceptions import AMQPError, ChannelInvalidStateError, ChannelPreconditionFailed, DeliveryError, PublishError

from ..ports.store import OutboxRow
from ..relay import Failed, PublisherUnavailable, is_event, message_id
from .rabbitmq_common import Connected

_TRANSPORT = (AMQPError, ChannelInvalidStateError, ConnectionError, asyncio.TimeoutError)


class PublisherConfigError(RuntimeError):
    """The broker already holds the exchange with other arguments."""


def events_exchange(prefix: str) -> str:
    return f"{prefix}.events"


async def declare_events_exchange(connection: aio_pika.abc.AbstractConnection, prefix: str) -> None:
    """On a throw-away channel: a robust channel would replay the declare on every reconnect
    and loop on a 406 if the exchange drifted (PITFALL 12)."""
    channel = await connection.channel()
    try:
        await channel.declare_exchange(events_exchange(prefix), aio_pika.ExchangeType.TOPIC, durable=True,
                                       robust=False)
    except ChannelPreconditionFailed as exc:
        raise PublisherConfigError(
            f"RabbitMQ exchange {events_exchange(prefix)!r} exists with other arguments ({exc}). "
            "Refusing to start: delete it or use another broker.prefix.") from exc
    finally:
        try:
            await channel.close()
        except _TRANSPORT:
            pass


class RabbitPublisher(Connected):
    def __init__(self, url: str, *, prefix: str = "oms", mandatory_events: bool = False,
                 confirm_timeout: float = 10.0, events_per_message: int = 100) -> None:
        self.exchange_name = events_exchange(prefix)
        self._url = url
        self._prefix = prefix
        self._mandatory_events = mandatory_events
        self._confirm_timeout = confirm_timeout
        self._per_message = events_per_message
        self._connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None

    async def open(self) -> None:
        self._connection = await aio_pika.connect_robust(self._url)
        try:
            await declare_events_exchange(self._connection, self._prefix)
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._exchange = await channel.get_exchange(self.exchange_name, ensure=False)
        except BaseException:
            await self.close()
            raise



    async def publish(self, rows: list[OutboxRow]) -> list[Failed]:
        units = self._units(rows)
        # aiormq holds the channel's lock across the socket write when `wait` is true, so a batch
        # would go out one loop turn per message; not waiting for the write, the whole batch goes
        # out in one turn, each message still waiting for its confirm (a return raises PublishError).
        channel = await self._exchange.channel.get_underlay_channel()
        results = await asyncio.gather(*(channel.basic_publish(
            body, exchange=self.exchange_name, routing_key=unit[0][0].topic, properties=properties,
            mandatory=self._mandatory_events or not is_event(unit[0][0]), timeout=self._confirm_timeout,
            wait=False) for unit, (body, properties) in zip(units, map(self._message, units))),
            return_exceptions=True)
        failed: list[Failed] = []
        for unit, result in zip(units, results):
            if isinstance(result, BaseException):
                reason, undeliverable = self._explain(unit[0][0], result)
                failed.extend(Failed(row, reason, undeliverable) for group in unit for row in group)
        if results and all(_transport_failure(r) for r in results):
            # The connection is down: the relay waits as a whole instead of holding back every row.
            raise PublisherUnavailable(failed[0].reason)
        return failed

    def _packs(self, row: OutboxRow) -> bool:
        """Whether the row travels in a pack of events."""
        return self._per_message > 1 and is_event(row)

    def _units(self, rows: list[OutboxRow]) -> list[list[list[OutboxRow]]]:
        """What goes out as one message: rows sharing a message id go once (a group); a command is a
        message of its own; events of one topic travel `events_per_message` groups to a message."""
        groups: dict[str, list[OutboxRow]] = {}
        for row in rows:
            groups.setdefault(message_id(row), []).append(row)
        units: list[list[list[OutboxRow]]] = []
        events: dict[str, list[list[OutboxRow]]] = {}
        for group in groups.values():
            if self._packs(group[0]):
                events.setdefault(group[0].topic, []).append(group)
            else:
                units.append([group])
        n = self._per_message
        for same_topic in events.values():
            units.extend(same_topic[i:i + n] for i in range(0, len(same_topic), n))
        return units

    def _message(self, unit: list[list[OutboxRow]]) -> tuple[bytes, aiormq.spec.Basic.Properties]:
        """The body and properties of the message that carries `unit`."""
        first = unit[0][0]
        if self._packs(first):
            rows = [group[0] for group in unit]
            body = orjson.dumps([{"message_id": message_id(r), "order_no": r.order_no, "at": r.at,
                                  "event": orjson.Fragment(r.payload)} for r in rows])
            mid, headers = f"events:{rows[0].id}-{rows[-1].id}:{len(rows)}", {"events": len(rows)}
        else:
            body, mid, headers = first.payload, message_id(first), {"order_no": first.order_no}
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   content_type="application/json", message_id=mid, type=first.topic,
                                   timestamp=first.at, headers=headers)
        return body, message.properties

    def _explain(self, row: OutboxRow, error: BaseException) -> tuple[str, bool]:
        """(reason, undeliverable) of a failed publish."""
        if isinstance(error, PublishError):  # returned: no queue is bound for the topic
            return f"unroutable: no queue is bound for {row.topic!r} on {self.exchange_name!r}", True
        if isinstance(error, DeliveryError):  # nack: the broker could not take it (e.g. a full queue)
            return f"refused by the broker (nack): {error!r}", False
        if isinstance(error, asyncio.TimeoutError):
            return f"no confirm within {self._confirm_timeout} s", False
        return f"broker unavailable: {error!r}", False


def _transport_failure(result: object) -> bool:
    """The connection or channel failed (not the broker refusing this one message)."""
    return isinstance(result, _TRANSPORT) and not isinstance(result, DeliveryError)
