"""The daemon's life: start, serve, reload on SIGHUP, drain on SIGTERM (DESIGN R-1.5).

One signal receiver lives as long as the process (leaving it would restore
the default handlers, and a late SIGHUP would then kill us). The first SIGTERM
(or SIGINT) stops intake and lets in-flight stage work finish and checkpoint
within `daemon.shutdown_grace`; a second one aborts at once, leaving
unfinished work at its last checkpoint, where a restart resumes it.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
import time
from typing import Any

import anyio
from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from . import app as app_module
from . import compiled, config, logs
from .api import Api
from .config import ConfigError, Settings
from .metrics import PipelineCollector, RelayCollector
from .systemd import Notifier, watchdog_interval

log = logging.getLogger("oms.daemon")
EXIT_OK, EXIT_ABORTED, EXIT_CONFIG = 0, 1, 2


# Every stage hop allocates a few short-lived containers; with CPython's default
# young-generation threshold (700) the collector runs so often that its full
# passes over the in-flight orders cost ~15% of throughput (bench/RESULTS.md).
# An in-flight order's objects live for seconds, so each young collection walks
# every order that arrived since the last one: at 50,000 those walks grew to
# ~100 ms each and ~3% of a production run's CPU; at 500,000 a 20,000-order burst
# sees one or two. Cycles are rare here (a few thousand objects a run).
GC_THRESHOLDS = (500_000, 20, 100)


def tune_gc() -> None:
    """Collect less often, and keep what startup loaded out of every collection."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


class Signals:
    def __init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[int](16)

    async def listen(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as received:
            async for signum in received:
                await self._send.send(signum)

    async def next(self) -> int:
        return await self._receive.receive()


def start_metrics(settings: Settings, *collectors: Collector) -> tuple[Any, Any] | None:
    if not settings.metrics.port:
        return None
    registry = CollectorRegistry()
    for extra in (ProcessCollector, PlatformCollector, GCCollector):
        extra(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return start_http_server(settings.metrics.port, settings.metrics.host, registry=registry)


async def serve(config_path: str | None) -> int:
    try:
        settings = config.load(config_path)
        app_module.check(settings)
    except ConfigError as exc:
        print(f"oms: config error: {exc}", flush=True, file=sys.stderr)
        return EXIT_CONFIG
    logs.setup(settings.daemon.log_level)
    tune_gc()
    log.info("starting", extra={"event": "start", "config": settings.source,
                                "loop": type(asyncio.get_running_loop()).__module__,
                                "build": compiled.describe()})
    try:
        app = await app_module.build(settings)
    except app_module.StartupError as exc:  # e.g. an unmigrated database: restarting will not help
        print(f"oms: {exc}", flush=True, file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot start: a dependency is not reachable: %s", exc, extra={"event": "start_failed"})
        return EXIT_ABORTED
    try:
        return await _run(app, config_path)
    finally:
        await app.aclose()
        log.info("stopped", extra={"event": "stopped"})


async def _run(app: Any, config_path: str | None) -> int:
    notifier = Notifier()
    signals = Signals()
    api = Api(app)
    pipeline = app.pipeline
    async with anyio.create_task_group() as tg:
        tg.start_soon(signals.listen)
        await tg.start(pipeline.run)
        runner = web.AppRunner(api.web_app(), access_log=None, handle_signals=False)
        await runner.setup()
        http = app.settings.http
        await web.TCPSite(runner, http.host, http.port, reuse_address=True).start()
        intake_counts = getattr(app.broker_intake, "counts", None)
        metrics = start_metrics(app.settings, PipelineCollector(pipeline, intake_counts), RelayCollector(app.relay))
        tg.start_soon(_heartbeat, app, notifier)
        api.ready = True
        notifier.ready(f"serving on {http.host}:{http.port}")
        log.info("ready", extra={"event": "ready", "http": f"{http.host}:{http.port}",
                                 "metrics": app.settings.metrics.port})
        while (signum := await signals.next()) == signal.SIGHUP:
            reload(app, config_path, notifier)
        api.ready = False
        notifier.stopping()
        log.info("draining", extra={"event": "drain", "signal": signal.Signals(signum).name,
                                    "grace": app.settings.daemon.shutdown_grace})
        await runner.shutdown()  # stop intake: no new connections, no new requests
        grace, started = app.settings.daemon.shutdown_grace, time.monotonic()
        if app.broker_intake is not None:  # and the broker's: consumers cancelled, then what was delivered
            await app.broker_intake.stop(grace)
        code = await _drain(pipeline, signals, max(0.0, grace - (time.monotonic() - started)), app.relay)
        await runner.cleanup()
        if metrics is not None:
            metrics[0].shutdown()
        tg.cancel_scope.cancel()
    return code


async def _drain(pipeline: Any, signals: Signals, grace: float, relay: Any = None) -> int:
    code = EXIT_OK
    deadline = time.monotonic() + grace
    async with anyio.create_task_group() as tg:
        async def abort_on_second_signal() -> None:
            nonlocal code
            while await signals.next() == signal.SIGHUP:
                pass
            code = EXIT_ABORTED
            log.warning("second stop signal: aborting, unfinished work resumes after restart",
                        extra={"event": "abort"})
            tg.cancel_scope.cancel()

        tg.start_soon(abort_on_second_signal)
        finished = await pipeline.drain(grace)
        if not finished:
            log.warning("grace period over: unfinished stage work resumes after restart",
                        extra={"event": "grace_over", "grace": grace})
        if relay is not None:  # what the last checkpoints wrote to the outbox goes out before we exit
            await relay.drain(max(0.0, deadline - time.monotonic()))
        tg.cancel_scope.cancel()
    pipeline.stop()
    return code


def reload(app: Any, config_path: str | None, notifier: Notifier) -> None:
    """SIGHUP: new pool sizes, queue bounds, timeouts; a bad file is refused and the old one kept."""
    notifier.reloading()
    try:
        settings = config.load(config_path)
        app_module.check(settings)
        app.pipeline.reconfigure(settings)
    except (ConfigError, ValueError) as exc:
        log.error("reload refused, keeping the running configuration", extra={"event": "reload_refused",
                                                                                "reason": str(exc)})
    else:
        app.settings = settings
        log.info("reloaded", extra={"event": "reloaded", "pools": {n: w.pool for n, w in app.pipeline.workers.items()}})
    notifier.ready("reloaded")


async def _heartbeat(app: Any, notifier: Notifier) -> None:
    """Watchdog pings come from the event loop itself, so a stuck loop gets us restarted."""
    interval = min(watchdog_interval() or 5.0, 5.0)
    pipeline = app.pipeline
    ticks = 0
    while True:
        notifier.watchdog()
        if ticks % 2 == 0:
            await pipeline.refresh_state_counts()
            notifier.status(f"{len(pipeline.in_flight)} orders in flight, {pipeline.total_finished()} finished")
        ticks += 1
        await anyio.sleep(interval)
