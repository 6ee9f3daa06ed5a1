"""A store that keeps everything in process memory.

For unit tests and the benchmark of the bare runtime: it keeps the store
contract, but nothing survives the process. With `checkpoints=False`
(the bare-runtime benchmark) the runtime does not even build checkpoint records.
"""
from __future__ import annotations

from typing import Callable

from ..ports.store import (ACTIVE_STATES, PARKED, QUEUED, REVERSE_CLOSED, WAIT_PAY, Checkpoint, Event, HistoryEntry,
                           NewOrder, OutboxRow, ReverseRecord, StoredOrder, outbox_entries)


class MemoryStore:
    def __init__(self, checkpoints: bool = True) -> None:
        self.persistent = checkpoints
        self.keep_history = checkpoints
        self._orders: dict[str, StoredOrder] = {}
        self._by_external: dict[tuple[str, str], str] = {}
        self._history: dict[str, list[HistoryEntry]] = {}
        self._events: dict[str, list[Event]] = {}
        self._sequences: dict[str, int] = {}
        self._created_at: dict[str, float] = {}
        self._children: dict[str, list[str]] = {}
        self._members: dict[str, str] = {}
        self._outbox: dict[int, OutboxRow] = {}  # unpublished rows only
        self._claims: dict[int, tuple[str, float]] = {}  # row id -> (holder, claimed at)
        self._outbox_ids = 0
        self._reverse: dict[str, ReverseRecord] = {}
        self._reverse_keys: dict[tuple[str, str], str] = {}
        self.holder, self.lease = "", 30.0
        self._owners: dict[str, str] = {}  # order -> its owner
        self._alive: dict[str, float] = {}  # holder -> alive until

    def own(self, holder: str, lease: float) -> None:
        self.holder, self.lease = holder, lease

    def _mine(self, order_no: str) -> bool:
        return not self.holder or self._owners.get(order_no, "") in ("", self.holder)

    def _hold(self, order_no: str, at: float = 0.0) -> None:
        self._owners[order_no] = self.holder

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def create(self, orders: list[NewOrder]) -> list[tuple[str, bool]]:
        return [self._create(order) for order in orders]

    def _create(self, order: NewOrder) -> tuple[str, bool]:
        existing = self._by_external.get((order.source, order.external_id))
        if existing is not None:
            return existing, False
        self._insert(order)
        self._log(HistoryEntry(order.order_no, "intake", "created", "", order.at))
        self._emit(order.events)
        self._queue(outbox_entries(order.order_no, order.at, order.events))
        return order.order_no, True

    def _insert(self, o: NewOrder) -> None:
        if (o.source, o.external_id) in self._by_external:
            return
        self._by_external[(o.source, o.external_id)] = o.order_no
        self._created_at[o.order_no] = o.at
        self._members[o.order_no] = o.member_id
        if o.parent_no is not None:
            self._children.setdefault(o.parent_no, []).append(o.order_no)
        self._orders[o.order_no] = StoredOrder(o.order_no, o.kind, o.state, o.stage, o.status, 0, o.wake_at,
                                               o.doc, o.parent_no, o.at)
        self._hold(o.order_no)

    async def checkpoint(self, records: list[Checkpoint]) -> set[str]:
        rejected = {r.order_no for r in records if not self._mine(r.order_no)}
        self._write([r for r in records if r.order_no not in rejected])
        return rejected

    def _write(self, records: list[Checkpoint]) -> None:
        for r in records:
            old = self._orders.get(r.order_no)
            if old is None:
                continue
            self._hold(r.order_no)
            self._orders[r.order_no] = old._replace(state=r.state, stage=r.stage, status=r.status,
                                                    attempts=r.attempts, wake_at=r.wake_at, doc=r.doc,
                                                    updated_at=r.at)
            for step in r.trail:
                self._log(HistoryEntry(r.order_no, *step))
            self._log(HistoryEntry(r.order_no, r.from_stage, r.outcome, r.reason, r.at))
            self._emit(r.events)
            self._queue(outbox_entries(r.order_no, r.at, r.events, r.commands))
            for reverse in r.reverse:
                self._reverse[reverse.reverse_no] = reverse
            for child in r.children:
                self._insert(child)
                self._log(HistoryEntry(child.order_no, r.from_stage, "created", f"child of {r.order_no}", r.at))

    def _log(self, entry: HistoryEntry) -> None:
        if self.keep_history:
            self._history.setdefault(entry.order_no, []).append(entry)

    async def checkpoint_if(self, record: Checkpoint, expect_state: str) -> bool:
        current = self._orders.get(record.order_no)
        if current is None or current.state != expect_state:
            return False
        self._write([record])  # a compare-and-set takes the order over
        return True

    async def claim(self, order_no: str, expect_state: str, now: float) -> bool:
        current = self._orders.get(order_no)
        if current is None or current.state != expect_state:
            return False
        self._hold(order_no)
        return True

    async def renew(self, now: float) -> None:
        self._alive[self.holder] = now + self.lease

    async def take_over(self, now: float, limit: int = 500) -> list[StoredOrder]:
        taken = sorted(no for no, owner in self._owners.items()
                       if owner not in ("", self.holder) and self._orders[no].state == QUEUED
                       and self._alive.get(owner, 0.0) < now)[:limit]
        for no in taken:
            self._hold(no)
        return [self._orders[no] for no in taken]

    def _emit(self, events: tuple[Event, ...]) -> None:
        if self.keep_history:
            for event in events:
                self._events.setdefault(event.order_no, []).append(event)

    async def events(self, order_no: str) -> list[Event]:
        return list(self._events.get(order_no, []))

    async def get(self, order_no: str) -> StoredOrder | None:
        return self._orders.get(order_no)

    async def find_external(self, source: str, external_id: str) -> str | None:
        return self._by_external.get((source, external_id))

    async def active(self) -> list[StoredOrder]:
        found = [o for o in self._orders.values()
                 if o.state in ACTIVE_STATES and (o.state != QUEUED or self._mine(o.order_no))]
        return sorted(found, key=lambda o: self._created_at[o.order_no])

    async def in_state(self, state: str, limit: int = 100, after: str = "") -> list[StoredOrder]:
        found = sorted(no for no, o in self._orders.items() if o.state == state and no > after)
        return [self._orders[no] for no in found[:limit]]

    async def children(self, parent_no: str) -> list[StoredOrder]:
        return [self._orders[no] for no in sorted(self._children.get(parent_no, ()))]

    async def search(self, *, member: str = "", statuses: tuple[str, ...] = (), state: str = "",
                     limit: int = 100, after: str = "") -> list[StoredOrder]:
        found = sorted(no for no, o in self._orders.items()
                       if no > after and (not member or self._members[no] == member)
                       and (not statuses or o.status in statuses) and (not state or o.state == state))
        return [self._orders[no] for no in found[:limit]]

    async def history(self, order_no: str) -> list[HistoryEntry]:
        return list(self._history.get(order_no, []))

    async def next_block(self, name: str, size: int) -> int:
        first = self._sequences.get(name, 1)
        self._sequences[name] = first + size
        return first

    def _queue(self, entries: list[tuple[str, str, str, bytes, float]]) -> None:
        if not self.keep_history:
            return  # the bare-runtime benchmark: nothing to publish
        for entry in entries:
            self._outbox_ids += 1
            self._outbox[self._outbox_ids] = OutboxRow(self._outbox_ids, *entry)

    def outbox_handoff(self, holder: str, now: Callable[[], float], notify: Callable[[], None]) -> None:
        return None  # the relay claims every row

    async def outbox_claim(self, holder: str, limit: int, lease: float, now: float) -> list[OutboxRow]:
        rows = []
        for row_id, row in self._outbox.items():  # insertion order: oldest first
            claim = self._claims.get(row_id)
            if claim is not None and claim[0] != holder and claim[1] > now - lease:
                continue
            self._claims[row_id] = (holder, now)
            rows.append(row)
            if len(rows) == limit:
                break
        return rows

    async def outbox_done(self, ids: list[int]) -> None:
        for row_id in ids:
            self._outbox.pop(row_id, None)
            self._claims.pop(row_id, None)

    async def outbox_pending(self) -> int:
        return len(self._outbox)

    async def overdue(self, before: float, limit: int = 500) -> list[StoredOrder]:
        found = [o for o in self._orders.values()
                 if o.state in (PARKED, WAIT_PAY) and o.wake_at is not None and o.wake_at < before]
        return sorted(found, key=lambda o: o.wake_at)[:limit]

    async def stranded(self, before: float, limit: int = 500, after: str = "") -> list[StoredOrder]:
        found = sorted(no for no, o in self._orders.items()
                       if o.state == QUEUED and o.updated_at < before and no > after and self._mine(no))
        return [self._orders[no] for no in found[:limit]]

    async def reverse_create(self, record: ReverseRecord) -> tuple[str, bool]:
        existing = self._reverse_keys.get((record.order_no, record.request_key))
        if existing is not None:
            return existing, False
        self._reverse_keys[(record.order_no, record.request_key)] = record.reverse_no
        self._reverse[record.reverse_no] = record
        return record.reverse_no, True

    async def reverse_get(self, reverse_no: str) -> ReverseRecord | None:
        return self._reverse.get(reverse_no)

    async def reverse_of(self, order_no: str) -> list[ReverseRecord]:
        return sorted((r for r in self._reverse.values() if r.order_no == order_no),
                      key=lambda r: (r.created_at, r.reverse_no))

    async def reverse_open(self, limit: int = 500, after: str = "") -> list[ReverseRecord]:
        found = sorted(no for no, r in self._reverse.items() if no > after and r.state not in REVERSE_CLOSED)
        return [self._reverse[no] for no in found[:limit]]

    async def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self._orders.values():
            counts[o.state] = counts.get(o.state, 0) + 1
        return counts
