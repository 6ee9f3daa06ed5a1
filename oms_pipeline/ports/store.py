"""The durable store of orders and their progress (SQLite embedded, PostgreSQL in production).

Every stage boundary writes a `Checkpoint`; the store commits many of them in
one transaction (group commit) and `checkpoint()` returns once they are durable.
After a crash `active()` gives back every order that had not reached a
terminal state, at the stage it had last reached.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

# Runtime states of an order (its business status is in the document).
QUEUED = "queued"      # waiting for or running `stage`
PARKED = "parked"      # resumes `stage` at wake_at (park or retry backoff)
WAIT_PAY = "wait_pay"  # created, waiting for payment before the first stage
DONE = "done"          # fulfilment handed over (dispatched)
CANCELLED = "cancelled"
MANUAL = "manual"      # exception centre: kept, visible, replayable
SPLIT = "split"        # parent waiting for its children
TERMINAL_STATES = frozenset({DONE, CANCELLED, SPLIT})
ACTIVE_STATES = frozenset({QUEUED, PARKED, WAIT_PAY})


class Event(NamedTuple):
    """A business state change, written with the checkpoint that made it (the outbox)."""

    order_no: str
    from_status: str
    to_status: str
    at: float


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
    persistent: bool  # False: the runtime skips checkpoints (benchmark of the bare runtime)

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def create(self, orders: list[NewOrder]) -> list[tuple[str, bool]]:
        """Store new orders, all in one transaction. For each: (order number, True),
        or on a duplicate (source, external_id) the existing number and False."""

    async def checkpoint(self, records: list[Checkpoint]) -> None:
        """Durably record stage boundaries, all in one transaction with any child orders."""

    async def checkpoint_if(self, record: Checkpoint, expect_state: str) -> bool:
        """Record one stage boundary only if the order is still in `expect_state`
        (compare-and-set: a payment racing its own timeout, a replay racing a
        cancel). True if it applied; False changes nothing."""

    async def get(self, order_no: str) -> StoredOrder | None: ...

    async def find_external(self, source: str, external_id: str) -> str | None:
        """The number of the order taken in for (source, external_id), if any."""

    async def active(self) -> list[StoredOrder]:
        """Every order in an active state (queued, parked, waiting for payment)."""

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
