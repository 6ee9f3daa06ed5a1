"""The outbox on real RabbitMQ: the relay's publisher (confirms, mandatory commands, message ids)
and the consumer that brings published commands to the simulated downstream systems.

Isolation: each test uses its own broker prefix (its own exchange and queues on the default
vhost) and deletes them afterwards, like tests/test_rabbitmq_timers.py.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from uuid import uuid4

import aio_pika
import anyio
import orjson
import pytest

from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.adapters.rabbitmq_downstream import BINDINGS, RabbitDownstream
from oms_pipeline.adapters.rabbitmq_publisher import RabbitPublisher
from oms_pipeline.clock import VirtualClock
from oms_pipeline.ports.store import Command, Event
from oms_pipeline.relay import Relay
from tests.conftest import require_service
from tests.test_outbox_relay import START, checkpoint_with, refund, relay_settings, sim_ports, stored_order

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

URL = "amqp://guest:guest@127.0.0.1:5672/"


@asynccontextmanager
async def broker(prefix: str | None = None):
    """A connection for the test's own queues, and a fresh prefix whose exchange and queues
    (the test's and the adapters') are deleted afterwards."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = prefix or f"oms-test-{uuid4().hex[:8]}"
    connection = await aio_pika.connect(URL)
    try:
        yield connection, prefix
    finally:
        channel = await connection.channel()
        for name in (f"{prefix}.downstream", f"{prefix}.downstream.dead", f"{prefix}.watch"):
            await channel.queue_delete(name)
        await channel.exchange_delete(f"{prefix}.events")
        await connection.close()


async def watch(connection, prefix: str, *patterns: str) -> aio_pika.abc.AbstractQueue:
    """A queue of the test's own bound to `patterns` on the events exchange."""
    channel = await connection.channel()
    exchange = await channel.declare_exchange(f"{prefix}.events", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{prefix}.watch", durable=True)
    for pattern in patterns:
        await queue.bind(exchange, pattern)
    return queue


async def take(queue, n: int, timeout: float = 10) -> list[aio_pika.abc.AbstractIncomingMessage]:
    out = []
    with anyio.fail_after(timeout):
        while len(out) < n:
            message = await queue.get(fail=False)
            if message is None:
                await anyio.sleep(0.02)
                continue
            await message.ack()
            out.append(message)
    return out


@asynccontextmanager
async def publisher(prefix: str, **kwargs):
    pub = RabbitPublisher(f"{URL}?name={prefix}-relay", prefix=prefix, **kwargs)
    await pub.open()
    try:
        yield pub
    finally:
        await pub.close()


async def outbox(*commands: Command, events: tuple[Event, ...] = ()) -> MemoryStore:
    store = MemoryStore()
    await stored_order(store, "O1")
    await checkpoint_with(store, "O1", *commands, events=events)
    return store


@pytest.mark.parametrize("per_message", [1, 100])
async def test_rows_are_published_with_confirms_and_their_message_ids(per_message):
    async with broker() as (connection, prefix):
        queue = await watch(connection, prefix, "fms.#", "order.#")
        store = await outbox(refund("O1"), events=(Event("O1", "PAID", "CANCELLED", START + 1),))
        async with publisher(prefix, events_per_message=per_message) as pub:
            relay = Relay(store, pub, VirtualClock(START + 2), relay_settings(), "test")
            assert await relay.drain(10)
        assert await store.outbox_pending() == 0

        messages = {m.routing_key: m for m in await take(queue, 2)}
        event, command = messages["order.cancelled"], messages["fms.refund"]
        assert command.message_id == "O1:refund:P1" and command.type == "fms.refund"
        assert command.headers["order_no"] == "O1"
        assert orjson.loads(command.body)["amount"] == 1990
        assert event.type == "order.cancelled"
        body = {"order_no": "O1", "from": "PAID", "to": "CANCELLED", "at": START + 1}
        if per_message == 1:
            assert event.message_id.startswith("O1:event:") and event.headers["order_no"] == "O1"
            assert orjson.loads(event.body) == body
        else:  # a pack of one: each event keeps its own message id inside
            [packed] = orjson.loads(event.body)
            assert event.headers["events"] == 1 and event.message_id.startswith("events:")
            assert packed["message_id"].startswith("O1:event:") and packed["order_no"] == "O1"
            assert packed["event"] == body and packed["at"] == START + 1
        for message in (event, command):
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert message.content_type == "application/json"


async def test_events_of_one_topic_travel_packed_and_each_keeps_its_message_id():
    async with broker() as (connection, prefix):
        queue = await watch(connection, prefix, "order.#", "fms.#")
        store = MemoryStore()
        for n in range(250):
            await stored_order(store, f"O{n}")
        for n in range(250):
            await checkpoint_with(store, f"O{n}", *([refund(f"O{n}")] if n < 3 else []),
                                  events=(Event(f"O{n}", "PAID", "CANCELLED" if n % 2 else "DISPATCHED", START),))
        async with publisher(prefix, events_per_message=100) as pub:
            relay = Relay(store, pub, VirtualClock(START + 2), relay_settings(batch=500), "test")
            assert await relay.drain(30)
        assert await store.outbox_pending() == 0
        assert relay.stats.published == {"order.cancelled": 125, "order.dispatched": 125, "fms.refund": 3}
        messages = await take(queue, 2 + 2 + 3)  # per topic: 100 + 25 events; three commands
        packs = [m for m in messages if m.type.startswith("order.")]
        assert sorted(m.headers["events"] for m in packs) == [25, 25, 100, 100]
        inside = [e for m in packs for e in orjson.loads(m.body)]
        assert all(e["event"]["to"] == m.type.split(".")[1].upper() for m in packs for e in orjson.loads(m.body))
        assert len({e["message_id"] for e in inside}) == 250
        assert {e["order_no"] for e in inside} == {f"O{n}" for n in range(250)}
        assert {m.message_id for m in messages if m.type == "fms.refund"} == {f"O{n}:refund:P1" for n in range(3)}
        assert await queue.get(fail=False) is None  # nothing more: one message per pack


async def test_an_unroutable_command_is_an_error_and_stays_in_the_outbox_until_a_queue_is_bound():
    async with broker() as (connection, prefix):
        store = await outbox(refund("O1"))
        async with publisher(prefix) as pub:
            relay = Relay(store, pub, VirtualClock(START + 2), relay_settings(), "test")
            await relay.drain(10)
            assert await store.outbox_pending() == 1
            assert relay.stats.errors["undeliverable"] == 1 and relay.stats.undeliverable == 1
            assert relay.stats.published == {}

            queue = await watch(connection, prefix, "fms.#")  # the missing binding, fixed
            with anyio.fail_after(10):
                while await store.outbox_pending():
                    await relay.drain(1)  # the row's own backoff passes; then it goes out
                    await anyio.sleep(0.05)
            assert relay.stats.undeliverable == 0
        [message] = await take(queue, 1)
        assert message.message_id == "O1:refund:P1"


async def test_events_nobody_binds_are_dropped_unless_they_are_mandatory():
    async with broker() as (_, prefix):
        cancelled = (Event("O1", "PAID", "CANCELLED", START + 1),)
        store = await outbox(events=cancelled)
        async with publisher(prefix) as pub:
            assert await Relay(store, pub, VirtualClock(START + 2), relay_settings(), "test").drain(10)
        assert await store.outbox_pending() == 0

        store = await outbox(events=cancelled)
        async with publisher(prefix, mandatory_events=True) as pub:
            relay = Relay(store, pub, VirtualClock(START + 2), relay_settings(), "test")
            await relay.drain(10)
        assert await store.outbox_pending() == 1 and relay.stats.errors["undeliverable"] == 1


async def test_a_batch_of_rows_goes_out_with_many_confirms_in_flight():
    async with broker() as (connection, prefix):
        queue = await watch(connection, prefix, "fms.#")
        store = MemoryStore()
        for n in range(300):
            await stored_order(store, f"O{n}")
        for n in range(300):
            await checkpoint_with(store, f"O{n}", refund(f"O{n}"))
        async with publisher(prefix) as pub:
            relay = Relay(store, pub, VirtualClock(START + 2), relay_settings(batch=128), "test")
            assert await relay.drain(30)
        assert await store.outbox_pending() == 0 and relay.stats.published == {"fms.refund": 300}
        ids = {m.message_id for m in await take(queue, 300)}
        assert ids == {f"O{n}:refund:P1" for n in range(300)}


# -- the simulated downstream systems' consumer ------------------------------------------


@asynccontextmanager
async def downstream(prefix: str, ports, **kwargs):
    consumer = RabbitDownstream(f"{URL}?name={prefix}-downstream", ports, prefix=prefix, **kwargs)
    await consumer.open()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consumer.run)
            yield consumer
            tg.cancel_scope.cancel()
    finally:
        await consumer.close()


async def dead_letters(connection, prefix: str, n: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    channel = await connection.channel()
    queue = await channel.declare_queue(f"{prefix}.downstream.dead", passive=True)
    return await take(queue, n)


async def wait_for(predicate, timeout: float = 15) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


async def test_published_commands_reach_the_simulated_downstream_once():
    async with broker() as (_, prefix):
        ports, log = await sim_ports()
        store = await outbox(refund("O1"))
        async with downstream(prefix, ports) as consumer, publisher(prefix) as pub:
            assert await Relay(store, pub, VirtualClock(START + 2), relay_settings(), "test").drain(10)
            await wait_for(lambda: consumer.applied == 1)
            await checkpoint_with(store, "O1", refund("O1"))  # delivered a second time
            assert await Relay(store, pub, VirtualClock(START + 3), relay_settings(), "test").drain(10)
            await wait_for(lambda: consumer.applied == 2)
        assert [(e.op, e.key) for e in log.applied("finance")] == [("refund", "O1:refund:P1")]
        assert log.duplicates == {"finance": 1}
        assert set(BINDINGS) >= {"fms.#", "inventory.#", "notify.#"}


async def test_a_command_failing_every_time_is_retried_then_dead_lettered_with_its_reason():
    async with broker() as (connection, prefix):
        ports, log = await sim_ports({"failure_rate": {"finance": 1.0}})
        store = await outbox(refund("O1"))
        async with downstream(prefix, ports, max_retries=2, retry_delay=0.01) as consumer, publisher(prefix) as pub:
            assert await Relay(store, pub, VirtualClock(START + 2), relay_settings(), "test").drain(10)
            await wait_for(lambda: consumer.dead == 1)
            assert consumer.retried == 2
        [dead] = await dead_letters(connection, prefix, 1)
        assert dead.message_id == "O1:refund:P1" and dead.type == "fms.refund"
        assert dead.headers["x-retry-count"] == 2
        assert "gave up after 2 retries" in dead.headers["x-dead-reason"]
        assert "simulated outage" in dead.headers["x-dead-reason"]
        assert log.applied("finance") == []


async def test_a_command_no_system_takes_is_dead_lettered_at_once():
    async with broker() as (connection, prefix):
        ports, _ = await sim_ports()
        bogus = Command("fms.teleport", "O1:teleport", orjson.dumps({"order_no": "O1"}))
        malformed = Command("fms.refund", "O1:refund:bad", orjson.dumps({"order_no": "O1"}))  # no amount
        store = await outbox(bogus, malformed)
        async with downstream(prefix, ports) as consumer, publisher(prefix) as pub:
            assert await Relay(store, pub, VirtualClock(START + 2), relay_settings(), "test").drain(10)
            await wait_for(lambda: consumer.dead == 2)
            assert consumer.retried == 0
        reasons = {m.message_id: m.headers["x-dead-reason"] for m in await dead_letters(connection, prefix, 2)}
        assert "no downstream system takes topic 'fms.teleport'" in reasons["O1:teleport"]
        assert "KeyError" in reasons["O1:refund:bad"]


async def test_an_exchange_declared_otherwise_stops_startup_naming_it():
    from oms_pipeline.adapters.rabbitmq_publisher import PublisherConfigError
    async with broker() as (connection, prefix):
        channel = await connection.channel()
        await channel.declare_exchange(f"{prefix}.events", aio_pika.ExchangeType.FANOUT, durable=True)
        with pytest.raises(PublisherConfigError, match=f"{prefix}.events"):
            async with publisher(prefix):
                pass


async def test_the_publisher_reconnects_by_itself_and_nothing_is_lost():
    from tests.support.tcp_proxy import TcpProxy
    async with broker() as (connection, prefix), TcpProxy("127.0.0.1", 5672) as proxy:
        queue = await watch(connection, prefix, "fms.#")
        store = MemoryStore()
        for n in range(200):
            await stored_order(store, f"O{n}")
        for n in range(100):
            await checkpoint_with(store, f"O{n}", refund(f"O{n}"))
        pub = RabbitPublisher(f"amqp://guest:guest@127.0.0.1:{proxy.port}/?reconnect_interval=0.2", prefix=prefix)
        await pub.open()
        try:
            relay = Relay(store, pub, VirtualClock(START + 2), relay_settings(max_backoff=0.5), "test")
            assert await relay.drain(10)
            proxy.cut()  # the broker went away under the publisher
            for n in range(100, 200):
                await checkpoint_with(store, f"O{n}", refund(f"O{n}"))
            assert await relay.drain(30)
            assert relay.stats.errors["unavailable"] >= 1  # it did notice the outage
        finally:
            await pub.close()
        assert await store.outbox_pending() == 0
        ids = {m.message_id for m in await take(queue, 200)}  # at least once: a lost confirm may repeat one
        assert ids == {f"O{n}:refund:P1" for n in range(200)}
