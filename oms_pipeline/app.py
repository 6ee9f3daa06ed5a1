"""The composition root: adapters chosen by URL, the stages, the routing table, the pipeline."""
from __future__ import annotations

from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from . import config, flags, routing
from .adapters.local_coordination import LocalCoordination
from .adapters.memory_store import MemoryStore
from .adapters.memory_timers import MemoryTimers
from .adapters.simulated import EffectLog, SimSettings, SimSettingsError, build_simulated_ports
from .adapters.sqlite_store import SqliteStore
from .clock import Clock, SystemClock
from .config import ConfigError, Settings
from .health import Health
from .intake import Intake
from .order import KINDS
from .payments import Payments
from .pipeline import Pipeline, stage_configs
from .relay import LocalPublisher, Relay, holder_id
from .reverse import Reverse
from .settlement import cancel_everything
from .stock import Stock


class StartupError(Exception):
    """The daemon cannot start as configured (e.g. the database is not migrated)."""


@dataclass
class App:
    settings: Settings
    pipeline: Pipeline
    intake: Intake
    effects: EffectLog
    exit_stack: AsyncExitStack
    stock: Stock | None = None
    reverse: Any = None  # oms_pipeline.reverse.Reverse
    payments: Any = None  # oms_pipeline.payments.Payments
    relay: Relay | None = None
    broker_intake: Any = None  # RabbitIntake with broker.url amqp://; None: orders come over HTTP only
    health: Health | None = None  # the dependencies /readyz probes

    async def aclose(self) -> None:
        await self.exit_stack.aclose()


def load_routing(settings: Settings, stage_names) -> routing.RoutingTable:
    path = config.resolve_path(settings, settings.routing.file)
    try:
        return routing.load(path, stage_names, KINDS)
    except routing.RoutingError as exc:
        raise ConfigError(str(exc)) from None


def check(settings: Settings) -> routing.RoutingTable:
    """Everything that can be checked without opening a service: stops startup on the first error."""
    from stages import load_specs
    specs = load_specs()
    try:
        stage_configs(settings, specs)
        SimSettings.from_mapping(settings.downstream)
    except (ValueError, SimSettingsError) as exc:
        raise ConfigError(f"{settings.source}: {exc}") from None
    _store_for(settings.store.url, settings)  # the URLs' schemes are ones we have
    from .api import is_loopback
    if not is_loopback(settings.http.host) and not settings.http.token:
        raise ConfigError(f"{settings.source}: key http.token: required when http.host "
                          f"({settings.http.host!r}) is not a loopback address (set it or OMS__HTTP__TOKEN)")
    _coordination_for(settings.coordination.url, settings, SystemClock())
    _timers_for(settings.broker.url, settings, SystemClock())
    return load_routing(settings, specs)


def _store_for(url: str, settings: Settings) -> Any:
    if url == "memory://":
        return MemoryStore()
    if url.startswith("sqlite:///"):
        return SqliteStore(url.removeprefix("sqlite:///"), max_batch=settings.store.checkpoint_max_batch,
                           synchronous=settings.store.synchronous, writer=settings.store.writer)
    if url.startswith(("postgresql://", "postgres://")):
        from .adapters.postgres_store import PostgresStore
        return PostgresStore(url, max_batch=settings.store.checkpoint_max_batch, writers=settings.store.writers)
    raise ConfigError(f"{settings.source}: key store.url: {url!r} is not a store this build has "
                      "(sqlite:///PATH, postgresql://..., or memory://)")


def _timers_for(url: str, settings: Settings, clock: Clock) -> Any:
    """Delayed wake-ups: in-process on the embedded default, RabbitMQ delay queues with amqp://."""
    if url == "memory://":
        return MemoryTimers(clock)
    if url.startswith(("amqp://", "amqps://")):
        from .adapters.rabbitmq_timers import RabbitTimers, with_deadlines
        # A tier per pay timeout: every pay deadline then parks once (no walk down the ladder).
        pay = settings.payment
        tiers = with_deadlines(tuple(settings.broker.delay_tiers), (pay.timeout, *pay.timeout_by_kind.values()))
        return RabbitTimers(url, clock, prefix=settings.broker.prefix, tiers=tiers)
    raise ConfigError(f"{settings.source}: key broker.url: {url!r} is not supported (amqp://... or memory://)")


async def _open_store(store: Any) -> None:
    from .adapters.postgres_store import MigrationNeeded
    try:
        await store.open()
    except MigrationNeeded as exc:
        raise StartupError(str(exc)) from None


def _publisher_for(settings: Settings, ports: Any) -> tuple[Any, Any]:
    """The outbox's publisher, and the consumer that brings published commands to the simulated
    downstream systems (None on the embedded default, where the publisher applies them itself).
    Real downstream systems would consume from RabbitMQ on their own; ours are simulated here."""
    relay = settings.relay
    if not settings.broker.url.startswith(("amqp://", "amqps://")):
        return LocalPublisher(ports, concurrency=relay.concurrency), None
    from .adapters.rabbitmq_downstream import RabbitDownstream
    from .adapters.rabbitmq_publisher import RabbitPublisher
    url, prefix = settings.broker.url, settings.broker.prefix
    publisher = RabbitPublisher(url, prefix=prefix, mandatory_events=relay.mandatory_events,
                                confirm_timeout=relay.confirm_timeout, events_per_message=relay.events_per_message)
    downstream = RabbitDownstream(url, ports, prefix=prefix, prefetch=relay.downstream_prefetch,
                                  max_retries=relay.downstream_max_retries, retry_delay=relay.downstream_retry_delay)
    return publisher, downstream


async def _open_relay(settings: Settings, store: Any, ports: Any, clock: Clock,
                      stack: AsyncExitStack) -> tuple[Relay, Any]:
    """Opened before the pipeline, so they close after it has stopped."""
    publisher, downstream = _publisher_for(settings, ports)
    try:
        await publisher.open()
        stack.push_async_callback(publisher.close)
        if downstream is not None:
            await downstream.open()
            stack.push_async_callback(downstream.close)
    except RuntimeError as exc:
        from .adapters.rabbitmq_downstream import DownstreamConfigError
        from .adapters.rabbitmq_publisher import PublisherConfigError
        if isinstance(exc, (PublisherConfigError, DownstreamConfigError)):  # a 406: restarting will not help
            raise StartupError(str(exc)) from None
        raise
    relay = Relay(store, publisher, clock, settings.relay, holder_id(settings.daemon.instance_id))
    return relay, downstream


def _coordination_for(url: str, settings: Settings, clock: Clock) -> Any:
    if url == "memory://":
        return LocalCoordination(clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .adapters.redis_coordination import RedisCoordination
        return RedisCoordination(url, prefix=settings.coordination.prefix)
    raise ConfigError(f"{settings.source}: key coordination.url: {url!r} is not supported "
                      "(redis://... or memory://)")


async def _open_broker_intake(app: App, stack: AsyncExitStack) -> Any:
    """RabbitMQ intake queues with amqp://, consumed while the pipeline runs (one of its services;
    the daemon stops them before draining). The embedded default takes orders over HTTP only."""
    settings = app.settings
    if not settings.broker.url.startswith(("amqp://", "amqps://")):
        return None
    from .adapters.rabbitmq_intake import RabbitIntake
    from .intake_queues import handlers
    broker_intake = RabbitIntake(settings.broker.url, prefix=settings.broker.prefix, settings=settings.intake)
    await broker_intake.open()
    stack.push_async_callback(broker_intake.close)
    for kind, handler in handlers(app).items():
        broker_intake.register(kind, handler)
    app.pipeline.services.append(broker_intake.run)
    return broker_intake


def _health(store: Any, timers: Any, coordination: Any, broker_intake: Any) -> Health:
    """A probe per dependency; the store's is a primary-key read of no order (nothing new asked of it)."""
    probes: dict[str, list] = {"store": [lambda: store.get("")]}
    rabbitmq = [a.ping for a in (timers, broker_intake) if hasattr(a, "ping")]
    if rabbitmq:
        probes["rabbitmq"] = rabbitmq
    if hasattr(coordination, "ping"):
        probes["redis"] = [coordination.ping]
    return Health(probes)


async def build(settings: Settings, *, clock: Clock | None = None) -> App:
    from stages import load_specs
    table = check(settings)
    clock = clock or SystemClock()
    stack = AsyncExitStack()
    try:
        store = _store_for(settings.store.url, settings)
        store.own(f"instance-{settings.daemon.instance_id}", settings.store.lease)
        await _open_store(store)
        stack.push_async_callback(store.close)
        sim = SimSettings.from_mapping(settings.downstream)
        effects = EffectLog(sim.effect_log or None, retain=sim.retain_effects)
        await effects.open()
        stack.push_async_callback(effects.close)
        ports = build_simulated_ports(sim, clock, effects)
        coordination = _coordination_for(settings.coordination.url, settings, clock)
        if hasattr(coordination, "open"):
            await coordination.open()
        stack.push_async_callback(coordination.close)
        timers = _timers_for(settings.broker.url, settings, clock)
        if hasattr(timers, "open"):
            await timers.open()
            stack.push_async_callback(timers.close)
        relay, downstream = await _open_relay(settings, store, ports, clock, stack)
        pipeline = Pipeline(settings, load_specs(), table, store, timers, coordination,
                            ports, clock, flag_names=flags.names)
        stack.callback(pipeline.stop)
        pipeline.services.append(relay.run)  # the outbox: events and commands out, at least once
        pipeline.listeners.append(relay.on_end)  # an order's end wrote events: relay them now
        if downstream is not None:
            pipeline.services.append(downstream.run)
        stock = Stock(ports.inventory, store, clock, settings)
        # Every cancel writes what it owes (money, stock, points, coupon) into the outbox with it.
        pipeline.cancel_commands = cancel_everything
        pipeline.on_start.append(stock.confirm)  # paid: the reservation becomes a sale
        pipeline.services.append(stock.run)  # the reconciler of reservations nobody settled
        intake = Intake(pipeline, settings, stock)
        reverse = Reverse(pipeline, settings, intake)
        ports.wms.reporter = reverse.warehouse_report  # the simulated warehouse reports back to us
        pipeline.services.append(reverse.run)  # open reverse requests after a restart, and retries
        app = App(settings, pipeline, intake, effects, stack, stock, reverse=reverse, relay=relay,
                  payments=Payments(pipeline))
        app.broker_intake = await _open_broker_intake(app, stack)
        app.health = _health(store, timers, coordination, app.broker_intake)
        rabbitmq = [a.ping for a in (relay.publisher, downstream) if hasattr(a, "ping")]
        if rabbitmq:  # the outbox's own connections to the broker
            app.health.probes.setdefault("rabbitmq", []).extend(rabbitmq)
        return app
    except BaseException:
        await stack.aclose()
        raise
