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
from .intake import Intake
from .order import KINDS
from .pipeline import Pipeline, stage_configs
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
                           synchronous=settings.store.synchronous)
    if url.startswith(("postgresql://", "postgres://")):
        from .adapters.postgres_store import PostgresStore
        return PostgresStore(url, max_batch=settings.store.checkpoint_max_batch)
    raise ConfigError(f"{settings.source}: key store.url: {url!r} is not a store this build has "
                      "(sqlite:///PATH, postgresql://..., or memory://)")


def _timers_for(url: str, settings: Settings, clock: Clock) -> Any:
    """Delayed wake-ups: in-process on the embedded default, RabbitMQ delay queues with amqp://."""
    if url == "memory://":
        return MemoryTimers(clock)
    if url.startswith(("amqp://", "amqps://")):
        from .adapters.rabbitmq_timers import RabbitTimers
        return RabbitTimers(url, clock, prefix=settings.broker.prefix, tiers=tuple(settings.broker.delay_tiers))
    raise ConfigError(f"{settings.source}: key broker.url: {url!r} is not supported (amqp://... or memory://)")


async def _open_store(store: Any) -> None:
    from .adapters.postgres_store import MigrationNeeded
    try:
        await store.open()
    except MigrationNeeded as exc:
        raise StartupError(str(exc)) from None


def _coordination_for(url: str, settings: Settings, clock: Clock) -> Any:
    if url == "memory://":
        return LocalCoordination(clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .adapters.redis_coordination import RedisCoordination
        return RedisCoordination(url, prefix=settings.coordination.prefix)
    raise ConfigError(f"{settings.source}: key coordination.url: {url!r} is not supported "
                      "(redis://... or memory://)")


async def build(settings: Settings, *, clock: Clock | None = None) -> App:
    from stages import load_specs
    table = check(settings)
    clock = clock or SystemClock()
    stack = AsyncExitStack()
    try:
        store = _store_for(settings.store.url, settings)
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
        pipeline = Pipeline(settings, load_specs(), table, store, timers, coordination,
                            ports, clock, flag_names=flags.names)
        stack.callback(pipeline.stop)
        stock = Stock(ports.inventory, store, clock, settings)
        pipeline.listeners.append(stock.on_end)  # cancelled: give the stock back
        pipeline.on_start.append(stock.confirm)  # paid: the reservation becomes a sale
        pipeline.services.append(stock.run)  # cancels as they come, and the reconciler
        return App(settings, pipeline, Intake(pipeline, settings, stock), effects, stack, stock)
    except BaseException:
        await stack.aclose()
        raise
