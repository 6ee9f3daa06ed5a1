"""The staged pipeline: workers wired by the routing table, checkpointed through the store.

`advance()` is the one place an order moves: it records the stage boundary
(one durable checkpoint per batch when the store is persistent), then hands
each order to its next stage's queue (waiting while that queue is full), to
the timers (park, retry backoff), or to an end (done, cancelled, manual,
split). Every order this instance is working on is in `in_flight`, so a
stray timer or a duplicate replay can never run an order twice at once.
"""
from __future__ import annotations

import logging
import math
import random
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Awaitable, Callable, Iterable, Mapping

import anyio

from . import order as order_codec
from . import routing, states
from .clock import Clock
from .config import Settings
from .metrics import E2E_BUCKETS, Histogram
from .order import Order
from .outcome import Outcome, manual
from .ports import store as st
from .ports.store import Checkpoint, Event, NewOrder, Store, StoredOrder
from .ports.timers import Due, Timers
from .retry import backoff
from .stage import StageSpec
from .worker import StageConfig, StageWorker

log = logging.getLogger("oms.pipeline")

END_STATES = {routing.DONE: st.DONE, routing.CANCELLED: st.CANCELLED,
              routing.MANUAL: st.MANUAL, routing.SPLIT: st.SPLIT}
# The business status an order takes on as it reaches a runtime state.
STATUS_OF_STATE = {st.QUEUED: states.IN_FULFILMENT, st.DONE: states.DISPATCHED, st.MANUAL: states.MANUAL_REVIEW,
                   st.SPLIT: states.SPLIT}
IN_FULFILMENT = states.IN_FULFILMENT
STORE_RETRY_FIRST, STORE_RETRY_MAX = 0.05, 5.0  # seconds between attempts while the store is away
DUE_CONCURRENCY = 64  # due timers handled at once (each waits on the store, not the CPU)


def move(order: Order, to: str, now: float, events: list[Event]) -> None:
    """A state-machine transition, kept as an event; an illegal one is logged and skipped."""
    if order.status == to:
        return
    try:
        from_status = states.apply(order, to, now)
    except states.IllegalTransition as exc:
        log.error("illegal transition refused: %s", exc, extra={"event": "illegal_transition",
                                                                 "order_no": order.order_no})
        return
    events.append(Event(order.order_no, from_status, to, now))


class Job:
    """An order this instance is moving through the stages."""

    __slots__ = ("order", "route", "stage", "attempts", "started", "trail")

    def __init__(self, order: Order, route: routing.Route, stage: str, attempts: int, started: float) -> None:
        self.order = order
        self.route = route
        self.stage = stage
        self.attempts = attempts
        self.started = started
        # Boundaries passed since its last checkpoint (stages with checkpoint = false), each
        # (stage, outcome, reason, at) as in st.Step.
        self.trail: list[tuple[str, str, str, float]] = []


class Family:
    """A split parent whose children are on their way: its end waits for theirs."""

    __slots__ = ("parent", "left", "dispatched")

    def __init__(self, parent: Job, left: int) -> None:
        self.parent = parent
        self.left = left  # children not yet ended
        self.dispatched = False  # a child was dispatched: the parent ends done, else cancelled


def stage_configs(settings: Settings, specs: Mapping[str, StageSpec]) -> dict[str, StageConfig]:
    """Each stage's settings, falling back to the defaults of its kind."""
    unknown = set(settings.stages) - set(specs)
    if unknown:
        raise ValueError(f"[stages.{sorted(unknown)[0]}] is not a known stage")
    out = {}
    for name, spec in specs.items():
        own = settings.stages.get(name)
        kind = getattr(settings.stage_defaults, spec.kind)
        pool, queue, timeout, batch, mode, checkpoint = (
            _own_or(own, kind, key) for key in ("pool", "queue", "timeout", "batch", "mode", "checkpoint"))
        checkpoint = spec.kind == "io" if checkpoint is None else checkpoint
        retry_policy = own.retry if own and own.retry else settings.stage_defaults.retry
        out[name] = StageConfig(pool, queue, timeout, batch, mode, checkpoint, retry_policy,
                                {**spec.defaults, **(own.settings if own else {})})
    return out


def _own_or(own: Any, kind: Any, key: str) -> Any:
    value = getattr(own, key) if own is not None else None
    return getattr(kind, key) if value is None else value


class Pipeline:
    def __init__(self, settings: Settings, specs: Mapping[str, StageSpec], table: routing.RoutingTable,
                 store: Store, timers: Timers, coordination: Any, ports: Any, clock: Clock,
                 flag_names: Callable[[str], Iterable[str]] = lambda flags: (), seed: int | None = None) -> None:
        self.settings = settings
        self.specs = dict(specs)
        self.table = table
        self.store = store
        self.timers = timers
        self.coordination = coordination
        self.ports = ports
        self.clock = clock
        self.flag_names = flag_names
        self.rng = random.Random(seed)
        self.workers = {name: StageWorker(spec, cfg, self)
                        for (name, spec), cfg in zip(self.specs.items(), stage_configs(settings, specs).values())}
        self.in_flight: set[str] = set()
        # Orders the reverse flow asked to stop: each leaves the forward flow at its next stage
        # boundary (state PAUSED) and the event is set once it is at rest (`pause`).
        self.pausing: dict[str, anyio.Event] = {}
        # The downstream commands a cancel owes (money and stock back: settlement.cancel_everything),
        # written with the cancel's checkpoint whichever path cancels the order.
        self.cancel_commands: Callable[[Order, str], list[st.Command]] = lambda order, reason: []
        self._open_children: dict[str, Family] = {}  # split parents this instance split, children not yet ended
        self._settling: list[Family] = []  # their last child ended this turn of the loop: to be closed
        self._routes: dict[tuple[str, str], routing.Route] = {}
        self.finished: dict[str, int] = {}
        self.e2e = Histogram(E2E_BUCKETS)
        self.state_counts: dict[str, int] = {}
        self.intake_count = 0
        self.listeners: list[Callable[[str, str, Order], Any]] = []  # (end, reason, order) at each end
        # Awaited with the order when `release` starts one that never ran before (paid, or a
        # held payment accepted by a person): the stock's confirm (oms_pipeline/stock.py).
        self.on_start: list[Callable[[Order], Awaitable[None]]] = []
        # Long-running helpers started and stopped with the workers (the stock reconciler).
        self.services: list[Callable[[], Awaitable[None]]] = []
        self._pool: ProcessPoolExecutor | None = None
        self._accepting = True
        self._changed = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None

    # -- lifecycle ------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus = anyio.TASK_STATUS_IGNORED) -> None:
        """Run the workers and timers until cancelled; resumes stored work first."""
        async with anyio.create_task_group() as self._tg:
            for worker in self.workers.values():
                self._tg.start_soon(worker.run)
            self._tg.start_soon(self.timers.run, self._on_due)
            self._tg.start_soon(self._resume_stored)
            self._tg.start_soon(self._sweeper)
            if getattr(self.store, "holder", ""):
                await self.store.renew(self.clock.now())  # alive before anything is resumed or taken over
                self._tg.start_soon(self._keep_alive)
            for service in self.services:
                self._tg.start_soon(service)
            task_status.started()

    async def drain(self, grace: float) -> bool:
        """Stop taking work; let in-flight batches finish and checkpoint. True if all did in time."""
        self._accepting = False
        for worker in self.workers.values():
            worker.stop_taking()
        with anyio.move_on_after(grace) as scope:
            for worker in self.workers.values():
                await worker.wait_idle()
        return not scope.cancelled_caught

    def stop(self) -> None:
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def process_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            from .cpu_pool import make_pool
            self._pool = make_pool(self.settings.daemon.process_workers)
        return self._pool

    def replace_process_pool(self) -> None:
        old, self._pool = self._pool, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    def reconfigure(self, settings: Settings) -> None:
        """Live reload of pool sizes, queue bounds, timeouts and retry policies."""
        configs = stage_configs(settings, self.specs)
        self.settings = settings
        for name, config in configs.items():
            self.workers[name].reconfigure(config)

    # -- intake ---------------------------------------------------------------

    def route_of(self, order: Order) -> routing.Route:
        key = (order.kind, order.flags)
        route = self._routes.get(key)
        if route is None:  # a few dozen (kind, flag string) pairs occur in practice
            route = self._routes[key] = self.table.route_for(order.kind, self.flag_names(order.flags))
        return route

    async def submit(self, order: Order, *, wait_pay: bool = False) -> tuple[str, bool]:
        """Store a new order (idempotent on source + external id) and start it.

        Returns (order number, created). Waits while the first stage's queue is
        full: that wait is what stops intake under backpressure."""
        return (await self.submit_many([order], wait_pay=wait_pay))[0]

    async def submit_many(self, orders: list[Order], *, wait_pay: bool = False) -> list[tuple[str, bool]]:
        """`submit` for a batch of orders: one store round trip for all of them."""
        if not self._accepting:
            raise ShuttingDown("the pipeline is shutting down")
        now = self.clock.now()
        state, status = (st.WAIT_PAY, states.WAIT_PAY) if wait_pay else (st.QUEUED, IN_FULFILMENT)
        jobs, rows = [], []
        for order in orders:
            route = self.route_of(order)
            events: list[Event] = []
            move(order, status, now, events)
            jobs.append(Job(order, route, route.first, 0, now))
            rows.append(NewOrder(order.order_no, order.source, order.external_id, order.kind, state,
                                 route.first, order.status, now, order_codec.encode(order), order.parent_no,
                                 tuple(events), order.member_id, order.pay_deadline if wait_pay else None))
        results = await self.store.create(rows)
        started = [job for job, (_, created) in zip(jobs, results) if created]
        self.intake_count += len(started)
        if state == st.QUEUED:
            await self._start_many(started)
        else:
            await self.timers.schedule_many([("pay_deadline", job.order.order_no, job.order.pay_deadline)
                                             for job in started if job.order.pay_deadline is not None])
        return results

    async def _arm_pay_deadline(self, order: Order) -> None:
        if order.pay_deadline is not None:
            await self.timers.schedule("pay_deadline", order.order_no, order.pay_deadline)

    async def release(self, order_no: str, reason: str, change: Callable[[Order], None] | None = None) -> bool:
        """Start an order that was waiting: paid (WAIT_PAY -> PAID -> IN_FULFILMENT) or
        replayed from the exception centre (MANUAL_REVIEW -> IN_FULFILMENT)."""
        loaded = await self._load_resting(order_no, (st.WAIT_PAY, st.MANUAL), change)
        if loaded is None:
            return False
        stored, order = loaded
        now = self.clock.now()
        events: list[Event] = []
        first = IN_FULFILMENT not in order.timestamps
        if order.status == states.WAIT_PAY:
            move(order, states.PAID, now, events)
        move(order, IN_FULFILMENT, now, events)
        job = Job(order, self.route_of(order), stored.stage, 0, now)
        record = self._record(job, stored.stage, "release", reason, st.QUEUED, stored.stage, None, now, events=events)
        if not await self.store.checkpoint_if(record, stored.state):
            return False  # something else moved it meanwhile (its payment deadline, another replay)
        await self._start(job)
        if first:
            for hook in self.on_start:
                try:
                    await hook(order)
                except Exception:  # noqa: BLE001 - the order is released; the hook's owner repairs later
                    log.exception("start hook failed", extra={"event": "start_hook_failed", "order_no": order_no})
        return True

    async def hold(self, order_no: str, reason: str, change: Callable[[Order], None] | None = None) -> bool:
        """Send an order waiting for payment to the exception centre (WAIT_PAY -> MANUAL_REVIEW):
        a payment that needs a person, e.g. its amount differs from the payable. Compare-and-set
        like `release`; a replay from the exception centre then starts the order."""
        loaded = await self._load_resting(order_no, (st.WAIT_PAY,), change)
        if loaded is None:
            return False
        stored, order = loaded
        now = self.clock.now()
        job = Job(order, self.route_of(order), stored.stage, 0, now)
        record = self._record(job, "payment", "manual", reason, st.MANUAL, stored.stage, None, now)
        if not await self.store.checkpoint_if(record, st.WAIT_PAY):
            return False  # its deadline (or another payment) won
        self._end(job, routing.MANUAL, reason)
        return True

    async def note(self, order_no: str, expect_state: str, outcome: str, reason: str,
                   change: Callable[[Order], None]) -> bool:
        """Record a fact about an order that does not move it (a payment arriving after it was
        cancelled): the document changes and the history gets a row `payment / outcome /
        reason`, in one compare-and-set checkpoint on its current runtime state."""
        loaded = await self._load_resting(order_no, (expect_state,), change)
        if loaded is None:
            return False
        stored, order = loaded
        record = Checkpoint(order_no, "payment", outcome, reason, self.clock.now(), stored.state, stored.stage,
                            stored.status, stored.attempts, stored.wake_at, order_codec.encode(order))
        return await self.store.checkpoint_if(record, expect_state)

    async def expire_payment(self, order_no: str) -> bool:
        """The pay deadline passed: cancel the order if, and only if, it is still unpaid.
        Called by its timer, and by a payment that finds the deadline passed before the
        timer fired (seed 001: the real time decides). True if this call cancelled it."""
        loaded = await self._load_resting(order_no, (st.WAIT_PAY,))
        if loaded is None:
            return False  # paid (or cancelled) meanwhile: the timer is stale
        stored, order = loaded
        now = self.clock.now()
        if order.pay_deadline is not None and order.pay_deadline >= now:
            # Early (or exactly at the deadline, when a payment is still taken): come back at the
            # first instant after it.
            await self.timers.schedule("pay_deadline", order_no, math.nextafter(order.pay_deadline, math.inf))
            return False
        job = Job(order, self.route_of(order), stored.stage, 0, now)
        record = self._record(job, "payment", "pay_timeout", "not paid by the deadline", st.CANCELLED,
                              routing.CANCELLED, None, now)
        if await self.store.checkpoint_if(record, st.WAIT_PAY):  # compare-and-set: a payment may have won
            self._end(job, routing.CANCELLED, "payment timeout")
            return True
        return False

    async def _load_resting(self, order_no: str, expect: tuple[str, ...],
                            change: Callable[[Order], None] | None = None) -> tuple[StoredOrder, Order] | None:
        """An order at rest in one of `expect` (not being worked on here), decoded and changed;
        None if it is elsewhere. The caller's checkpoint_if re-checks the state in the store."""
        stored = await self.store.get(order_no)
        if stored is None or stored.state not in expect or order_no in self.in_flight:
            return None
        order = order_codec.decode(stored.doc)
        if change is not None:
            change(order)
        return stored, order

    async def _start(self, job: Job) -> None:
        await self._start_many([job])

    async def _start_many(self, jobs: list[Job]) -> None:
        """Put orders into their stage's queue (waiting for room), unless already in flight."""
        by_stage: dict[str, list[Job]] = {}
        for job in jobs:
            if job.order.order_no in self.in_flight:
                continue
            self.in_flight.add(job.order.order_no)
            if job.stage in self.workers:
                by_stage.setdefault(job.stage, []).append(job)
            else:
                self._end(job, job.stage, "")
        for stage, queued in by_stage.items():
            await self.workers[stage].queue.put_many(queued)

    # -- the hop --------------------------------------------------------------

    async def advance(self, worker: StageWorker, batch: list[Job], outcomes: list[Outcome]) -> None:
        stage = worker.name
        now = self.clock.now()
        persistent = self.store.persistent
        records: list[Checkpoint] = []
        moves: dict[str, list[Job]] = {}
        later: list[tuple[Job, float]] = []
        ends: list[tuple[Job, str, str]] = []
        workers = self.workers
        durable = worker.config.checkpoint
        for job, outcome in zip(batch, outcomes):
            kind = outcome.kind
            children: list[Job] | tuple = ()
            if kind == "next" or kind == "skip":
                target = job.route.targets[stage][kind]
                job.attempts = 0
                if target in workers:  # the common case, kept short
                    job.stage = target
                    queue = moves.get(target)
                    if queue is None:
                        queue = moves[target] = []
                    queue.append(job)
                    if persistent:
                        if self.pausing and job.order.order_no in self.pausing:
                            records.append(self._record(job, stage, kind, outcome.reason, st.PAUSED, target, None, now))
                        elif durable or job.order.status != IN_FULFILMENT:  # a status change is always written
                            records.append(self._record(job, stage, kind, outcome.reason, st.QUEUED, target, None, now))
                        else:
                            # A Step's fields as a plain tuple: NamedTuple's constructor is a Python call,
                            # and this runs for every order at every unrecorded boundary.
                            job.trail.append((stage, kind, outcome.reason, now))
                    continue
            else:
                outcome, target, wake = self._divert(worker, job, outcome, now)
                kind = outcome.kind
                if wake is not None:
                    later.append((job, wake))
                    if persistent:
                        records.append(self._record(job, stage, kind, outcome.reason, st.PARKED, stage, wake, now))
                    continue
                if kind == "split":
                    children = self._children(job, outcome)
                    ends.extend((child, child.stage, "") for child in children)
            at = target
            if target in self.workers:
                job.stage = target
                moves.setdefault(target, []).append(job)
                state = st.PAUSED if job.order.order_no in self.pausing else st.QUEUED
            else:
                ends.append((job, target, outcome.reason))
                state = END_STATES[target]
                if state == st.MANUAL:
                    at = stage  # a replay from the exception centre runs this stage again
            if persistent:
                records.append(self._record(job, stage, kind, outcome.reason, state, at, None, now, children))
        if records and (lost := await self._checkpoint(records)):
            moves, later, ends = self._without(lost, moves, later, ends)
        for target, jobs in moves.items():
            if self.pausing:
                jobs = self._hold(jobs)
            if self._accepting:
                await self.workers[target].queue.put_many(jobs)
            else:
                for job in jobs:
                    self._leave(job.order.order_no)  # resumes from the checkpoint
        for job, wake in later:
            self._leave(job.order.order_no)
            await self.timers.schedule("resume", job.order.order_no, wake)
        for job, end, reason in ends:
            if end in self.workers:
                await self._start(job)  # a split child starting its own way
            else:
                self._end(job, end, reason)
        self._changed.set()

    def _without(self, lost: set[str], moves: dict[str, list[Job]], later: list, ends: list) -> tuple:
        """Another instance took these orders over (ours was presumed dead): they are its to move."""
        log.warning("orders taken over by another instance; their stage results are dropped here",
                    extra={"event": "orders_lost", "count": len(lost)})
        for no in lost:
            self._leave(no)
        moves = {target: [j for j in jobs if j.order.order_no not in lost] for target, jobs in moves.items()}
        later = [(j, wake) for j, wake in later if j.order.order_no not in lost]
        ends = [(j, end, why) for j, end, why in ends
                if j.order.order_no not in lost and j.order.parent_no not in lost]
        return moves, later, ends

    def _hold(self, jobs: list[Job]) -> list[Job]:
        """Jobs the reverse flow asked to stop leave here (their checkpoint said PAUSED)."""
        going = []
        for job in jobs:
            if job.order.order_no in self.pausing:
                self._leave(job.order.order_no)
            else:
                going.append(job)
        return going

    async def hold_back(self, stage: str, batch: list[Job]) -> list[Job]:
        """Called by a worker with the batch it took: orders the reverse flow asked to stop do not
        run this stage; they are checkpointed PAUSED before it. Returns the rest."""
        held = [job for job in batch if job.order.order_no in self.pausing]
        if not held:
            return batch
        going = [job for job in batch if job.order.order_no not in self.pausing]
        now = self.clock.now()
        lost = await self._checkpoint([self._record(job, stage, "pause", "reverse request", st.PAUSED, stage,
                                                    None, now) for job in held])
        for job in held:
            self._leave(job.order.order_no)
        return [job for job in going if job.order.order_no not in lost]

    def _leave(self, order_no: str) -> None:
        """The order is at rest: no longer worked on here; whoever waits to pause it goes on."""
        self.in_flight.discard(order_no)
        event = self.pausing.pop(order_no, None)
        if event is not None:
            event.set()

    async def pause(self, order_no: str) -> StoredOrder | None:
        """Stop an order's forward progress and take it to rest for the reverse flow: an order being
        worked on stops at its next stage boundary; one at rest (parked, waiting for payment or a
        person, dispatched) is moved to PAUSED by compare-and-set. Returns it PAUSED, or at rest
        where pausing means nothing (cancelled, a split parent), or None if there is no such order.
        The state it was paused from is in its document: results["paused_from"]."""
        while True:
            stored = await self.store.get(order_no)
            if stored is None or stored.state in (st.PAUSED, st.CANCELLED, st.SPLIT):
                return stored
            if order_no in self.in_flight:
                event = self.pausing.setdefault(order_no, anyio.Event())
                await event.wait()
                continue
            order = order_codec.decode(stored.doc)
            order.results["paused_from"] = stored.state
            job = Job(order, self.route_of(order), stored.stage, stored.attempts, self.clock.now())
            record = self._record(job, "reverse", "pause", "reverse request", st.PAUSED, stored.stage, None)
            if await self.store.checkpoint_if(record, stored.state):
                return await self.store.get(order_no)

    async def unpause(self, order_no: str, reason: str, change: Callable[[Order], None] | None = None, *,
                      commands: Iterable[st.Command] | Callable[[], Iterable[st.Command]] = (),
                      reverse: Iterable[st.ReverseRecord] | Callable[[], Iterable[st.ReverseRecord]] = ()) -> bool:
        """Give a PAUSED order back to where it was (a refused or partial cancel): queued orders go
        on with their stage, parked ones wait again, the others rest where they were. `commands`
        and `reverse` (or callables giving them, called after `change`) go with its checkpoint."""
        loaded = await self._load_resting(order_no, (st.PAUSED,), change)
        if loaded is None:
            return False
        stored, order = loaded
        back = order.results.pop("paused_from", st.QUEUED)
        back = st.QUEUED if back == st.PARKED else back  # its stage decides again whether to wait
        now = self.clock.now()
        events: list[Event] = []
        if order.status == states.CANCEL_REQUESTED:
            move(order, IN_FULFILMENT, now, events)
        job = Job(order, self.route_of(order), stored.stage, stored.attempts, now)
        record = Checkpoint(order_no, "reverse", "resume", reason, now, back, stored.stage, order.status,
                            stored.attempts, stored.wake_at, order_codec.encode(order), (), tuple(events),
                            tuple(commands() if callable(commands) else commands),
                            tuple(reverse() if callable(reverse) else reverse))
        if not await self.store.checkpoint_if(record, st.PAUSED):
            return False
        if back == st.QUEUED:
            await self._start(job)
        elif back == st.WAIT_PAY:
            await self._arm_pay_deadline(order)
        return True

    def _divert(self, worker: StageWorker, job: Job, outcome: Outcome, now: float) -> tuple[Outcome, str, float | None]:
        """Outcomes other than next/skip: (outcome, target, wake time if it waits)."""
        if outcome.kind == "retry":
            job.attempts += 1
            policy = worker.config.retry
            if job.attempts >= policy.max_attempts:
                outcome = manual(f"gave up after {job.attempts} attempts: {outcome.reason}")
            else:
                delay = outcome.delay if outcome.delay is not None else backoff(policy, job.attempts, self.rng)
                return outcome, worker.name, now + delay
        elif outcome.kind == "park":
            job.attempts = 0
            return outcome, worker.name, outcome.until if outcome.until is not None else now
        return outcome, job.route.target(worker.name, outcome.kind), None

    def _children(self, parent: Job, outcome: Outcome) -> list[Job]:
        """Jobs for a split's child orders: each goes on from the stage after the split."""
        jobs = []
        for child in outcome.children:
            child.parent_no = parent.order.order_no
            route = self.route_of(child)
            first = route.targets[parent.stage]["next"] if parent.stage in route.targets else route.first
            jobs.append(Job(child, route, first, 0, parent.started))
        parent.order.children = [c.order.order_no for c in jobs]
        self._open_children[parent.order.order_no] = Family(parent, len(jobs))
        return jobs

    def _record(self, job: Job, stage: str, outcome: str, reason: str, state: str, target: str,
                wake: float | None, now: float | None = None, children: list[Job] = (),
                events: list[Event] | None = None) -> Checkpoint:
        now = self.clock.now() if now is None else now
        order = job.order
        events = [] if events is None else events
        self._status(order, state, outcome, now, events)
        new = tuple(NewOrder(c.order.order_no, c.order.source, c.order.external_id,
                             c.order.kind, st.QUEUED, c.stage, c.order.status, now,
                             order_codec.encode(c.order), order.order_no, (), c.order.member_id)
                    for c in children)
        commands = tuple(self.cancel_commands(order, reason or outcome)) if state == st.CANCELLED else ()
        trail = ()
        if job.trail:
            trail, job.trail = tuple(job.trail), []
        return Checkpoint(order.order_no, stage, outcome, reason, now, state, target, order.status,
                          job.attempts, wake, order_codec.encode(order), new, tuple(events), commands, (), trail)

    @staticmethod
    def _status(order: Order, state: str, outcome: str, now: float, events: list[Event]) -> None:
        """The business status that goes with a runtime state (the common case changes nothing)."""
        if state == st.QUEUED and order.status == IN_FULFILMENT or state == st.PAUSED:
            return
        if order.status == states.PARKED and outcome != "park":
            move(order, IN_FULFILMENT, now, events)  # woken up: back at work first
        if state == st.PARKED:
            if outcome == "park":  # a retry backoff is no business state
                move(order, states.PARKED, now, events)
        elif state == st.CANCELLED:
            if order.status != states.WAIT_PAY:  # work was under way: it is asked to stop first
                move(order, states.CANCEL_REQUESTED, now, events)
            move(order, states.CANCELLED, now, events)
        else:
            move(order, STATUS_OF_STATE[state], now, events)

    async def _checkpoint(self, records: list[Checkpoint]) -> set[str]:
        """Write stage boundaries; while the store is away (a database restart) wait and write
        them again: the batch stays in flight, nothing moves on unrecorded, nothing is lost.
        Returns the orders another instance took over meanwhile (their records were refused)."""
        if not self.store.persistent:
            return set()
        delay = STORE_RETRY_FIRST
        while True:
            try:
                return await self.store.checkpoint(records) or set()
            except st.StoreUnavailable as exc:
                log.warning("store unavailable; checkpoint retried", extra={
                    "event": "store_unavailable", "count": len(records), "reason": str(exc)})
                await anyio.sleep(delay)  # infrastructure, not business time: the real clock
                delay = min(delay * 2, STORE_RETRY_MAX)

    def _end(self, job: Job, end: str, reason: str) -> None:
        order = job.order
        self._leave(order.order_no)
        self.finished[end] = self.finished.get(end, 0) + 1
        if end == routing.DONE:
            self.e2e.observe(max(0.0, self.clock.now() - job.started))
        if order.parent_no and end in (routing.DONE, routing.CANCELLED) and self._tg is not None:
            # Count down here: the last child settles the parent from what this instance saw. A
            # child of a parent split before a restart (or by another instance) asks the store.
            family = self._open_children.get(order.parent_no)
            if family is None:
                self._tg.start_soon(self._settle_parent, order.parent_no)
            else:
                family.left -= 1
                family.dispatched = family.dispatched or end == routing.DONE
                if family.left == 0:
                    del self._open_children[order.parent_no]
                    if not self._settling:
                        self._tg.start_soon(self._settle_families)
                    self._settling.append(family)
        for listener in self.listeners:
            listener(end, reason, order)
        self._changed.set()

    async def _settle_families(self) -> None:
        """Every child of these parents has ended, each seen ending here: a parent's end needs no
        read of the store, only its checkpoint. The document written is the one this instance
        split: while SPLIT nothing changes a parent's document (a cancel goes to its children; the
        reverse order it leaves on the parent is a record of its own). The parents whose last
        child ended in one turn of the loop are closed together, in one checkpoint."""
        families, self._settling = self._settling, []
        await self._close_parents([(f.parent, routing.DONE if f.dispatched else routing.CANCELLED)
                                   for f in families])

    async def _close_parents(self, parents: list[tuple[Job, str]]) -> None:
        """Split parents' ends: done if any child was dispatched, else cancelled."""
        await self._checkpoint([self._record(parent, "children", "settled",
                                             f"{len(parent.order.children)} children ended",
                                             END_STATES[end], end, None) for parent, end in parents])
        for parent, end in parents:
            for listener in self.listeners:
                listener(end, "children ended", parent.order)

    async def _settle_parent(self, parent_no: str) -> None:
        """A parent ends once every child has: done if any child was dispatched. With the store
        away it is settled at the next start (`_resume_stored` settles every waiting parent)."""
        try:
            await self._settle(parent_no)
        except st.StoreUnavailable:
            log.warning("split parent not settled: the store is away", extra={
                "event": "store_unavailable", "order_no": parent_no})

    async def _settle(self, parent_no: str) -> None:
        children = await self.store.children(parent_no)
        if not children or any(c.state not in st.TERMINAL_STATES for c in children):
            return
        parent = await self.store.get(parent_no)
        if parent is None or parent.state != st.SPLIT:
            return
        end = routing.DONE if any(c.state == st.DONE for c in children) else routing.CANCELLED
        order = order_codec.decode(parent.doc)
        await self._close_parents([(Job(order, self.route_of(order), parent.stage, 0, self.clock.now()), end)])

    # -- timers and restart ---------------------------------------------------

    async def _on_due(self, due: list[Due]) -> None:
        """A batch of due timers, DUE_CONCURRENCY at a time: each one mostly waits on the store (a
        read, then a compare-and-set), so one after another would fire no faster than one store
        round trip per timer, and a burst of pay deadlines would fall behind them."""
        items = iter(due)

        async def worker() -> None:
            for item in items:
                await self._fire_one(item)

        async with anyio.create_task_group() as tg:
            for _ in range(min(DUE_CONCURRENCY, len(due))):
                tg.start_soon(worker)

    async def _fire_one(self, item: Due) -> None:
        try:
            if item.purpose == "resume":
                await self._resume(item.order_no)
            elif item.purpose == "pay_deadline":
                await self.expire_payment(item.order_no)
        except st.StoreUnavailable:  # the store is away: the same wake-up, a little later
            await self.timers.schedule(item.purpose, item.order_no, self.clock.now() + STORE_RETRY_MAX)

    async def _resume(self, order_no: str) -> None:
        stored = await self.store.get(order_no)
        if stored is None or stored.state != st.PARKED or order_no in self.in_flight:
            return
        if stored.wake_at is not None and stored.wake_at > self.clock.now():
            await self.timers.schedule("resume", order_no, stored.wake_at)  # a stale, early timer
            return
        if await self.store.claim(order_no, st.PARKED, self.clock.now()):  # its wake-up may come to any instance
            await self._start(self._job(stored))

    def _job(self, stored: StoredOrder) -> Job:
        order = order_codec.decode(stored.doc)
        return Job(order, self.route_of(order), stored.stage, stored.attempts, order.created_at or self.clock.now())

    async def _resume_stored(self) -> None:
        """After a restart: queued orders go back to their stage, parked ones to the timers."""
        if not self.store.persistent:
            return
        resumed = 0
        timers: list[tuple[str, str, float]] = []
        for stored in await self.store.active():
            if stored.state == st.QUEUED:
                await self._start(self._job(stored))
                resumed += 1
            elif stored.state == st.PARKED:
                timers.append(("resume", stored.order_no, stored.wake_at or self.clock.now()))
                resumed += 1
            elif stored.state == st.WAIT_PAY:
                deadline = order_codec.decode(stored.doc).pay_deadline
                if deadline is not None:
                    timers.append(("pay_deadline", stored.order_no, deadline))
        await self.timers.schedule_many(timers)
        # A crash between a child's last checkpoint and its parent's settling
        # leaves the parent waiting: settle every waiting parent once at start.
        after = ""
        while parents := await self.store.in_state(st.SPLIT, 500, after):
            for parent in parents:
                await self._settle(parent.order_no)
            after = parents[-1].order_no
        if resumed:
            log.info("resumed stored orders", extra={"event": "resume", "count": resumed})

    async def _keep_alive(self) -> None:
        """Several instances on one database (DESIGN R-1.6): renew this instance's liveness, and
        take over the queued orders of instances whose liveness lapsed (they died)."""
        lease = self.store.lease
        while True:
            await anyio.sleep(lease / 3)
            try:
                await self.store.renew(self.clock.now())
                taken = await self.store.take_over(self.clock.now())
            except st.StoreUnavailable:
                continue
            if taken:
                log.warning("took over the orders of an instance that stopped", extra={
                    "event": "orders_taken_over", "count": len(taken)})
                await self._start_many([self._job(stored) for stored in taken])

    async def _sweeper(self) -> None:
        """Seed 001's 补漏 job, a safety net behind the timers: a wake-up or pay deadline the broker
        lost (dead-lettering is not confirmed) is found in the store and fired, so no order waits
        forever. Slow and in real time: the timers, not this, are the hot path."""
        while True:
            await anyio.sleep(self.settings.broker.sweep_interval)
            try:
                await self.sweep()
            except st.StoreUnavailable:
                pass  # next time

    async def sweep(self) -> int:
        """Fire every wake-up and pay deadline overdue by more than broker.sweep_grace, and restart
        this instance's stranded queued orders; returns how many of both."""
        fired = 0
        before = self.clock.now() - self.settings.broker.sweep_grace
        for stored in await self.store.overdue(before, 1000):
            if stored.order_no in self.in_flight:
                continue
            if stored.state == st.PARKED:
                await self._resume(stored.order_no)
            else:
                await self.expire_payment(stored.order_no)
            fired += 1
        if fired:
            log.warning("sweeper fired overdue timers", extra={"event": "timers_swept", "count": fired})
        return fired + await self._restart_stranded(before)

    async def _restart_stranded(self, before: float) -> int:
        """Queued orders of this instance, unwritten since `before`, that nothing here works on are
        started again from their last checkpoint, as after a restart. How one strands: a create
        committed while the store went away before answering (the caller saw 503), so the
        caller's retry found the order made and did not start it a second time."""
        if not self.store.persistent or not self._accepting:
            return 0  # (without checkpoints the store never learns an order moved on)
        restarted, after = 0, ""
        while rows := await self.store.stranded(before, 500, after):
            after = rows[-1].order_no
            for row in rows:
                if row.order_no in self.in_flight:
                    continue
                # Read again now that it is known not to be in flight: the list may predate the
                # checkpoint with which it left (its end written while the list was read).
                stored = await self.store.get(row.order_no)
                if (stored is None or stored.state != st.QUEUED or stored.updated_at >= before
                        or stored.order_no in self.in_flight):
                    continue
                await self._start(self._job(stored))
                restarted += 1
        if restarted:
            log.warning("sweeper restarted stranded orders", extra={
                "event": "orders_restarted", "count": restarted})
        return restarted

    async def refresh_state_counts(self) -> None:
        try:
            self.state_counts = await self.store.counts()
        except st.StoreUnavailable:
            pass  # a gauge: the last counts stand until the store is back

    # -- waiting (tests, benchmark, shutdown) ---------------------------------

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            self._changed = anyio.Event()
            await self._changed.wait()

    def total_finished(self) -> int:
        return sum(self.finished.values())


class ShuttingDown(Exception):
    """Intake refused: the daemon is stopping."""
