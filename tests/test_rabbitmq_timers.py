"""RabbitMQ timers beyond the contract: volume, the ladder, mis-routing, failures, shutdown.

Isolation: each test gets its own prefix (its own exchanges and queues on the
default vhost) and deletes them afterwards. A vhost per test would need
`rabbitmqctl` (root, ~1 s of Erlang start-up per call) on every CI runner;
names are enough since the adapter touches nothing outside its prefix.
"""
from __future__ import annotations

import shutil
import statistics
import time
from contextlib import asynccontextmanager
from uuid import uuid4

import aio_pika
import anyio
import pytest

from oms_pipeline.adapters.rabbitmq_timers import RabbitTimers, TimersConfigError
from oms_pipeline.clock import SystemClock
from tests.conftest import require_service

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

URL = "amqp://guest:guest@127.0.0.1:5672/"


@asynccontextmanager
async def rabbit_timers(tiers=(0.2, 1.0), prefix=None, **kwargs):
    """An open RabbitTimers on a fresh prefix; its queues and exchanges are deleted afterwards."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = prefix or f"oms-test-{uuid4().hex[:8]}"
    timers = RabbitTimers(f"{URL}?name={prefix}", SystemClock(), prefix=prefix, tiers=tiers, **kwargs)
    await timers.open()
    try:
        yield timers
    finally:
        await timers.close()
        await delete_topology(timers)


async def delete_topology(timers: RabbitTimers) -> None:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name in timers.topology.queues:
            await channel.queue_delete(name)
        for name in timers.topology.exchanges:
            await channel.exchange_delete(name)


class Recorder:
    """on_due that records (due, firing time) and can wait for a count."""

    def __init__(self, clock=SystemClock()) -> None:
        self.clock = clock
        self.fired: list[tuple] = []
        self._changed = anyio.Event()

    async def __call__(self, due) -> None:
        now = self.clock.now()
        self.fired.extend((d, now) for d in due)
        self._changed.set()

    async def wait_for(self, count: int, timeout: float) -> None:
        with anyio.fail_after(timeout):
            while len(self.fired) < count:
                self._changed = anyio.Event()
                await self._changed.wait()


@asynccontextmanager
async def running(timers, on_due):
    async with anyio.create_task_group() as tg:
        tg.start_soon(timers.run, on_due)
        yield
        tg.cancel_scope.cancel()


async def schedule_all(timers, items, concurrency=50):
    """Many schedules in flight at once: each awaits its own publisher confirm."""
    send, receive = anyio.create_memory_object_stream(len(items))
    for item in items:
        send.send_nowait(item)
    send.close()

    async def worker():
        async for purpose, order_no, at in receive:
            await timers.schedule(purpose, order_no, at)

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)


async def test_a_thousand_timers_fire_once_and_never_early():
    async with rabbit_timers(tiers=(0.2, 1.0)) as timers:
        recorder = Recorder()
        start = time.time() + 0.5
        items = [("resume", f"O{i}", start + 2.0 * i / 1000) for i in range(1000)]
        async with running(timers, recorder):
            await schedule_all(timers, items)
            await recorder.wait_for(1000, timeout=20)
            await anyio.sleep(0.5)  # let a duplicate show up, if any
        names = [d.order_no for d, _ in recorder.fired]
        assert sorted(names) == sorted(o for _, o, _ in items)  # each exactly once
        lags = sorted(now - d.at for d, now in recorder.fired)
        assert lags[0] >= 0, "a timer fired before its time"
        p99 = lags[int(len(lags) * 0.99)]
        print(f"\n1000 timers: lag p50 {statistics.median(lags) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
        assert p99 < 0.2 + 1.0


async def test_a_long_park_walks_the_ladder():
    async with rabbit_timers(tiers=(0.2, 0.5, 1.0)) as timers:
        recorder = Recorder()
        scheduled = time.time()
        async with running(timers, recorder):
            await timers.schedule("resume", "LONG", scheduled + 2.3)
            await anyio.sleep(1.2)
            assert recorder.fired == [] and await timers.refresh_pending() == 1  # in a tier, not in memory
            await recorder.wait_for(1, timeout=10)
        (due, fired_at), = recorder.fired
        assert fired_at - scheduled >= 2.3
        assert fired_at - scheduled < 2.3 + 0.2 / 2 + 0.5


def test_a_timer_goes_to_the_largest_tier_it_does_not_overshoot_by_more_than_half_the_smallest():
    timers = RabbitTimers(URL, SystemClock(), prefix="oms-unopened", tiers=(1.0, 5.0, 600.0))  # never opened
    due, delay = timers.topology.due_exchange, timers.topology.delay_exchange
    assert timers._route(0.49) == (due, "due")  # held in memory until `at`
    assert timers._route(0.5) == (delay, "1s")
    assert timers._route(4.4) == (delay, "1s") and timers._route(4.5) == (delay, "5s")
    # a pay deadline armed for exactly a tier, published a moment later: that tier, not the ladder below
    assert timers._route(600 - 0.03) == (delay, "600s")
    assert timers._route(599.4) == (delay, "5s")


def test_the_daemon_adds_its_pay_timeouts_to_the_tiers():
    from oms_pipeline import app, config
    settings = config.from_mapping({"broker": {"url": URL, "delay_tiers": [1, 30]},
                                    "payment": {"timeout": 900, "timeout_by_kind": {"toc": 45}}})
    assert app._timers_for(URL, settings, SystemClock()).topology.tiers == (1, 30, 45, 900)


async def test_a_deadline_of_exactly_a_tier_parks_once():
    async with rabbit_timers(tiers=(0.4, 2.0)) as timers:
        recorder = Recorder()

        async def arm(i: int) -> None:  # as intake arms a pay deadline: now + the timeout, then publish
            await timers.schedule("pay_deadline", f"D{i}", time.time() + 2.0)

        async with running(timers, recorder):
            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(arm, i)
            await recorder.wait_for(200, timeout=15)
        assert timers.reparked == 0  # straight from the 2 s tier to the due queue, never back
        assert sorted(d.order_no for d, _ in recorder.fired) == sorted(f"D{i}" for i in range(200))
        assert min(now - d.at for d, now in recorder.fired) >= 0


async def test_an_unroutable_timer_raises():
    async with rabbit_timers(tiers=(0.2, 1.0)) as timers:
        connection = await aio_pika.connect(URL)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(timers.topology.tier_queue(1.0))
        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await timers.schedule("resume", "LOST", time.time() + 1.5)


async def test_on_due_raising_requeues_the_timer():
    async with rabbit_timers() as timers:
        await timers.schedule("resume", "AGAIN", time.time())

        async def broken(due):
            raise RuntimeError("store down")

        with pytest.raises(RuntimeError, match="store down"):
            with anyio.fail_after(5):
                await timers.run(broken)
        recorder = Recorder()
        async with running(timers, recorder):
            await recorder.wait_for(1, timeout=5)
        assert [d.order_no for d, _ in recorder.fired] == ["AGAIN"]


async def test_closing_with_timers_in_flight_loses_none():
    prefix = f"oms-test-{uuid4().hex[:8]}"
    now = time.time()
    items = ([("resume", f"D{i}", now) for i in range(100)]             # due: in the consumer
             + [("resume", f"H{i}", now + 0.6) for i in range(100)]     # held / smallest tier
             + [("resume", f"P{i}", now + 2.0) for i in range(100)])    # parked in the tiers
    async with rabbit_timers(tiers=(0.2, 0.5, 1.0), prefix=prefix, prefetch=150) as timers:
        stuck = anyio.Event()

        async def hangs(due):
            stuck.set()
            await anyio.sleep_forever()

        async with running(timers, hangs):
            await schedule_all(timers, items)
            with anyio.fail_after(5):
                await stuck.wait()
            await anyio.sleep(0.7)  # some move from tier to due, some are held in memory
        await timers.close()

        reopened = RabbitTimers(URL, SystemClock(), prefix=prefix, tiers=(0.2, 0.5, 1.0))
        await reopened.open()
        try:
            assert await reopened.refresh_pending() == 300
            recorder = Recorder()
            async with running(reopened, recorder):
                await recorder.wait_for(300, timeout=15)
            assert sorted(d.order_no for d, _ in recorder.fired) == sorted(o for _, o, _ in items)
            assert all(now_ >= d.at for d, now_ in recorder.fired)
        finally:
            await reopened.close()


async def test_a_drifted_declaration_is_a_fatal_configuration_error():
    require_service("RabbitMQ", "127.0.0.1", 5672)
    timers = RabbitTimers(URL, SystemClock(), prefix=f"oms-test-{uuid4().hex[:8]}", tiers=(1.0,))
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(timers.topology.tier_queue(1.0), durable=True, arguments={"x-message-ttl": 999})
    try:
        with pytest.raises(TimersConfigError, match="conflicts"):
            await timers.open()
    finally:
        await delete_topology(timers)


async def drop_connections(named: str) -> None:
    """Close only this test's connection (the broker is shared), as a broker restart would."""
    listing = await anyio.run_process(["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"])
    pids = [line.split("\t")[0] for line in listing.stdout.decode().splitlines() if named in line]
    assert pids, f"no connection named {named}"
    for pid in pids:
        await anyio.run_process(["rabbitmqctl", "-q", "close_connection", pid, "test: connection dropped"])


async def test_a_dropped_connection_reconnects_and_loses_no_timer():
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("needs rabbitmqctl on this host to drop the connection")
    async with rabbit_timers(tiers=(0.2, 1.0), prefetch=100) as timers:
        recorder = Recorder()
        now = time.time()
        items = [("resume", f"R{i}", now + 0.5 + 3.0 * i / 300) for i in range(300)]
        async with running(timers, recorder):
            await schedule_all(timers, items)
            await anyio.sleep(1.0)
            await drop_connections(timers.topology.prefix)
            await timers.schedule("resume", "DURING", time.time() + 1)  # waits for the reconnect
            with anyio.fail_after(30):
                while len({d.order_no for d, _ in recorder.fired}) < len(items) + 1:
                    await anyio.sleep(0.1)
        # Redeliveries of what was unacked when the channel died may repeat some: tolerated.
        assert {d.order_no for d, _ in recorder.fired} == {o for _, o, _ in items} | {"DURING"}
        assert all(fired_at >= d.at for d, fired_at in recorder.fired)
