"""A store that keeps everything in process memory.

For unit tests and the benchmark of the bare runtime: it keeps the store
contract, but nothing survives the process. With `checkpoints=False`
(the bare-runtime benchmark) the runtime does not even build checkpoint records.
"""
from __future__ import annotations

from ..ports.store import ACTIVE_STATES, Checkpoint, Event, HistoryEntry, NewOrder, StoredOrder


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
        return order.order_no, True

    def _insert(self, o: NewOrder) -> None:
        if (o.source, o.external_id) in self._by_external:
            return
        self._by_external[(o.source, o.external_id)] = o.order_no
        self._created_at[o.order_no] = o.at
        self._members[o.order_no] = o.member_id
        if o.parent_no is not None:
            self._children.setdefault(o.parent_no, []).append(o.order_no)
        self._orders[o.order_no] = StoredOrder(o.order_no, o.kind, o.state, o.stage, o.status, 0, None,
                                               o.doc, o.parent_no, o.at)

    async def checkpoint(self, records: list[Checkpoint]) -> None:
        for r in records:
            old = self._orders.get(r.order_no)
            if old is None:
                continue
            self._orders[r.order_no] = old._replace(state=r.state, stage=r.stage, status=r.status,
                                                    attempts=r.attempts, wake_at=r.wake_at, doc=r.doc,
                                                    updated_at=r.at)
            self._log(HistoryEntry(r.order_no, r.from_stage, r.outcome, r.reason, r.at))
            self._emit(r.events)
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
        await self.checkpoint([record])
        return True

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
        found = [o for o in self._orders.values() if o.state in ACTIVE_STATES]
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

    async def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for o in self._orders.values():
            counts[o.state] = counts.get(o.state, 0) + 1
        return counts
