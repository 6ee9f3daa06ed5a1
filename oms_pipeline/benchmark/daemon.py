"""The daemon's own composition (oms_pipeline/app.py) under load: the 16 real
stages, intake with stock reservations, the simulated downstream systems,
on the in-memory store (nothing durable: the stages' own cost), the embedded
default (SQLite, in-process timers and counters) or the production backends
(PostgreSQL, RabbitMQ timers, Redis coordination).

A production run gets a database of its own (created, migrated, dropped
afterwards), a RabbitMQ prefix and a Redis prefix of its own (deleted too),
so runs never see each other's state.
"""
from __future__ import annotations

import io
import secrets
import tempfile
from itertools import islice
from pathlib import Path
from typing import IO, Any, Iterator

import anyio
import orjson

from .. import app as app_module
from .. import config, routing
from ..generator import generate
from .probe import Recorder
from .scenario import ROOT, Scenario, merge
from .strategies import PipelineView

# Orders that need no payment and do not park for days: a burst of seed 001's
# third-party platform orders (as bench/embedded_burst.py sends).
DEFAULT_OVERRIDES = {"kind": "third_party", "source": "platform", "payment_method": "none", "remark": "",
                     "delivery_promise": "standard", "presale": False}


class Backend:
    """Where a run keeps its state, and how it is made and removed."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.kind = scenario.workload.kind
        self.tag = f"oms_bench_{secrets.token_hex(4)}"
        self.db_url = ""
        self._tmp: tempfile.TemporaryDirectory | None = None

    async def open(self) -> dict[str, Any]:
        """Config overrides naming this run's services."""
        w = self.scenario.workload
        if self.kind == "memory":
            return {"store": {"url": "memory://"}}  # timers and counters are in memory by default
        if self.kind == "embedded":
            self._tmp = tempfile.TemporaryDirectory(prefix="oms-bench-")
            return {"store": {"url": f"sqlite:///{Path(self._tmp.name) / 'oms.sqlite3'}"}}
        from ..adapters import postgres_store
        await _admin(w.postgres, f"CREATE DATABASE {self.tag}")
        self.db_url = f"{w.postgres.rstrip('/')}/{self.tag}"
        await postgres_store.migrate(self.db_url)
        return {"store": {"url": self.db_url}, "broker": {"url": w.rabbitmq, "prefix": self.tag},
                "coordination": {"url": w.redis, "prefix": f"{self.tag}:"}}

    async def close(self, settings: config.Settings) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
        if self.kind != "production":
            return
        w = self.scenario.workload
        await _admin(w.postgres, f"DROP DATABASE IF EXISTS {self.tag} WITH (FORCE)")
        await _delete_rabbit_topology(w.rabbitmq, settings)
        await _delete_redis_keys(w.redis, f"{self.tag}:")


class Daemon(PipelineView):
    """An App built as the daemon builds it, fed through its intake.

    Alone it opens and closes its own `Backend`. One of several instances gets the run's
    `services` (the parent's Backend), its own `daemon.instance_id`, and its share of the
    orders (as many as its arrivals) drawn from a seed of its own."""

    def __init__(self, scenario: Scenario, services: dict[str, Any] | None = None, *, instance: int = 0,
                 instances: int = 1) -> None:
        self.scenario = scenario
        self.label = scenario.workload.kind if instances == 1 else f"{scenario.workload.kind} #{instance}"
        self.backend = Backend(scenario) if services is None else None
        self.services = services
        self.instance, self.instances = instance, instances
        self.overrides = {**DEFAULT_OVERRIDES, **scenario.workload.order_overrides}
        self.bodies: IO[bytes] = io.BytesIO()  # the arrivals' request bodies, a JSON document a line
        self.settings: config.Settings | None = None
        self.postgres: dict[str, str] = {}  # the server's settings that move the figures
        self.app: Any = None

    async def open(self) -> None:
        if self.backend is not None:
            run_settings(self.scenario, {})  # a bad config key stops here, before there is a backend to remove
        services = self.services if self.backend is None else await self.backend.open()
        if self.instances > 1:  # the store's lease holder, the relay's claims and order-number blocks
            services = merge(services, {"daemon": {"instance_id": self.instance}})
        self.settings = run_settings(self.scenario, services)
        if self.scenario.workload.kind == "production":
            self.postgres = await _postgres_settings(self.settings.store.url)
        self.app = await app_module.build(self.settings)
        self.pipeline = self.app.pipeline
        # One of several instances draws its own share from a seed of its own (the same mix; the
        # external ids carry the seed, so no two instances make the same order), rather than
        # generating everyone's orders and dropping the others'.
        count, n = self.scenario.load.count(), self.instances
        requests = (generate(count, self.scenario.seed) if n == 1 else
                    generate(len(range(self.instance, count, n)), self.scenario.seed * 1000 + self.instance))
        self.bodies = await anyio.to_thread.run_sync(_load_file, requests, self.overrides)

    async def start(self, tg: anyio.abc.TaskGroup, recorder: Recorder) -> None:
        self.recorder = recorder
        self.pipeline.listeners.append(self._on_end)
        await tg.start(self.pipeline.run)

    def _on_end(self, end: str, reason: str, order: Any) -> None:
        if end != routing.SPLIT:  # a split parent ends when its children have (the listener hears it again)
            self.recorder.end(order.external_id, end)

    async def submit(self, first: int, end: int, scheduled_at: list[float]) -> None:
        """The arrivals' bodies through the broker intake's own calls: decoded, checked against the
        order schema, then created as one batch."""
        intake = self.app.intake
        batch = [intake.request_body(body) for body in islice(self.bodies, end - first)]
        for request, i in zip(batch, range(first, end)):
            self.recorder.arrive(request["external_id"], scheduled_at[i])
        for request, created in zip(batch, await intake.create(batch)):
            if created.refused:
                self.recorder.end(request["external_id"], "refused")

    async def outbox_pending(self) -> int:
        """Outbox rows the relay has not published yet (all instances share one outbox)."""
        return await self.app.pipeline.store.outbox_pending()

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {**super().describe(), "store": _redact(s.store.url), "broker": _redact(s.broker.url),
                "coordination": _redact(s.coordination.url), **({"postgresql": self.postgres} if self.postgres else {})}

    async def close(self) -> None:
        self.bodies.close()
        await self.app.aclose()
        if self.backend is not None:
            await self.backend.close(self.settings)


def _load_file(requests: Iterator[dict[str, Any]], overrides: dict[str, Any]) -> IO[bytes]:
    """The arrivals written ahead, before the clock starts, to a temporary file read back a batch at a
    time: the daemon pays for decoding and checking each body, as from a broker, not for making it
    up, and memory holds no more of the load than one batch."""
    out = tempfile.TemporaryFile()
    for request in requests:
        out.write(orjson.dumps({**request, **overrides}))
        out.write(b"\n")
    out.seek(0)
    return out


def run_settings(scenario: Scenario, services: dict[str, Any]) -> config.Settings:
    """A run's daemon settings: the bench defaults, the scenario's overrides, then its services."""
    base = {"metrics": {"port": 0}, "downstream": {"retain_effects": False},
            "routing": {"file": str(ROOT / "config" / "routes.toml")}}
    return config.from_mapping(merge(merge(base, scenario.config), services), source=scenario.source)


def _redact(url: str) -> str:
    """A URL without its password."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    return f"{scheme}://{creds.split(':')[0]}@{host}"


# PostgreSQL's settings that move a production run's figures (durability, memory, checkpoints,
# vacuum): recorded with the run, since the same code runs at different speeds under others.
POSTGRES_SETTINGS = ("fsync", "synchronous_commit", "full_page_writes", "shared_buffers", "max_wal_size",
                     "checkpoint_timeout", "autovacuum", "server_version")


async def _postgres_settings(url: str) -> dict[str, str]:
    found = dict(await _on(url, "fetch", "SELECT name, current_setting(name) FROM pg_settings "
                                         "WHERE name = ANY($1::text[])", list(POSTGRES_SETTINGS)))
    return {name: found[name] for name in POSTGRES_SETTINGS if name in found}


async def _admin(server: str, statement: str) -> None:
    await _on(f"{server.rstrip('/')}/postgres", "execute", statement)


async def _on(url: str, method: str, statement: str, *args: Any) -> Any:
    """One statement on a connection of its own (`method`: asyncpg's execute or fetch)."""
    import asyncpg
    conn = await asyncpg.connect(url)
    try:
        return await getattr(conn, method)(statement, *args)
    finally:
        await conn.close()


async def _delete_rabbit_topology(url: str, settings: config.Settings) -> None:
    """Every queue and exchange named with the run's prefix (timers, intake, outbox: whatever the
    daemon declared), listed by rabbitmqctl where it runs, else the timers' known topology."""
    import aio_pika

    from ..adapters.rabbitmq_timers import Topology
    prefix = settings.broker.prefix
    topology = Topology(prefix, tuple(sorted(settings.broker.delay_tiers)))
    queues = _rabbitmqctl("list_queues", prefix) or list(topology.queues)
    exchanges = _rabbitmqctl("list_exchanges", prefix) or list(topology.exchanges)
    connection = await aio_pika.connect(url)
    async with connection:
        for delete, names in (("queue_delete", queues), ("exchange_delete", exchanges)):
            for name in names:
                channel = await connection.channel()  # a failed delete closes its channel
                try:
                    await getattr(channel, delete)(name)
                except aio_pika.exceptions.AMQPError:
                    pass


def _rabbitmqctl(what: str, prefix: str) -> list[str]:
    import shutil
    import subprocess
    if shutil.which("rabbitmqctl") is None:
        return []
    try:
        done = subprocess.run(["rabbitmqctl", what, "-q", "name"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return []
    return [n.strip() for n in done.stdout.splitlines() if n.strip().startswith(prefix)]


async def _delete_redis_keys(url: str, prefix: str) -> None:
    import redis.asyncio as redis
    client = redis.Redis.from_url(url)
    try:
        # A run leaves ~100,000 keys: at SCAN's default of 10 a call that took 10,000 round trips.
        keys = [k async for k in client.scan_iter(f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
