"""Outbox rows/s through the relay to RabbitMQ, every publish confirmed.

    .venv/bin/python bench/outbox_relay.py --orders 50000 [--store memory|postgres] [--batch 500] [--lanes 2] [--downstream]

Fills the outbox first (outside the timing): per order one checkpoint writing a
business event (`order.cancelled`) and a command (`fms.refund`), so 2 rows an
order, ~110-byte JSON bodies. Then times the relay from its first claim until
the outbox is empty: claim a batch, publish every row of it at once
(persistent, mandatory commands, publisher confirms), mark the batch done.

`--store postgres` runs on a fresh database on the local server (created,
migrated, dropped): claims and marks go through PostgreSQL. `memory` measures
the relay and the broker alone. A queue of the benchmark's own takes every
topic, so nothing is unroutable; `--downstream` instead runs the simulated
downstream systems' consumer (applies each refund, acks it) in the same
process and also times until every command was applied.
"""
from __future__ import annotations

import argparse
import time
from uuid import uuid4

import aio_pika
import anyio
from common import fresh_database

from oms_pipeline import config
from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.adapters.rabbitmq_downstream import RabbitDownstream
from oms_pipeline.adapters.rabbitmq_publisher import RabbitPublisher
from oms_pipeline.adapters.simulated import EffectLog, SimSettings, build_simulated_ports
from oms_pipeline.clock import SystemClock
from oms_pipeline.commands import command
from oms_pipeline.daemon import tune_gc
from oms_pipeline.ports import store as st
from oms_pipeline.ports.store import Checkpoint, Event, NewOrder
from oms_pipeline.relay import Relay

URL = "amqp://guest:guest@127.0.0.1:5672/"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
FILL_BATCH = 2000


async def fill(store, n: int) -> None:
    now = time.time()
    numbers = [f"9{i:017d}" for i in range(n)]  # creates write no events: only the checkpoints' rows
    for start in range(0, n, FILL_BATCH):
        chunk = numbers[start:start + FILL_BATCH]
        await store.create([NewOrder(no, "bench", no, "toc", st.QUEUED, "notify_paid", "PAID", now, b"{}")
                            for no in chunk])
        await store.checkpoint([Checkpoint(
            no, "payment", "late_payment", "", now, st.CANCELLED, "@cancelled", "CANCELLED", 0, None, b"{}",
            events=(Event(no, "PAID", "CANCELLED", now),),
            commands=(command("fms.refund", f"{no}:refund:P1", order_no=no, amount=1990,
                              reason="paid after cancel", method="online"),)) for no in chunk])


async def bench_queue(connection, prefix: str) -> None:
    channel = await connection.channel()
    exchange = await channel.declare_exchange(f"{prefix}.events", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{prefix}.bench", durable=True)
    await queue.bind(exchange, "#")


async def delete_topology(connection, prefix: str) -> None:
    channel = await connection.channel()
    for name in (f"{prefix}.bench", f"{prefix}.downstream", f"{prefix}.downstream.dead"):
        await channel.queue_delete(name)
    await channel.exchange_delete(f"{prefix}.events")


async def timed(args, store, prefix: str) -> None:
    await fill(store, args.orders)
    rows = await store.outbox_pending()
    settings = config.from_mapping({"relay": {"batch": args.batch, "lanes": args.lanes, "idle_sleep": 0.01}}).relay
    publisher = RabbitPublisher(URL, prefix=prefix, events_per_message=args.events_per_message)
    await publisher.open()
    log = EffectLog(retain=False)
    await log.open()
    ports = build_simulated_ports(SimSettings.from_mapping({"retain_effects": False}), SystemClock(), log)
    consumer = RabbitDownstream(URL, ports, prefix=prefix, prefetch=500) if args.downstream else None
    if consumer is not None:
        await consumer.open()
    relay = Relay(store, publisher, SystemClock(), settings, "bench")
    try:
        async with anyio.create_task_group() as tg:
            if consumer is not None:
                tg.start_soon(consumer.run)
            started, cpu = time.perf_counter(), time.process_time()
            assert await relay.drain(3600)
            relayed, cpu = time.perf_counter() - started, time.process_time() - cpu
            while consumer is not None and consumer.applied < args.orders:
                await anyio.sleep(0.01)
            applied = time.perf_counter() - started
            tg.cancel_scope.cancel()
    finally:
        await publisher.close()
        if consumer is not None:
            await consumer.close()
    left = await store.outbox_pending()
    line = (f"store={args.store} orders={args.orders} rows={rows} batch={args.batch} lanes={args.lanes} "
            f"events_per_message={args.events_per_message} relayed in {relayed:.2f}s "
            f"= {rows / relayed:,.0f} rows/s, process CPU {cpu / relayed:.0%} of a core (left {left})")
    if consumer is not None:
        line += f"; {args.orders} commands applied downstream in {applied:.2f}s = {args.orders / applied:,.0f}/s"
    print(line)


async def main(args: argparse.Namespace) -> None:
    tune_gc()
    prefix = f"oms-bench-{uuid4().hex[:8]}"
    connection = await aio_pika.connect(URL)
    try:
        if not args.downstream:
            await bench_queue(connection, prefix)
        if args.store == "memory":
            await timed(args, MemoryStore(), prefix)
        else:
            await on_postgres(args, prefix)
    finally:
        await delete_topology(connection, prefix)
        await connection.close()


async def on_postgres(args: argparse.Namespace, prefix: str) -> None:
    from oms_pipeline.adapters.postgres_store import PostgresStore
    async with fresh_database(PG_SERVER) as url:
        store = PostgresStore(url)
        await store.open()
        try:
            await timed(args, store, prefix)
        finally:
            await store.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=50_000)
    ap.add_argument("--store", choices=("memory", "postgres"), default="memory")
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--lanes", type=int, default=2)
    ap.add_argument("--events-per-message", type=int, default=100, help="relay.events_per_message (1: one each)")
    ap.add_argument("--downstream", action="store_true", help="also run the downstream consumer, time until applied")
    anyio.run(main, ap.parse_args(), backend_options={"use_uvloop": True})
