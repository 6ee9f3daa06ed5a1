"""The durable store of orders and their progress (SQLite embedded, PostgreSQL in production).

Every stage boundary writes a `Checkpoint`; the store commits many of them in
one transaction (group commit) and `checkpoint()` returns once they are durable.
After a crash `active()` gives back every order that had not reached a
terminal state, at the stage it had last reached.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, NamedTuple, Protocol

import orjson

# Runtime states of an order (its business status is in the document).
QUEUED = "queued"      # waiting for or running `stage`
PARKED = "parked"      # resumes `stage` at wake_at (park or retry backoff)
WAIT_PAY = "wait_pay"  # created, waiting for payment before the first stage
DONE = "done"          # fulfilment handed over (dispatched)
CANCELLED = "cancelled"
MANUAL = "manual"      # exception centre: kept, visible, replayable
SPLIT = "split"        # parent waiting for its children
PAUSED = "paused"      # held by the reverse flow (a cancel or return is being decided)
TERMINAL_STATES = frozenset({DONE, CANCELLED, SPLIT})
ACTIVE_STATES = frozenset({QUEUED, PARKED, WAIT_PAY})
# Reverse requests in these states are settled; the others are resumed after a restart.
REVERSE_CLOSED = frozenset({"done", "refused"})


class StoreUnavailable(Exception):
    """The store cannot be reached now (a database restart, a network cut): try again. A write
    that raised it may or may not have committed; every write the pipeline retries is idempotent
    (the same state again) or keyed (outbox commands)."""


class Event(NamedTuple):
    """A business state change, written with the checkpoint that made it (the outbox)."""

    order_no: str
    from_status: str
    to_status: str
    at: float


class Command(NamedTuple):
    """A downstream command (refund, restock, intercept answer...) written with a checkpoint,
    in its transaction: the outbox. The relay delivers it at least once; `key` is its
    idempotency key and message id, so a second delivery has no second effect."""

    topic: str      # e.g. "fms.refund", "inventory.restock", "notify.requester"
    key: str
    payload: bytes  # a JSON object


class OutboxRow(NamedTuple):
    """An outbox entry waiting to be published: a Command, or a business Event as topic
    "order.<status>" with key "" (its message id is "ORDERNO:event:ID")."""

    id: int
    order_no: str
    topic: str
    key: str
    payload: bytes
    at: float


class OutboxHandoff:
    """Outbox rows a store committed, born claimed by the relay's `holder`, waiting for it in
    memory: the relay publishes them without claiming them first. Only an accelerator: every row
    is in the outbox too, so a row dropped here (more than `limit` waiting, a relay that gave up
    on it, a crash) is claimed the ordinary way once its claim's lease has lapsed."""

    def __init__(self, holder: str, now: Callable[[], float], notify: Callable[[], None],
                 limit: int = 50_000) -> None:
        self.holder, self.now, self.limit = holder, now, limit
        self.dropped = 0  # rows left to the lease because too many were waiting
        self._notify = notify
        self._rows: deque[OutboxRow] = deque()

    def __len__(self) -> int:
        return len(self._rows)

    def put(self, rows: list[OutboxRow]) -> None:
        """Committed rows (the store calls this after its commit)."""
        self._rows.extend(rows)
        for _ in range(len(self._rows) - self.limit):
            self._rows.popleft()
            self.dropped += 1
        self._notify()

    def take(self, n: int) -> list[OutboxRow]:
        rows = self._rows
        return [rows.popleft() for _ in range(min(n, len(rows)))]

    def give_back(self, rows: list[OutboxRow]) -> None:
        """Rows taken but not delivered (the broker is away): first in line again."""
        self._rows.extendleft(reversed(rows))


class ReverseRecord(NamedTuple):
    """A reverse order (cancel, return, rejection, exchange, reissue, pull-back): a record of
    its own, linked to the original by order number, unique per (order_no, request_key)."""

    reverse_no: str
    order_no: str
    request_key: str
    kind: str
    state: str
    created_at: float
    updated_at: float
    doc: bytes  # the request and what has been decided and done (JSON, oms_pipeline/reverse.py)


class NewOrder(NamedTuple):
    order_no: str
    source: str
    external_id: str
    kind: str
    state: str
    stage: str
    status: str
    at: float
    doc: bytes
    parent_no: str | None = None
    events: tuple[Event, ...] = ()
    member_id: str = ""
    wake_at: float | None = None  # waiting for payment: the pay deadline (the sweeper's safety net)


class Step(NamedTuple):
    """A stage boundary the order passed without a checkpoint of its own (the stage's
    `checkpoint = false`): its history row goes with the order's next checkpoint."""

    stage: str
    outcome: str
    reason: str
    at: float


class Checkpoint(NamedTuple):
    order_no: str
    from_stage: str  # the stage that just finished
    outcome: str
    reason: str
    at: float
    state: str  # the runtime state after it
    stage: str  # the stage to run next (or the terminal reached)
    status: str
    attempts: int
    wake_at: float | None
    doc: bytes
    children: tuple[NewOrder, ...] = ()
    events: tuple[Event, ...] = ()
    commands: tuple[Command, ...] = ()
    reverse: tuple[ReverseRecord, ...] = ()  # reverse orders written (inserted or updated) with it
    # Earlier boundaries passed since the last checkpoint, oldest first: Steps, or plain tuples of
    # a Step's fields (the pipeline's, which makes one per order and stage).
    trail: tuple[Step | tuple[str, str, str, float], ...] = ()


class StoredOrder(NamedTuple):
    order_no: str
    kind: str
    state: str
    stage: str
    status: str
    attempts: int
    wake_at: float | None
    doc: bytes
    parent_no: str | None
    updated_at: float


class HistoryEntry(NamedTuple):
    order_no: str
    stage: str
    outcome: str
    reason: str
    at: float


class Store(Protocol):
    """Ownership (several daemon instances on one database, DESIGN R-1.6): with `holder` set
    (`own()`), every order this store creates or checkpoints is owned by the holder, and the
    holder proves it is alive with `renew()` (one row per instance, valid `lease` seconds).
    `checkpoint()` writes nothing for an order another holder owns (it took the order over when
    our liveness lapsed: we were presumed dead) and returns those orders; a compare-and-set
    (`checkpoint_if`, `claim`) takes the order over. `take_over()` claims the queued orders of
    holders no longer alive. With no holder (the default), nothing is fenced."""

    persistent: bool  # False: the runtime skips checkpoints (benchmark of the bare runtime)
    holder: str
    lease: float

    def own(self, holder: str, lease: float) -> None: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, orders: list[NewOrder]) -> list[tuple[str, bool]]:
        """Store new orders, all in one transaction. For each: (order number, True),
        or on a duplicate (source, external_id) the existing number and False."""

    async def checkpoint(self, records: list[Checkpoint]) -> set[str]:
        """Durably record stage boundaries, all in one transaction with any child orders. Returns
        the order numbers not written because another holder owns them (normally none)."""

    async def checkpoint_if(self, record: Checkpoint, expect_state: str) -> bool:
        """Record one stage boundary only if the order is still in `expect_state`
        (compare-and-set: a payment racing its own timeout, a replay racing a
        cancel). True if it applied; False changes nothing."""

    async def get(self, order_no: str) -> StoredOrder | None: ...

    async def find_external(self, source: str, external_id: str) -> str | None:
        """The number of the order taken in for (source, external_id), if any."""

    async def active(self) -> list[StoredOrder]:
        """Every order in an active state (queued, parked, waiting for payment); queued ones only
        when this holder (or nobody) owns them: another instance's are its own business."""

    async def claim(self, order_no: str, expect_state: str, now: float) -> bool:
        """Take the order over if it is in `expect_state` (a parked order's timer fired here)."""

    async def renew(self, now: float) -> None:
        """This holder is alive until now + lease."""

    async def take_over(self, now: float, limit: int = 500) -> list[StoredOrder]:
        """Claim the queued orders of holders not alive at `now` (a dead instance's), by number."""

    async def in_state(self, state: str, limit: int = 100, after: str = "") -> list[StoredOrder]:
        """Orders in a runtime state, by order number, for paging."""

    async def search(self, *, member: str = "", statuses: tuple[str, ...] = (), state: str = "",
                     limit: int = 100, after: str = "") -> list[StoredOrder]:
        """Orders matching every given filter (empty: any), by order number after `after`."""

    async def history(self, order_no: str) -> list[HistoryEntry]: ...

    async def events(self, order_no: str) -> list[Event]:
        """The order's business state changes, oldest first."""

    async def children(self, parent_no: str) -> list[StoredOrder]: ...

    async def next_block(self, name: str, size: int) -> int:
        """Reserve `size` numbers of the named sequence; returns the first."""

    async def counts(self) -> dict[str, int]:
        """Number of orders per runtime state."""

    async def overdue(self, before: float, limit: int = 500) -> list[StoredOrder]:
        """Parked or payment-waiting orders whose wake_at (wake time, pay deadline) is before
        `before`, earliest first: what the sweeper re-fires when a timer was lost."""

    async def stranded(self, before: float, limit: int = 500, after: str = "") -> list[StoredOrder]:
        """Queued orders this holder (or nobody) owns, last written before `before`, by number
        after `after`: the sweeper restarts those its instance is not working on."""

    # -- the outbox ---------------------------------------------------------------

    async def outbox_claim(self, holder: str, limit: int, lease: float, now: float) -> list[OutboxRow]:
        """The oldest unpublished rows not claimed by another holder in the last `lease`
        seconds, claimed for `holder` (several relays share one outbox)."""

    async def outbox_done(self, ids: list[int]) -> None:
        """The rows were published: they leave the outbox (their events stay in the history)."""

    def outbox_handoff(self, holder: str, now: Callable[[], float],
                       notify: Callable[[], None]) -> "OutboxHandoff | None":
        """Optional: from now on the rows this store writes to the outbox are born claimed by
        `holder` at `now()` and, once committed, handed over in memory (no claim statement).
        None when the store does not (or already hands them to another relay): claims only."""

    async def outbox_pending(self) -> int:
        """Rows not yet published."""

    # -- reverse orders -----------------------------------------------------------

    async def reverse_create(self, record: ReverseRecord) -> tuple[str, bool]:
        """Store a new reverse order; on a duplicate (order_no, request_key) the existing
        one's number and False."""

    async def reverse_get(self, reverse_no: str) -> ReverseRecord | None: ...

    async def reverse_of(self, order_no: str) -> list[ReverseRecord]:
        """An order's reverse orders, oldest first."""

    async def reverse_open(self, limit: int = 500, after: str = "") -> list[ReverseRecord]:
        """Reverse orders not in REVERSE_CLOSED, by number after `after` (resumed at start)."""


# As stored: order_no, stage, outcome, reason, at, trail, events.
HistoryRow = tuple[str, str, str, str, float, "bytes | None", "bytes | None"]


def history_row(order_no: str, stage: str, outcome: str, reason: str, at: float,
                events: tuple[Event, ...] = ()) -> HistoryRow:
    """A history row of a boundary with no trail before it."""
    return order_no, stage, outcome, reason, at, None, _packed_events(order_no, events)


def history_rows(records: list[Checkpoint]) -> list[HistoryRow]:
    """One history row per checkpoint, its trail packed in it (a JSON array of [stage, outcome,
    reason, at]): an order that went through twelve stages without a checkpoint costs the store
    one row, not twelve. The status changes the checkpoint made go in the same row (a JSON array
    of [from, to, at]) rather than a row each in a table of their own. Shared by the store
    adapters so every one keeps the same history."""
    return [(r.order_no, r.from_stage, r.outcome, r.reason, r.at,
             orjson.dumps([tuple(step) for step in r.trail]) if r.trail else None,  # (orjson takes no NamedTuple)
             _packed_events(r.order_no, r.events))
            for r in records]


def _packed_events(order_no: str, events: tuple[Event, ...]) -> bytes | None:
    if not events:
        return None
    for e in events:
        if e.order_no != order_no:  # a checkpoint only ever moves its own order
            raise ValueError(f"event of order {e.order_no} in a history row of {order_no}")
    return orjson.dumps([(e.from_status, e.to_status, e.at) for e in events])


def history_entries(rows: list) -> list[HistoryEntry]:
    """Stored history rows (order_no, stage, outcome, reason, at, trail) back as entries, each
    row's trail before its own entry."""
    out = []
    for no, stage, outcome, reason, at, trail in rows:
        if trail:
            out.extend(HistoryEntry(no, *step) for step in orjson.loads(trail))
        out.append(HistoryEntry(no, stage, outcome, reason, at))
    return out


def stored_events(order_no: str, rows: list) -> list[Event]:
    """An order's status changes from the store's `order_events` query: rows (from, to, at, None)
    written one per change, or (None, None, None, packed) for a history row's packed changes."""
    out = []
    for from_status, to_status, at, packed in rows:
        if packed is None:
            out.append(Event(order_no, from_status, to_status, at))
        else:
            out.extend(Event(order_no, *change) for change in orjson.loads(packed))
    return out


def event_topic(status: str) -> str:
    return f"order.{status.lower()}"


def outbox_entries(order_no: str, at: float, events: tuple[Event, ...],
                   commands: tuple[Command, ...] = ()) -> list[tuple[str, str, str, bytes, float]]:
    """(order_no, topic, key, payload, at) rows for the outbox: each event, then each command.
    Shared by the store adapters so every one publishes the same messages."""
    rows = [(e.order_no, event_topic(e.to_status), "",
             orjson.dumps({"order_no": e.order_no, "from": e.from_status, "to": e.to_status, "at": e.at}), e.at)
            for e in events]
    rows.extend((order_no, c.topic, c.key, c.payload, at) for c in commands)
    return rows
