"""The outbox relay on the embedded adapters: the memory store's outbox, the in-process publisher,
the simulated downstream systems. What a checkpoint writes is applied and marked done; what cannot
go out stays in the outbox for a retry, and never blocks the rows behind it."""
from __future__ import annotations

from collections import Counter
from contextlib import asynccontextmanager

import anyio
import msgspec
import orjson
import pytest

from oms_pipeline import config
from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.adapters.sqlite_store import SqliteStore
from oms_pipeline.adapters.simulated import EffectLog, SimSettings, build_simulated_ports
from oms_pipeline.clock import VirtualClock
from oms_pipeline.commands import command
from oms_pipeline.ports import store as st
from oms_pipeline.ports.store import Checkpoint, Command, Event, NewOrder
from oms_pipeline.relay import LocalPublisher, PublisherUnavailable, Relay, message_id
from tests.support.postgres import fresh_postgres_database

pytestmark = pytest.mark.anyio

START = 1_700_000_000.0


def relay_settings(**overrides) -> config.RelaySettings:
    return config.from_mapping({"relay": {"idle_sleep": 0.01, "max_backoff": 0.05, **overrides}}).relay


async def sim_ports(table: dict | None = None):
    log = EffectLog()
    await log.open()
    return build_simulated_ports(SimSettings.from_mapping(table or {}), VirtualClock(START), log), log


async def stored_order(store: MemoryStore, order_no: str) -> None:
    await store.create([NewOrder(order_no, "app", f"ext-{order_no}", "toc", st.QUEUED, "notify_paid",
                                 "IN_FULFILMENT", START, b"{}")])
    await store.outbox_done([row.id for row in await store.outbox_claim("setup", 100, 30, START)])


async def checkpoint_with(store: MemoryStore, order_no: str, *commands: Command,
                          events: tuple[Event, ...] = ()) -> None:
    await store.checkpoint([Checkpoint(order_no, "payment", "late_payment", "", START + 1, st.CANCELLED,
                                       "@cancelled", "CANCELLED", 0, None, b"{}", events=events,
                                       commands=commands)])


def refund(order_no: str, amount: int = 1990) -> Command:
    return command("fms.refund", f"{order_no}:refund:P1", order_no=order_no, amount=amount,
                   reason="paid after cancel", method="online")


class Broken:
    """A publisher whose transport is down until `repaired`."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.repaired = False
        self.attempts = 0

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, rows):
        self.attempts += 1
        if not self.repaired:
            raise PublisherUnavailable("connection refused")
        return await self.inner.publish(rows)


@asynccontextmanager
async def open_store(kind: str, tmp_path):
    """Each store adapter with an outbox: in memory, SQLite (the embedded default), PostgreSQL."""
    if kind == "memory":
        yield MemoryStore()
        return
    if kind == "sqlite":
        store = SqliteStore(str(tmp_path / "oms.sqlite3"))
        await store.open()
        try:
            yield store
        finally:
            await store.close()
        return
    from oms_pipeline.adapters.postgres_store import PostgresStore, migrate
    async with fresh_postgres_database() as url:
        await migrate(url)
        store = PostgresStore(url)
        await store.open()
        try:
            yield store
        finally:
            await store.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_commands_written_with_a_checkpoint_are_applied_once_and_marked_done(kind, tmp_path):
    async with open_store(kind, tmp_path) as store:
        ports, log = await sim_ports()
        await stored_order(store, "O1")
        cancelled = Event("O1", "PAID", "CANCELLED", START + 1)
        await checkpoint_with(store, "O1", refund("O1"), events=(cancelled,))
        relay = Relay(store, LocalPublisher(ports), VirtualClock(START + 2), relay_settings(), "test")

        assert await relay.drain(5)

        assert [(e.op, e.key) for e in log.applied("finance")] == [("refund", "O1:refund:P1")]
        assert await store.outbox_pending() == 0 and relay.stats.pending == 0
        assert relay.stats.published == {"fms.refund": 1, "order.cancelled": 1}
        # Delivered again (a crash before outbox_done): the key makes it one refund.
        await checkpoint_with(store, "O1", refund("O1"))
        assert await relay.drain(5)
        assert len(log.applied("finance")) == 1 and log.duplicates == {"finance": 1}


async def test_a_failing_publisher_leaves_the_rows_for_a_retry_and_they_go_out_once_it_recovers():
    store, (ports, log) = MemoryStore(), await sim_ports()
    await stored_order(store, "O1")
    await checkpoint_with(store, "O1", refund("O1"))
    publisher = Broken(LocalPublisher(ports))
    relay = Relay(store, publisher, VirtualClock(START + 2), relay_settings(), "test")

    assert not await relay.drain(0.3)  # retried with backoff for as long as it was given

    assert publisher.attempts >= 2
    assert await store.outbox_pending() == 1 and log.applied("finance") == []
    assert relay.stats.errors["unavailable"] >= 2
    publisher.repaired = True
    assert await relay.drain(5)
    assert await store.outbox_pending() == 0 and len(log.applied("finance")) == 1


async def test_an_undeliverable_command_stays_in_the_outbox_and_the_rest_flows_on():
    store, (ports, log) = MemoryStore(), await sim_ports()
    await stored_order(store, "O1")
    bogus = Command("wms.teleport", "O1:teleport", orjson.dumps({"order_no": "O1"}))
    await checkpoint_with(store, "O1", bogus, refund("O1"))
    relay = Relay(store, LocalPublisher(ports), VirtualClock(START + 2), relay_settings(), "test")

    assert await relay.drain(5)

    assert len(log.applied("finance")) == 1  # the good one went out
    assert await store.outbox_pending() == 1  # the bad one is kept
    assert relay.stats.undeliverable == 1 and relay.stats.errors["undeliverable"] == 1
    left = await store.outbox_claim("someone-else", 10, 0.0, START + 100)
    assert [(r.topic, message_id(r)) for r in left] == [("wms.teleport", "O1:teleport")]


async def test_a_downstream_outage_keeps_the_command_and_retries_it():
    store, (ports, log) = MemoryStore(), await sim_ports({"failure_rate": {"finance": 1.0}})
    await stored_order(store, "O1")
    await checkpoint_with(store, "O1", refund("O1"))
    relay = Relay(store, LocalPublisher(ports), VirtualClock(START + 2), relay_settings(), "test")

    assert not await relay.drain(0.3)

    assert await store.outbox_pending() == 1 and log.applied("finance") == []
    assert relay.stats.errors["transient"] + relay.stats.errors["unavailable"] >= 2


async def test_events_go_to_in_process_subscribers_with_their_message_ids():
    store, (ports, _) = MemoryStore(), await sim_ports()
    await stored_order(store, "O1")
    seen = []

    async def subscriber(row) -> None:
        seen.append((row.topic, message_id(row), orjson.loads(row.payload)))

    await checkpoint_with(store, "O1", events=(Event("O1", "PAID", "CANCEL_REQUESTED", START + 1),
                                               Event("O1", "CANCEL_REQUESTED", "CANCELLED", START + 1)))
    relay = Relay(store, LocalPublisher(ports, subscribers=[subscriber]), VirtualClock(START + 2),
                  relay_settings(), "test")
    assert await relay.drain(5)

    assert [topic for topic, _, _ in seen] == ["order.cancel_requested", "order.cancelled"]
    assert all(mid.startswith("O1:event:") for _, mid, _ in seen) and len({mid for _, mid, _ in seen}) == 2
    assert seen[1][2] == {"order_no": "O1", "from": "CANCEL_REQUESTED", "to": "CANCELLED", "at": START + 1}
    assert await store.outbox_pending() == 0


async def test_the_running_relay_picks_up_rows_as_checkpoints_write_them():
    store, (ports, log) = MemoryStore(), await sim_ports()
    relay = Relay(store, LocalPublisher(ports), VirtualClock(START + 2), relay_settings(idle_sleep=5.0), "test")
    async with anyio.create_task_group() as tg:
        tg.start_soon(relay.run)
        for n in range(3):
            await stored_order(store, f"O{n}")
        for n in range(3):
            await checkpoint_with(store, f"O{n}", refund(f"O{n}"))
            relay.on_end("@cancelled", "", None)  # what the pipeline calls at an order's end
        with anyio.fail_after(10):
            while len(log.applied("finance")) < 3:
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert await store.outbox_pending() == 0


class Recording:
    """A publisher that counts what it was handed, by message id."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, rows):
        self.seen.update(message_id(r) for r in rows)
        await anyio.sleep(0.001)  # a confirm's round trip: lanes and relays interleave here
        return []


async def test_two_instances_with_two_lanes_each_share_one_outbox_without_publishing_twice():
    store = MemoryStore()
    for n in range(1000):
        await stored_order(store, f"O{n}")
    for n in range(1000):
        await checkpoint_with(store, f"O{n}", refund(f"O{n}"))
    publisher = Recording()
    settings = relay_settings(batch=50, lanes=2)
    relays = [Relay(store, publisher, VirtualClock(START + 2), settings, f"host-{i}:0") for i in range(2)]
    async with anyio.create_task_group() as tg:
        for relay in relays:
            tg.start_soon(relay.run)
        with anyio.fail_after(20):
            while await store.outbox_pending():
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert len(publisher.seen) == 1000 and set(publisher.seen.values()) == {1}
    assert all(sum(r.stats.published.values()) > 0 for r in relays)  # both took part


# -- the store's handoff: rows written after the relay started, published without a claim -----


def test_the_handoff_keeps_its_order_gives_back_first_and_drops_the_oldest_beyond_its_limit():
    woken = []
    handoff = st.OutboxHandoff("relay@1", lambda: START, lambda: woken.append(1), limit=3)
    row = lambda i: st.OutboxRow(i, f"O{i}", "order.paid", "", b"{}", START)
    handoff.put([row(1), row(2)])
    taken = handoff.take(5)
    assert [r.id for r in taken] == [1, 2] and len(handoff) == 0
    handoff.put([row(3)])
    handoff.give_back(taken)  # not delivered: first in line again, in their order
    assert [r.id for r in handoff.take(2)] == [1, 2]
    handoff.put([row(4), row(5), row(6)])  # 4 waiting, limit 3: the oldest stays in the outbox only
    assert handoff.dropped == 1 and [r.id for r in handoff.take(10)] == [4, 5, 6]
    assert len(woken) == 3  # every commit wakes the relay


async def outbox_claims(store) -> list[tuple[int, str | None]]:
    """(id, claimed by) of every row waiting in the PostgreSQL outbox, handed batches included."""
    return sorted([(r["id"], r["claimed_by"]) for r in await outbox_tables(store, "outbox")] +
                  [(row.id, b["claimed_by"]) for b in await outbox_tables(store, "outbox_batches")
                   for row in msgspec.msgpack.decode(b["rows"], type=list[st.OutboxRow])])


async def outbox_tables(store, table: str) -> list:
    import asyncpg
    conn = await asyncpg.connect(store.url)
    try:
        return await conn.fetch(f"SELECT * FROM {table}")
    finally:
        await conn.close()


@pytest.fixture
async def pg_o1(tmp_path):
    """A PostgreSQL store with order O1 in it (written before any relay), and simulated ports."""
    async with open_store("postgres", tmp_path) as store:
        ports, log = await sim_ports()
        await stored_order(store, "O1")
        yield store, ports, log


def relay_at(store, publisher, holder: str, at: float = START + 2, **settings) -> Relay:
    return Relay(store, publisher, VirtualClock(at), relay_settings(**settings), holder)


@pytest.mark.postgres
async def test_rows_written_after_the_relay_started_are_handed_over_claimed_by_it(pg_o1):
    store, ports, log = pg_o1
    relay = relay_at(store, LocalPublisher(ports), "host-1:0")
    other = relay_at(store, LocalPublisher(ports), "host-2:0")
    assert relay.handoff is not None and other.handoff is None  # one relay per store takes them

    await checkpoint_with(store, "O1", refund("O1"), events=(Event("O1", "PAID", "CANCELLED", START + 1),))

    handed = relay.handoff.take(10)
    relay.handoff.give_back(handed)
    assert [r.topic for r in handed] == ["order.cancelled", "fms.refund"]
    assert await outbox_claims(store) == [(r.id, relay.handoff.holder) for r in handed]
    assert await other.drain(5) and other.stats.published == {}  # claimed at birth: not its to take
    assert await relay.drain(5)
    assert relay.stats.published == {"fms.refund": 1, "order.cancelled": 1}
    assert await store.outbox_pending() == 0 and len(log.applied("finance")) == 1


async def handed_cancel(store, ports) -> list[st.OutboxRow]:
    """O1 cancelled with a refund, its two outbox rows handed to a relay (lease 30 s) and taken."""
    relay = relay_at(store, LocalPublisher(ports), "host-1:0", lease=30.0)
    await checkpoint_with(store, "O1", refund("O1"), events=(Event("O1", "PAID", "CANCELLED", START + 1),))
    return relay.handoff.take(10)


@pytest.mark.postgres
async def test_a_commits_handed_rows_are_one_batch_row_deleted_with_its_last_published_row(pg_o1):
    store, ports, log = pg_o1
    first, second = await handed_cancel(store, ports)
    [batch] = await outbox_tables(store, "outbox_batches")
    assert (batch["first_id"], batch["size"]) == (first.id, 2) and await outbox_tables(store, "outbox") == []
    assert await store.outbox_pending() == 2

    await store.outbox_done([second.id])  # published one of two: the batch stays for the other
    assert await store.outbox_pending() == 1 and len(await outbox_tables(store, "outbox_batches")) == 1
    await store.outbox_done([first.id])
    assert await store.outbox_pending() == 0 and await outbox_tables(store, "outbox_batches") == []


@pytest.mark.postgres
async def test_a_lapsed_batch_goes_back_to_the_outbox_without_the_rows_already_published(pg_o1):
    store, ports, log = pg_o1
    event, command_row = await handed_cancel(store, ports)
    await store.outbox_done([event.id])  # the command was refused, left to its lease

    assert await store.outbox_claim("host-2:0", 10, 30.0, START + 20) == []  # the lease holds
    [again] = await store.outbox_claim("host-2:0", 10, 30.0, START + 40)
    assert again == command_row and await outbox_tables(store, "outbox_batches") == []
    await store.outbox_done([again.id])
    assert await store.outbox_pending() == 0 and await outbox_tables(store, "outbox") == []


@pytest.mark.postgres
async def test_a_batch_of_a_dead_process_goes_back_whole(pg_o1):
    store, ports, log = pg_o1
    handed = await handed_cancel(store, ports)
    store._batches.clear()  # what a restarted process knows of the batch: nothing
    store._batch_of.clear()
    assert await store.outbox_claim("host-2:0", 10, 30.0, START + 40) == handed
    await store.outbox_done([row.id for row in handed])
    assert await store.outbox_pending() == 0


@pytest.mark.postgres
async def test_a_dead_relays_handed_rows_are_claimed_once_its_lease_has_lapsed(pg_o1):
    store, ports, log = pg_o1
    dead = relay_at(store, LocalPublisher(ports), "host-1:0", lease=30.0)
    await checkpoint_with(store, "O1", refund("O1"))
    assert len(dead.handoff) == 1  # ... and its process dies before publishing it

    early = relay_at(store, LocalPublisher(ports), "host-2:0", at=START + 20)
    assert await early.drain(5) and log.applied("finance") == []
    late = relay_at(store, LocalPublisher(ports), "host-2:0", at=START + 40)
    assert await late.drain(5)
    assert len(log.applied("finance")) == 1 and await store.outbox_pending() == 0


@pytest.mark.postgres
async def test_handed_rows_wait_out_a_broker_outage_and_go_out_once(pg_o1):
    store, ports, log = pg_o1
    publisher = Broken(LocalPublisher(ports))
    relay = relay_at(store, publisher, "host-1:0")
    await checkpoint_with(store, "O1", refund("O1"))

    assert not await relay.drain(0.3)  # retried with backoff; the row stays first in line
    assert publisher.attempts >= 2 and len(relay.handoff) == 1 and log.applied("finance") == []
    publisher.repaired = True
    assert await relay.drain(5)
    assert len(log.applied("finance")) == 1 and await store.outbox_pending() == 0


@pytest.mark.parametrize("kind", ["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_an_emptied_outbox_never_numbers_a_row_again_with_a_published_rows_id(kind, tmp_path):
    # An event's message id is "ORDERNO:event:ID": a reused id would be taken downstream for a
    # delivery already seen, and the event dropped.
    async with open_store(kind, tmp_path) as store:
        await stored_order(store, "O1")
        seen = set()
        for n in range(3):
            await checkpoint_with(store, "O1", events=(Event("O1", "PAID", f"S{n}", START + 1),))
            rows = await store.outbox_claim("relay", 10, 30, START + 2)
            assert len(rows) == 1 and not {message_id(r) for r in rows} & seen
            seen |= {message_id(r) for r in rows}
            await store.outbox_done([r.id for r in rows])  # the outbox is empty again


def test_the_sqlite_outbox_migration_keeps_waiting_rows_and_numbers_new_ones_above_any_given(tmp_path):
    import sqlite3
    import time

    from oms_pipeline import sqlfiles
    from oms_pipeline.adapters.sqlite_store import migrate
    conn = sqlite3.connect(tmp_path / "old.sqlite3", isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                 "applied_at REAL NOT NULL)")
    for version, name, sql in sqlfiles.migrations("sqlite"):
        if version < 10:  # a database made before migration 010
            for statement in filter(str.strip, sql.split(";")):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (version, name))
    conn.execute("INSERT INTO outbox (order_no, topic, key, payload, at) VALUES ('O1', 'order.paid', '', '{}', 1)")
    assert migrate(conn) == ["010_outbox_ids_never_reused"]
    assert conn.execute("SELECT id, order_no, topic FROM outbox").fetchall() == [(1, "O1", "order.paid")]
    conn.execute("DELETE FROM outbox")
    conn.execute("INSERT INTO outbox (order_no, topic, key, payload, at) VALUES ('O1', 'order.sent', '', '{}', 2)")
    (new_id,) = conn.execute("SELECT id FROM outbox").fetchone()
    assert new_id > (time.time() - 3600) * 1e6  # above any id the old numbering could have given
    conn.close()


def metrics_text(relay: Relay) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    from oms_pipeline.metrics import RelayCollector
    registry = CollectorRegistry()
    registry.register(RelayCollector(relay))
    return generate_latest(registry).decode()


@pytest.mark.postgres
async def test_the_handoff_is_seen_in_the_metrics(pg_o1):
    store, ports, _ = pg_o1
    relay = relay_at(store, LocalPublisher(ports), "host-1:0")
    relay.handoff.limit = 1
    await checkpoint_with(store, "O1", refund("O1"), events=(Event("O1", "PAID", "CANCELLED", START + 1),))
    text = metrics_text(relay)
    assert "oms_outbox_handoff_waiting 1.0" in text and "oms_outbox_handoff_dropped_total 1.0" in text
    claiming = relay_at(MemoryStore(), LocalPublisher(ports), "host-1:0")
    text = metrics_text(claiming)  # a store without a handoff: the families are there, at 0
    assert "oms_outbox_handoff_waiting 0.0" in text and "oms_outbox_handoff_dropped_total 0.0" in text
