"""The outbox relay: delivers what checkpoints wrote to the outbox (DESIGN R-5).

A checkpoint writes its business events ("order.<status>") and its downstream
commands ("fms.refund", "inventory.restock", ...) to the outbox in its own
transaction. The relay, a service started with the pipeline, claims the oldest
unpublished rows in batches (`Store.outbox_claim`, under a holder id of its
own, so several instances share one outbox and a dead instance's claims lapse
after `relay.lease`), hands them to a `Publisher`, and marks done (deletes from
the outbox) only the rows the publisher confirmed. `relay.lanes` such loops run
side by side, each under a holder id of its own, so the claims keep their rows
apart and one lane publishes while another waits for its confirms.

Handoff (`Store.outbox_handoff`, PostgreSQL): rows written after the relay
started come to it in memory once committed, written already claimed by a
holder id of this process's own (`HOLDER@RANDOM`), so no claim statement runs
for them. A lane publishes those first; claim passes then run only every
CLAIM_EVERY seconds (back to back while they find rows) for what the handoff
does not carry: a dead relay's rows once their lease lapses, rows of this
instance's previous run (the same: after `relay.lease`), rows written before
the relay started. A handed row refused on its own is left to its lease, then
claimed and retried like any other; a batch that could not go out at all is
given back to the front of the handoff.

Publishers: `LocalPublisher` on the embedded default applies commands
in-process and hands events to in-process subscribers;
`adapters/rabbitmq_publisher.py` publishes to a topic exchange with
publisher confirms.

Delivery is at least once. A crash (or a lost confirm) between the publish and
`outbox_done` publishes the row again. Every message carries a message id for
de-duplication: a command's own key, or "ORDERNO:event:ID" for an event (an
outbox id is never given twice, on every store: SQLite since its migration
010, when an emptied outbox numbered its next row 1 again); a
command is idempotent by its key downstream, so a second delivery has no
second effect. No order between rows is promised: each command is complete on
its own.

Failures never drop a row:

* nothing in a batch could be delivered (the broker is down, the store
  failed): the relay waits, doubling from 0.5 s up to `relay.max_backoff`
  (with jitter), and claims again; the rows wait in the outbox.
* one row refused while others went through (a broker nack, a downstream
  outage in-process): that row waits its own backoff, the others flow on.
* a row that cannot be delivered as it is: an unroutable command (no queue
  bound to its topic), an unknown command topic, a payload the command
  rejects. It is logged at error level at every attempt, counted
  (`oms_outbox_publish_errors_total{kind="undeliverable"}`, and the gauge
  `oms_outbox_undeliverable`), and it STAYS in the outbox, retried on its own
  backoff capped at `relay.max_backoff`, while the rows behind it flow on.
  It goes out once its cause is fixed (bind the missing queue, deploy the
  handler); an operator may also delete it from the outbox by hand.

Idle cost: after a pass that published something the relay claims again at
once; an empty pass sleeps, doubling from 5 ms up to `relay.idle_sleep`.
`wake()` (called at every order end) cuts the sleep short.

Shutdown: `drain(timeout)` publishes what is claimable before the daemon
exits; what is left stays in the outbox for the next start.
"""
from __future__ import annotations

import logging
import random
import socket
import time
import uuid
from collections import Counter
from typing import Any, Awaitable, Callable, NamedTuple, Protocol

import anyio
import anyio.lowlevel
import orjson

from . import commands
from .clock import Clock
from .config import RelaySettings
from .outcome import PermanentError, TransientError
from .ports.store import OutboxRow, Store

log = logging.getLogger("oms.relay")

FIRST_IDLE = 0.005  # seconds: the first sleep after an empty pass, doubling to relay.idle_sleep
FIRST_BACKOFF = 0.5  # seconds: the first wait after a failed batch, doubling to relay.max_backoff
FIRST_ROW_BACKOFF = 1.0  # seconds: a refused row's first wait, doubling to relay.max_backoff
PENDING_REFRESH = 5.0  # seconds between counts of the outbox (a metric)
CLAIM_EVERY = 5.0  # seconds between claim passes that found nothing, when the store hands rows off:
# such a pass reads past every row in flight (all claimed at birth), and what it looks for is older than a lease

Subscriber = Callable[[OutboxRow], Awaitable[None]]


def is_event(row: OutboxRow) -> bool:
    """Business events carry no key of their own; commands always do."""
    return not row.key


def message_id(row: OutboxRow) -> str:
    """What consumers de-duplicate on: the command's key, or the event's outbox id."""
    return row.key or f"{row.order_no}:event:{row.id}"


def holder_id(instance_id: int) -> str:
    """One per daemon instance; a restarted instance takes back its own claims at once."""
    return f"{socket.gethostname()}:{instance_id}"


class Failed(NamedTuple):
    row: OutboxRow
    reason: str
    undeliverable: bool  # the row itself is refused: the same attempt fails until its cause is fixed


class PublisherUnavailable(Exception):
    """Nothing could be delivered (the transport is down): the whole batch waits."""


class Publisher(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def publish(self, rows: list[OutboxRow]) -> list[Failed]:
        """Deliver the rows; the ones not returned as failed are confirmed. Raises
        (e.g. PublisherUnavailable) when nothing could be delivered."""


# -- commands, shared by the in-process publisher and the RabbitMQ consumer -----------


class CommandRefused(Exception):
    """A command that can never be carried out as it is: unknown topic, malformed payload,
    or refused for good by the downstream system."""


async def execute(ports: Any, topic: str, key: str, body: bytes) -> None:
    """Carry out one command. Raises CommandRefused (retrying cannot help), TransientError
    or anything else unexpected (worth another try)."""
    if topic not in commands.TOPICS:
        raise CommandRefused(f"no downstream system takes topic {topic!r}")
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise CommandRefused(f"payload is not JSON: {exc}") from None
    try:
        await commands.apply(ports, topic, key, payload)
    except (PermanentError, KeyError, TypeError, ValueError) as exc:  # the same payload fails the same way
        raise CommandRefused(f"{type(exc).__name__}: {exc}") from exc


class LocalPublisher:
    """The embedded default: commands are applied in-process to the downstream ports; events
    go to in-process subscribers (none by default) and are then done with."""

    def __init__(self, ports: Any, *, subscribers: list[Subscriber] | None = None, concurrency: int = 32) -> None:
        self.ports = ports
        self.subscribers: list[Subscriber] = list(subscribers or [])
        self.concurrency = concurrency

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def publish(self, rows: list[OutboxRow]) -> list[Failed]:
        failed: list[Failed] = []
        pending = iter(rows)

        async def worker() -> None:
            for row in pending:
                problem = await (self._notify(row) if is_event(row) else self._apply(row))
                if problem is not None:
                    failed.append(problem)

        async with anyio.create_task_group() as tg:  # downstream calls may wait: several at once
            for _ in range(min(self.concurrency, len(rows))):
                tg.start_soon(worker)
        return failed

    async def _apply(self, row: OutboxRow) -> Failed | None:
        try:
            await execute(self.ports, row.topic, row.key, row.payload)
        except CommandRefused as exc:
            return Failed(row, str(exc), True)
        except TransientError as exc:
            return Failed(row, str(exc), False)
        except Exception as exc:  # noqa: BLE001 - unexpected: kept and tried again, never lost
            return Failed(row, repr(exc), False)
        return None

    async def _notify(self, row: OutboxRow) -> Failed | None:
        for subscriber in self.subscribers:
            try:
                await subscriber(row)
            except Exception as exc:  # noqa: BLE001 - the event is kept; every subscriber sees it again
                return Failed(row, f"subscriber {subscriber!r}: {exc!r}", False)
        return None


# -- the relay --------------------------------------------------------------------------


class RelayStats:
    """Counted in plain integers; `metrics.RelayCollector` reads them at scrape time."""

    def __init__(self) -> None:
        self.published: Counter[str] = Counter()  # rows confirmed, by topic
        self.errors: Counter[str] = Counter()  # rows not delivered, by kind: unavailable, transient, undeliverable
        self.pending = 0  # unpublished rows in the outbox (refreshed every few seconds)
        self.undeliverable = 0  # rows this relay holds back as undeliverable now


class _Backoff(NamedTuple):
    attempts: int
    next_at: float  # monotonic seconds


IDLE, BUSY, FAILED = "idle", "busy", "failed"


class Relay:
    """Runs `settings.lanes` claim-publish-mark loops side by side, each under its own holder id
    ("HOLDER#N"): the store's claims keep their rows apart, so one lane publishes while another
    waits for its confirms or its marks."""

    def __init__(self, store: Store, publisher: Publisher, clock: Clock, settings: RelaySettings,
                 holder: str) -> None:
        self.store = store
        self.publisher = publisher
        self.clock = clock
        self.settings = settings
        self.stats = RelayStats()
        n = settings.lanes
        self.lanes = [_Lane(self, holder if n == 1 else f"{holder}#{i}") for i in range(n)]
        self._wake = anyio.Event()
        self._counted_at = float("-inf")
        # Rows written from now on come in memory if the store hands them off, claimed at birth by
        # a holder of this process's own: no lane claims them (a lane's holder differs) until that
        # claim lapses after `lease`, as a dead process's would.
        self.handoff = store.outbox_handoff(f"{holder}@{uuid.uuid4().hex[:12]}", clock.now, self.wake)
        self._claim_after = 0.0  # monotonic: with a handoff, the next claim pass (leftovers, lapsed claims)

    async def run(self) -> None:
        """Until cancelled. Never raises: a failure is logged and waited out."""
        async with anyio.create_task_group() as tg:
            for lane in self.lanes:
                tg.start_soon(lane.run)
            while True:
                await self._count_pending()
                await anyio.sleep(PENDING_REFRESH)

    async def drain(self, timeout: float) -> bool:
        """Publish everything claimable (shutdown). True if nothing publishable was left."""
        emptied: list[bool] = []

        async def lane_drain(lane: _Lane) -> None:
            emptied.append(await lane.drain())

        with anyio.move_on_after(timeout):
            async with anyio.create_task_group() as tg:
                for lane in self.lanes:
                    tg.start_soon(lane_drain, lane)
        await self._count_pending(force=True)
        if self.stats.pending:
            log.warning("outbox not empty at shutdown: the rest goes out after the next start",
                        extra={"event": "outbox_left", "count": self.stats.pending})
        return len(emptied) == len(self.lanes)

    def wake(self) -> None:
        self._wake.set()

    def on_end(self, end: str, reason: str, order: Any) -> None:
        """A pipeline listener: an order's end wrote events, so look now rather than after the sleep."""
        self._wake.set()

    async def sleep(self, seconds: float) -> None:
        """Until `seconds` pass or `wake()` is called."""
        wake = self._wake
        with anyio.move_on_after(seconds):
            await wake.wait()
        if wake is self._wake and wake.is_set():
            self._wake = anyio.Event()

    def claim_due(self) -> bool:
        """With a handoff, claims only look for what it does not carry (a dead relay's rows, rows
        left over or dropped): at most every CLAIM_EVERY seconds, back to back while they find rows."""
        return self.handoff is None or time.monotonic() >= self._claim_after

    def claimed(self, found: bool) -> None:
        self._claim_after = time.monotonic() + (0.0 if found else CLAIM_EVERY)

    def count_undeliverable(self) -> None:
        self.stats.undeliverable = sum(lane.undeliverable() for lane in self.lanes)

    async def _count_pending(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._counted_at < PENDING_REFRESH:
            return
        self._counted_at = time.monotonic()
        try:
            self.stats.pending = await self.store.outbox_pending()
        except Exception as exc:  # noqa: BLE001 - a metric: never stop relaying for it
            log.warning("outbox relay: could not count pending rows: %r", exc)


class _Lane:
    """One claim-publish-mark loop under its own holder id."""

    def __init__(self, relay: Relay, holder: str) -> None:
        self.relay = relay
        self.holder = holder
        self._held: dict[int, tuple[_Backoff, bool]] = {}  # refused rows -> (their backoff, undeliverable)
        self._failures = 0  # failed passes in a row
        self._lock = anyio.Lock()  # one pass at a time: the run loop and drain share the holder id

    def undeliverable(self) -> int:
        return sum(1 for _, undeliverable in self._held.values() if undeliverable)

    async def run(self) -> None:
        idle = FIRST_IDLE
        while True:
            async with self._lock:
                outcome = await self._pass()
            if outcome == BUSY:
                idle = FIRST_IDLE
                await anyio.lowlevel.checkpoint()
            elif outcome == FAILED:
                await anyio.sleep(self._batch_backoff())
            else:
                await self.relay.sleep(idle)
                idle = min(idle * 2, self.relay.settings.idle_sleep)

    async def drain(self) -> bool:
        """Passes until one finds nothing publishable (failed ones wait their backoff)."""
        async with self._lock:
            while (outcome := await self._pass(claim=True)) != IDLE:
                if outcome == FAILED:
                    await anyio.sleep(self._batch_backoff())
        return True

    async def _pass(self, claim: bool = False) -> str:
        """Publish what the store handed over, else claim, publish, mark done. IDLE: nothing to
        publish; BUSY: published something; FAILED: nothing could be published, the lane waits."""
        relay = self.relay
        if relay.handoff is not None:
            if handed := relay.handoff.take(relay.settings.batch):
                return await self._publish_handed(handed)
            if not (claim or relay.claim_due()):
                return IDLE
        outcome = await self._claim_pass()
        relay.claimed(outcome == BUSY)
        return outcome

    async def _publish_handed(self, rows: list[OutboxRow]) -> str:
        """Rows the store handed over, already claimed for this process. A row refused on its own
        is left to its claim's lease (then claimed and retried with a backoff like any other); a
        batch that could not go out at all is given back, first in line after the lane's wait."""
        relay = self.relay
        try:
            done, failed = await self._deliver(rows)
        except Exception as exc:  # noqa: BLE001 - as in a claim pass
            relay.handoff.give_back(rows)
            return self._failed(exc)
        transient = [f for f in failed if not f.undeliverable]
        if transient and not done:  # nothing went out (the broker or a downstream system is away)
            relay.handoff.give_back([f.row for f in transient])
            self._leave_to_lease([f for f in failed if f.undeliverable])
            return self._nothing_went_out(transient)
        self._leave_to_lease(failed)
        self._account(rows, done, [])
        self._failures = 0
        return BUSY if done else IDLE

    def _leave_to_lease(self, failed: list[Failed]) -> None:
        """Handed rows refused on their own: logged and counted, then claimed once their lease
        lapses and retried with a backoff like any other."""
        for failure in failed:
            self._report(failure, 1, self.relay.settings.lease)

    async def _deliver(self, rows: list[OutboxRow]) -> tuple[list[int], list[Failed]]:
        """Publish; what was confirmed leaves the outbox. Returns its ids and the refused rows."""
        failed = await self.relay.publisher.publish(rows)
        refused = {f.row.id for f in failed}
        done = [row.id for row in rows if row.id not in refused]
        if done:
            await self.relay.store.outbox_done(done)
        return done, failed

    def _failed(self, exc: Exception) -> str:
        self._failures += 1
        self.relay.stats.errors["unavailable"] += 1
        log.warning("outbox relay: batch not delivered, rows stay for a retry: %r", exc,
                    extra={"event": "outbox_retry", "failures": self._failures})
        return FAILED

    async def _claim_pass(self) -> str:
        relay = self.relay
        try:
            rows = await relay.store.outbox_claim(self.holder, relay.settings.batch + len(self._held),
                                                  relay.settings.lease, relay.clock.now())
            ready = self._ready(rows)
            if not ready:
                return IDLE
            done, failed = await self._deliver(ready)
        except Exception as exc:  # noqa: BLE001 - the service must outlive a broker or database outage
            return self._failed(exc)
        if not done and any(not f.undeliverable for f in failed):
            return self._nothing_went_out(failed)
        self._account(ready, done, failed)
        self._failures = 0
        return BUSY if done else IDLE

    def _ready(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """The claimed rows not waiting out their own backoff; forgets rows no longer claimed
        (published by another instance after our lease lapsed)."""
        now = time.monotonic()
        claimed = {row.id for row in rows}
        self._held = {i: held for i, held in self._held.items() if i in claimed}
        self.relay.count_undeliverable()
        return [row for row in rows if row.id not in self._held or self._held[row.id][0].next_at <= now]

    def _account(self, ready: list[OutboxRow], done: list[int], failed: list[Failed]) -> None:
        published = self.relay.stats.published
        done_ids = set(done)
        for row in ready:
            if row.id in done_ids:
                published[row.topic] += 1
                self._held.pop(row.id, None)
        for failure in failed:
            self._hold(failure)
        self.relay.count_undeliverable()

    def _nothing_went_out(self, failed: list[Failed]) -> str:
        """Every row of the batch failed and not all for reasons of their own: the lane waits as a
        whole rather than holding each row back (a broker or downstream outage: new rows would fail
        the same way, and holding them all would grow without bound)."""
        self._failures += 1
        self.relay.stats.errors["transient"] += sum(1 for f in failed if not f.undeliverable)
        for failure in failed:
            if failure.undeliverable:
                self._hold(failure)
        self.relay.count_undeliverable()
        first = next(f for f in failed if not f.undeliverable)
        log.warning("outbox relay: nothing in the batch went out, rows stay for a retry: %s", first.reason,
                    extra={"event": "outbox_retry", "failures": self._failures, "rows": len(failed),
                           "topic": first.row.topic, "order_no": first.row.order_no})
        return FAILED

    def _hold(self, failure: Failed) -> None:
        row = failure.row
        previous = self._held.get(row.id)
        attempts = previous[0].attempts + 1 if previous else 1
        delay = min(FIRST_ROW_BACKOFF * 2 ** (attempts - 1), self.relay.settings.max_backoff)
        self._held[row.id] = (_Backoff(attempts, time.monotonic() + delay), failure.undeliverable)
        self._report(failure, attempts, delay)

    def _report(self, failure: Failed, attempts: int, delay: float) -> None:
        row = failure.row
        kind = "undeliverable" if failure.undeliverable else "transient"
        self.relay.stats.errors[kind] += 1
        extra = {"event": f"outbox_{kind}", "order_no": row.order_no, "topic": row.topic,
                 "message_id": message_id(row), "attempts": attempts, "retry_in": delay}
        if failure.undeliverable:
            log.error("outbox row cannot be delivered; it stays in the outbox and is retried: %s",
                      failure.reason, extra=extra)
        else:
            log.warning("outbox row not delivered, retried later: %s", failure.reason, extra=extra)

    def _batch_backoff(self) -> float:
        delay = min(FIRST_BACKOFF * 2 ** max(0, self._failures - 1), self.relay.settings.max_backoff)
        return delay * random.uniform(0.8, 1.0)  # instances that failed together do not retry together
