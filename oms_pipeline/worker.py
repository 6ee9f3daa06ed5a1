"""One stage's worker: a bounded queue and a pool of slots (DESIGN R-1.1).

A slot takes its fair share of the orders already queued (one batch, one
checkpoint wait), runs the handler on each, and hands the batch to the
pipeline, which checkpoints and routes it. `io` handlers run as coroutines (a
call that completes without waiting costs no task switch and no timer); `cpu`
handlers run inline or, in process mode, in chunks on the process pool.
"""
from __future__ import annotations

import asyncio
import time
import types
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from . import cpu_pool
from .bqueue import BoundedQueue
from .config import RetrySettings
from .metrics import StageStats
from .outcome import Outcome, PermanentError, manual, retry
from .stage import CpuContext, StageContext, StageSpec

if TYPE_CHECKING:
    from .pipeline import Job, Pipeline


@dataclass(frozen=True)
class StageConfig:
    """A stage's settings with the kind defaults filled in."""

    pool: int
    queue: int
    timeout: float
    batch: int
    mode: str
    checkpoint: bool  # False: a straight hop on from this stage writes no checkpoint of its own
    retry: RetrySettings
    settings: dict[str, Any]


class StageWorker:
    def __init__(self, spec: StageSpec, config: StageConfig, pipeline: "Pipeline") -> None:
        self.spec = spec
        self.name = spec.name
        self.config = config
        self.pipeline = pipeline
        self.queue: BoundedQueue[Job] = BoundedQueue(config.queue)
        self.stats = StageStats(spec.name)
        self.busy = 0
        self._slots = 0
        self._accepting = True
        self._tg: anyio.abc.TaskGroup | None = None
        self._idle = anyio.Event()
        self._waits = 1.0  # moving average of the share of calls that had to wait
        self._io_ctx = StageContext(spec.name, config.settings, pipeline.ports, pipeline.coordination, pipeline.clock)

    @property
    def pool(self) -> int:
        return self.config.pool

    async def run(self) -> None:
        async with anyio.create_task_group() as self._tg:
            self._grow()

    def reconfigure(self, config: StageConfig) -> None:
        """Live reload: new pool size, queue bound, timeout; in-flight work is untouched."""
        self.config = config
        self.queue.resize(config.queue)
        self._io_ctx = StageContext(self.name, config.settings, self.pipeline.ports,
                                    self.pipeline.coordination, self.pipeline.clock)
        self._grow()  # shrinking happens as surplus slots finish their batch

    def stop_taking(self) -> None:
        self._accepting = False
        self.queue.wake_all()  # idle slots see the stop

    async def wait_idle(self) -> None:
        while self.busy:
            self._idle = anyio.Event()
            await self._idle.wait()

    def _grow(self) -> None:
        slots_wanted = self._slot_count()
        while self._tg is not None and self._slots < slots_wanted:
            self._slots += 1
            self._tg.start_soon(self._slot, self._slots - 1)

    def _slot_count(self) -> int:
        if self.spec.kind == "cpu" and self.config.mode == "inline":
            return 1  # one thread: more slots would only interleave
        return self.config.pool

    async def _slot(self, index: int) -> None:
        try:
            while self._accepting and index < self._slot_count():
                # Spread a backlog over the slots only when calls really wait;
                # calls that complete at once gain nothing from it but overhead.
                share = 1 if self._waits < 0.1 else self._slot_count()
                batch = await self.queue.get_batch(self.config.batch, share)
                if not batch:
                    continue
                if not self._accepting:
                    self.queue.put_front(batch)
                    return
                if self.pipeline.pausing:  # the reverse flow asked some orders to stop before this stage
                    batch = await self.pipeline.hold_back(self.name, batch)
                    if not batch:
                        continue
                self.busy += 1
                self.stats.in_flight += len(batch)
                try:
                    outcomes = await self._handle(batch)
                    self.stats.observe_batch(outcomes)
                    await self.pipeline.advance(self, batch, outcomes)
                finally:
                    self.busy -= 1
                    self.stats.in_flight -= len(batch)
                    if not self.busy:
                        self._idle.set()
        finally:
            self._slots -= 1

    async def _handle(self, batch: list["Job"]) -> list[Outcome]:
        started = time.perf_counter()
        if self.spec.kind == "io":
            outcomes = await self._run_io(batch)
        elif self.config.mode == "process":
            outcomes = await self._run_process(batch)
        else:
            outcomes = self._run_inline(batch)
        # One clock read per batch: per-order timing would cost as much as the hop itself.
        self.stats.latency.observe_many((time.perf_counter() - started) / len(batch), len(batch))
        return outcomes

    async def _run_io(self, batch: list["Job"]) -> list[Outcome]:
        """Start every handler of the batch; those that wait then wait together.

        A handler that completes without waiting costs one `coroutine.send`.
        The ones that wait (a Redis counter, a downstream call) are resumed
        side by side, so the calls of a whole batch go out in the same turn of
        the loop (the adapters coalesce them) instead of one order's at a time.
        """
        handler, ctx, outcomes, waiting = self.spec.handler, self._io_ctx, [], []
        for i, job in enumerate(batch):
            try:
                coro = handler(job.order, ctx)
                try:
                    first = coro.send(None)
                except StopIteration as done:
                    result = done.value  # finished without waiting: no timer, no task switch
                else:
                    waiting.append((i, coro, first))
                    outcomes.append(None)  # filled in below
                    continue
            except Exception as exc:  # noqa: BLE001 - a handler failure never kills the worker
                result = self._failed(exc)
            outcomes.append(_outcome(result, self.name))
        if waiting:
            for i, outcome in await self._wait_all(waiting):
                outcomes[i] = outcome
        self._waits = 0.8 * self._waits + 0.2 * (len(waiting) / len(batch))
        return outcomes

    async def _wait_all(self, waiting: list[tuple[int, Any, Any]]) -> list[tuple[int, Any]]:
        """Resume the handlers that waited, side by side. They all started together, so one
        deadline for the group is each one's own `timeout`: those not done by then time out,
        and the others keep their results.

        A handler waiting on a future (a Redis counter's answer: nearly all of them) is resumed
        here, in the slot's task, once that future is done, as its first stretch ran; only one
        that waits again, or waits on anything else, gets a task of its own (bench/io_wait_resume.py:
        ~1.4-2.2 us a handler against ~3-5.5 us with a task each)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.timeout
        results: list[tuple[int, Any]] = []
        tasks: list[tuple[int, asyncio.Task]] = []
        on: dict[asyncio.Future, list[tuple[int, Any]]] = {}
        for i, coro, first in waiting:
            if isinstance(first, asyncio.Future) and first._asyncio_future_blocking and first.get_loop() is loop:
                on.setdefault(first, []).append((i, coro))
            else:
                tasks.append((i, loop.create_task(self._finish(coro, first))))
        try:
            pending = set(on)
            while pending and (left := deadline - loop.time()) > 0:
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    future._asyncio_future_blocking = False
                    for i, coro in on.pop(future):
                        try:
                            yielded = coro.send(None)
                        except StopIteration as stop:
                            results.append((i, _outcome(stop.value, self.name)))
                        except Exception as exc:  # noqa: BLE001 - a handler failure never kills the worker
                            results.append((i, self._failed(exc)))
                        else:  # it waits again: in a task of its own from here on
                            tasks.append((i, loop.create_task(self._finish(coro, yielded))))
            # Not done by the deadline: cancelled in a task of their own, as a task would have been.
            tasks.extend((i, loop.create_task(self._finish(coro, future)))
                         for future, entries in on.items() for i, coro in entries)
            on.clear()
            if tasks:
                _, late = await asyncio.wait([t for _, t in tasks], timeout=max(deadline - loop.time(), 0))
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
        except BaseException:  # the slot is cancelled (shutdown): its handlers stop with it
            for entries in on.values():
                for _, coro in entries:
                    coro.close()
            for _, task in tasks:
                task.cancel()
            raise
        results.extend((i, self._failed(TimeoutError()) if task.cancelled() else task.result())
                       for i, task in tasks)
        return results

    async def _finish(self, coro, first) -> Outcome:
        """Carry on a handler that waited; a failure becomes its outcome."""
        try:
            return _outcome(await _resume(coro, first), self.name)
        except Exception as exc:  # noqa: BLE001 - a handler failure never kills the worker
            return self._failed(exc)

    def _failed(self, exc: Exception) -> Outcome:
        if isinstance(exc, PermanentError):
            return manual(f"{self.name}: {exc}")
        if isinstance(exc, TimeoutError):
            return retry(f"{self.name}: timed out after {self.config.timeout:g}s")
        return retry(f"{self.name}: {type(exc).__name__}: {exc}")

    def _run_inline(self, batch: list["Job"]) -> list[Outcome]:
        ctx = CpuContext(self.name, self.pipeline.clock.now(), self.config.settings)
        run = cpu_pool.run_one
        handler = self.spec.handler
        return [run(handler, job.order, ctx) for job in batch]

    async def _run_process(self, batch: list["Job"]) -> list[Outcome]:
        ctx = CpuContext(self.name, self.pipeline.clock.now(), self.config.settings)
        try:
            results = await self._submit(batch, ctx)
        except TimeoutError:
            return [retry(f"{self.name}: timed out after {self.config.timeout:g}s in the process pool")] * len(batch)
        except BrokenProcessPool:
            self.pipeline.replace_process_pool()
            return [retry(f"{self.name}: a process-pool worker died")] * len(batch)
        outcomes = []
        for job, (outcome, order) in zip(batch, results):
            job.order = order
            outcomes.append(outcome)
        return outcomes

    async def _submit(self, batch: list["Job"], ctx: CpuContext) -> list[tuple[Outcome, Any]]:
        executor: Executor = self.pipeline.process_pool()
        handler = cpu_pool.handler_ref(self.spec.handler)
        future = asyncio.get_running_loop().run_in_executor(
            executor, cpu_pool.run_chunk, handler, [job.order for job in batch], ctx)
        async with asyncio.timeout(self.config.timeout * len(batch)):
            return await future


@types.coroutine
def _resume(coro, yielded):
    """Carry on a coroutine that has already run up to its first wait."""
    try:
        while True:
            try:
                value = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation and timeouts go into the handler
                yielded = coro.throw(exc)
            else:
                yielded = coro.send(value)
    except StopIteration as done:
        return done.value


def _outcome(result: Any, stage: str) -> Outcome:
    """A handler's result as its outcome: anything but an Outcome sends the order to a person."""
    if type(result) is Outcome:
        return result
    return manual(f"{stage}: handler returned {type(result).__name__}, not an Outcome")

