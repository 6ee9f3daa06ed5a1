"""The systems a run can drive, and the run itself.

- `PerStage`: the real runtime (Pipeline / StageWorker): a bounded queue and a
  pool per stage, sized for the stage's kind.
- `SharedPool`: one queue and one pool of the same total size; a worker runs
  whichever stage an order needs next and puts the order back.
- `PerOrder`: a task per order running all stages in sequence, at most the
  same total number at once.
- `raw_chain`: 16 `asyncio.Queue` hops with one consumer each and no work at
  all (../shared/PERF_NOTES.md), the floor a runtime's overhead is measured from.

`measure()` drives any of them with the open-loop load and samples them.
"""
from __future__ import annotations

import asyncio
import gc
import time
from typing import Any, Callable, Protocol

import anyio

from .. import config
from ..adapters.local_coordination import LocalCoordination
from ..adapters.memory_store import MemoryStore
from ..adapters.memory_timers import MemoryTimers
from ..clock import SystemClock
from ..pipeline import Pipeline
from ..stage import CpuContext, StageContext
from . import synthetic
from .load import Driver
from .probe import DONE, Recorder, Sampler, percentiles
from .progress import Progress


class System(Protocol):
    label: str

    async def start(self, tg: anyio.abc.TaskGroup, recorder: Recorder) -> None: ...
    async def submit(self, first: int, end: int, scheduled_at: list[float]) -> None: ...
    def stage_view(self) -> dict[str, tuple[int, float, int]]: ...
    def active(self) -> int: ...
    def service_times(self) -> dict[str, float]: ...
    def describe(self) -> dict[str, Any]: ...
    async def close(self) -> None: ...


def slots(worker: Any) -> int:
    """Slots a stage really runs: an inline `cpu` stage runs one (the loop is one thread)."""
    return 1 if worker.spec.kind == "cpu" and worker.config.mode == "inline" else worker.pool


class PipelineView:
    """What every Pipeline-based system reports: per-stage queues, slots and service times."""

    pipeline: Pipeline

    def stage_view(self) -> dict[str, tuple[int, float, int]]:
        # The workers' handler histograms sum each batch's time: the slots' busy seconds.
        return {w.name: (len(w.queue), w.stats.latency.sum, slots(w)) for w in self.pipeline.workers.values()}

    def active(self) -> int:
        """Slots working on a batch now."""
        return sum(w.busy for w in self.pipeline.workers.values())

    def service_times(self) -> dict[str, float]:
        """Mean handler time per order, from the workers' own histograms (seconds)."""
        return {w.name: w.stats.latency.sum / w.stats.latency.count
                for w in self.pipeline.workers.values() if w.stats.latency.count}

    def describe(self) -> dict[str, Any]:
        return {"stages": {w.name: {"kind": w.spec.kind, "pool": w.pool, "slots": slots(w),
                                    "mode": w.config.mode if w.spec.kind == "cpu" else "async",
                                    "queue": w.queue.maxsize, "batch": w.config.batch}
                           for w in self.pipeline.workers.values()},
                "process_workers": self.pipeline.settings.daemon.process_workers}


class PerStage(PipelineView):
    label = "per_stage"

    def __init__(self, profiles: list[synthetic.Profile], settings: config.Settings, dist: str, seed: int) -> None:
        clock = SystemClock()
        specs = synthetic.specs(profiles, dist, seed)
        self.pipeline = Pipeline(settings, specs, synthetic.table(list(specs)), MemoryStore(checkpoints=False),
                                 MemoryTimers(clock), LocalCoordination(clock), None, clock)
        self.recorder: Recorder | None = None

    async def start(self, tg: anyio.abc.TaskGroup, recorder: Recorder) -> None:
        self.recorder = recorder
        self.pipeline.listeners.append(lambda end, reason, order: recorder.end(order.order_no, end))
        await tg.start(self.pipeline.run)

    async def submit(self, first: int, end: int, scheduled_at: list[float]) -> None:
        orders = [synthetic.make_order(i) for i in range(first, end)]
        for order, i in zip(orders, range(first, end)):
            self.recorder.arrive(order.order_no, scheduled_at[i])
        await self.pipeline.submit_many(orders)

    async def close(self) -> None:
        self.pipeline.stop()


class _Stages:
    """The generated stages as plain (name, kind, handler, context) for the hand-rolled strategies."""

    def __init__(self, profiles: list[synthetic.Profile], dist: str, seed: int) -> None:
        clock = SystemClock()
        specs = synthetic.specs(profiles, dist, seed)
        self.stages = []
        for spec in specs.values():
            settings = dict(spec.defaults)
            ctx = (StageContext(spec.name, settings, None, None, clock) if spec.kind == "io"
                   else CpuContext(spec.name, clock.now(), settings))
            self.stages.append((spec.name, spec.kind == "io", spec.handler, ctx))
        self.time = [0.0] * len(self.stages)  # handler seconds per stage
        self.count = [0] * len(self.stages)
        self.active = 0  # handler calls under way

    async def run(self, i: int, order: Any) -> None:
        name, is_io, handler, ctx = self.stages[i]
        started = time.perf_counter()
        self.active += 1
        if is_io:
            await handler(order, ctx)
        else:
            handler(order, ctx)
        self.active -= 1
        self.time[i] += time.perf_counter() - started
        self.count[i] += 1

    def service_times(self) -> dict[str, float]:
        return {s[0]: t / c for s, t, c in zip(self.stages, self.time, self.count) if c}


class SharedPool:
    """One FIFO queue of (order, next stage) and `size` workers taking from it.

    Orders in the system are bounded (`bound`, the per-stage queues' total), not the
    queue: a worker putting an order back must never wait, or a full queue would
    deadlock the pool."""

    label = "shared_pool"

    def __init__(self, profiles: list[synthetic.Profile], size: int, bound: int, dist: str, seed: int) -> None:
        self.work = _Stages(profiles, dist, seed)
        self.size = size
        self.room = asyncio.Semaphore(bound)
        self.bound = bound
        self.queue: asyncio.Queue = asyncio.Queue()

    async def start(self, tg: anyio.abc.TaskGroup, recorder: Recorder) -> None:
        self.recorder = recorder
        for _ in range(self.size):
            tg.start_soon(self._worker)

    async def _worker(self) -> None:
        last = len(self.work.stages) - 1
        while True:
            order, i = await self.queue.get()
            await self.work.run(i, order)
            if i < last:
                self.queue.put_nowait((order, i + 1))
            else:
                self.recorder.end(order.order_no, DONE)
                self.room.release()

    async def submit(self, first: int, end: int, scheduled_at: list[float]) -> None:
        for i in range(first, end):
            await self.room.acquire()
            order = synthetic.make_order(i)
            self.recorder.arrive(order.order_no, scheduled_at[i])
            self.queue.put_nowait((order, 0))

    def stage_view(self) -> dict[str, tuple[int, float, int]]:
        return {"shared": (self.queue.qsize(), sum(self.work.time), self.size)}

    def service_times(self) -> dict[str, float]:
        return self.work.service_times()

    def active(self) -> int:
        return self.work.active

    def describe(self) -> dict[str, Any]:
        return {"pool": self.size, "bound": self.bound}

    async def close(self) -> None:
        pass


class PerOrder:
    """A task per order running every stage in turn; at most `size` orders at once."""

    label = "per_order"

    def __init__(self, profiles: list[synthetic.Profile], size: int, dist: str, seed: int) -> None:
        self.work = _Stages(profiles, dist, seed)
        self.size = size
        self.room = asyncio.Semaphore(size)
        self.tg: anyio.abc.TaskGroup | None = None

    async def start(self, tg: anyio.abc.TaskGroup, recorder: Recorder) -> None:
        self.recorder, self.tg = recorder, tg

    async def submit(self, first: int, end: int, scheduled_at: list[float]) -> None:
        for i in range(first, end):
            await self.room.acquire()
            order = synthetic.make_order(i)
            self.recorder.arrive(order.order_no, scheduled_at[i])
            self.tg.start_soon(self._one, order)

    async def _one(self, order: Any) -> None:
        for i in range(len(self.work.stages)):
            await self.work.run(i, order)
        self.recorder.end(order.order_no, DONE)
        self.room.release()

    def stage_view(self) -> dict[str, tuple[int, float, int]]:
        return {"orders": (0, sum(self.work.time), self.size)}

    def service_times(self) -> dict[str, float]:
        return self.work.service_times()

    def active(self) -> int:
        return self.work.active

    def describe(self) -> dict[str, Any]:
        return {"pool": self.size}

    async def close(self) -> None:
        pass


# -- a run --------------------------------------------------------------------

async def measure(system: System, offsets: list[float], *, batch: int, interval: float, timeout: float,
                  stall: float, progress: bool, label: str | None = None, raw: bool = False) -> dict[str, Any]:
    """Drive `system` with the arrivals in `offsets` until every order ended (or the run
    timed out or stalled), sampling all along; the run's figures as a dict. With `raw`, also
    every latency (seconds) and the perf_counter start and last end, for merging instances."""
    n = len(offsets)
    recorder, driver = Recorder(), Driver(offsets, batch)
    sampler = Sampler(interval, lambda: recorder.finished, system.stage_view)
    bar = Progress(label or system.label, n, lambda: driver.sent, lambda: recorder.finished, enabled=progress)
    gc.collect()
    async with anyio.create_task_group() as tg:
        await system.start(tg, recorder)
        tg.start_soon(sampler.run)
        tg.start_soon(bar.run)
        await driver.run(lambda first, end: system.submit(first, end, driver.scheduled_at))
        stopped = await _wait_finished(recorder, n, driver.started, timeout, stall, system)
        outbox = await _wait_outbox(system, driver.started, timeout) if stopped == "finished" else {}
        sampler.sample()
        tg.cancel_scope.cancel()
    await system.close()
    elapsed = max(1e-9, recorder.last_end - driver.started)
    return {"label": label or system.label, "orders": n, "finished": recorder.finished,
            "stopped": stopped, "ends": dict(recorder.ends), "elapsed_s": round(elapsed, 3),
            "throughput": round(recorder.finished / elapsed, 1),
            "offered_rate": round(n / offsets[-1], 1) if offsets[-1] > 0 else None,
            "latency_ms": {k: round(v, 2) for k, v in percentiles(recorder.latencies).items()},
            "service_ms": {k: round(v * 1000, 4) for k, v in system.service_times().items()},
            "system": system.describe(), **sampler.summary(), "series": sampler.series,
            **outbox_figures(recorder.finished, driver.started, recorder.last_end, outbox),
            **({"raw": {"latencies_s": recorder.latencies, "started": driver.started,
                        "last_end": recorder.last_end, "drained": outbox.get("drained")}} if raw else {})}


def outbox_figures(finished: int, started: float, last_end: float, outbox: dict[str, Any]) -> dict[str, Any]:
    """The rows left when the last order ended and, once the outbox drained (perf_counter time
    `outbox["drained"]`), the seconds that took and orders/s counted until then."""
    if "outbox_left_at_end" not in outbox:
        return {}
    out = {"outbox_left_at_end": outbox["outbox_left_at_end"]}
    drained = outbox.get("drained")
    if drained:
        out["outbox_drained_s"] = round(max(0.0, drained - last_end), 3)
        out["throughput_drained"] = round(finished / max(1e-9, drained - started), 1)
    return out


async def _wait_outbox(system: System, started: float, timeout: float) -> dict[str, Any]:
    """For a system with an outbox (the daemon): the rows not yet published when the last order
    ended, and when the relay had published them all (perf_counter), so a run's rate can include
    its events and commands going out, not only its orders ending."""
    pending = getattr(system, "outbox_pending", None)
    if pending is None:
        return {}
    left = remaining = await pending()
    while remaining:
        if timeout and time.perf_counter() - started > timeout:
            return {"outbox_left_at_end": left}
        await anyio.sleep(0.05)
        remaining = await pending()
    return {"outbox_left_at_end": left, "drained": time.perf_counter()}


async def _wait_finished(recorder: Recorder, n: int, started: float, timeout: float, stall: float,
                         system: System) -> str:
    """Why the run stopped: every order ended, the timeout, or `stall` seconds in which no order
    ended, no stage finished any work and none is working (everything left waits on a timer).
    A shared FIFO pool ends its first order only late, and a small pool's batch of slow calls
    takes long: both are progress."""
    seen, moved = -1.0, time.perf_counter()
    while recorder.finished < n:
        now = time.perf_counter()
        if timeout and now - started > timeout:
            return "timeout"
        done = _work_done(system) + recorder.finished
        if done != seen or system.active():
            seen, moved = done, now
        elif stall and now - moved > stall:
            return "stalled"
        await anyio.sleep(0.02)
    return "finished"


def _work_done(system: System) -> float:
    """Busy seconds of every stage so far: grows while anything is being worked on."""
    return sum(busy for _, busy, _ in system.stage_view().values())


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """One run on a fresh uvloop event loop, as the daemon runs."""
    return anyio.run(fn, *args, backend_options={"use_uvloop": True})


# -- the raw queue chain --------------------------------------------------------

async def raw_chain(items: int, hops: int = 16, maxsize: int = 100) -> dict[str, Any]:
    """Items/s through `hops` asyncio.Queue(maxsize) hops, one consumer each, no work."""
    queues = [asyncio.Queue(maxsize) for _ in range(hops + 1)]

    async def hop(inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        while True:
            await outbox.put(await inbox.get())

    async with anyio.create_task_group() as tg:
        for a, b in zip(queues, queues[1:]):
            tg.start_soon(hop, a, b)

        async def feed() -> None:
            for i in range(items):
                await queues[0].put({"i": i})

        started = time.perf_counter()
        tg.start_soon(feed)
        last = queues[-1]
        for _ in range(items):
            await last.get()
        elapsed = time.perf_counter() - started
        tg.cancel_scope.cancel()
    return {"items": items, "hops": hops, "elapsed_s": round(elapsed, 3), "throughput": round(items / elapsed, 1),
            "us_per_hop": round(elapsed / items / hops * 1e6, 3)}
