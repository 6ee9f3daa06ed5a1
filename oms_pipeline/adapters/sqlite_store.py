"""The embedded durable store: one SQLite file in WAL mode.

All writes are group-committed: whatever stage boundaries, new orders and
sequence reservations were asked for while the event loop ran its other work
are written in one transaction at the next turn of the loop, and each caller's
future resolves only after that commit. A thousand stage boundaries cost one
commit, not a thousand.

Where the writes run (`store.writer`): in a writer process of their own by
default (adapters/sqlite_writer.py): the loop pickles each batch into a
memory file the writer reads and gathers the next one while the writer commits, so SQLite's CPU is spent on
the second core. With `writer = "loop"` they run on the event-loop thread, as
one call between two turns of the loop. Never in a thread: a writer thread
would have to win the GIL back from the busy loop after every row (measured:
~250 rows/s beside a busy Python thread, ~150,000 rows/s without one;
bench/RESULTS.md). Reads (indexed look-ups) run on the loop's own connection
either way; WAL lets them read beside the writer.

With `synchronous=NORMAL` a commit survives the process being killed (the
crash the pipeline is built for); `full` also survives power loss.
"""
from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import orjson

from .. import sqlfiles
from .sqlite_writer import REGIONS, Writer
from ..ports.store import (Checkpoint, Event, HistoryEntry, NewOrder, OutboxRow, ReverseRecord, StoredOrder,
                           history_entries, history_row, history_rows, outbox_entries, stored_events)

Q = sqlfiles.queries("sqlite")
# Rows the writer process takes per transaction. Smaller than everything pending, on purpose: the
# stages waiting on the first part of a burst of checkpoints go on while the rest is committed,
# so the loop and the writer work at the same time instead of taking turns.
WRITER_ROWS = 500
# Batches handed to the writer at once (at most sqlite_writer.REGIONS): it starts the next as soon
# as one commits, without waiting for the loop to send it.
WRITER_DEPTH = min(2, REGIONS)


def connect(path: str, synchronous: str = "normal") -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
    conn.execute("PRAGMA busy_timeout=30000")
    # Order numbers are random by design, so checkpoints touch pages all over
    # the table: a page cache that holds the in-flight working set matters
    # (SQLite's default is 2 MB).
    conn.execute("PRAGMA cache_size=-65536")  # 64 MiB
    return conn


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the numbered migrations not yet applied; returns their names."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                 "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)")
    done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    applied = []
    for version, name, sql in sqlfiles.migrations("sqlite"):
        if version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, sql.split(";")):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, name, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(f"{version:03d}_{name}")
    return applied


def transaction(conn: sqlite3.Connection, ops: list[tuple[Callable, Any]]) -> list[Any]:
    """Apply writes in one transaction; their results, or the first error after a rollback."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        results = [op(conn, arg) for op, arg in ops]
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return results


class _Request:
    __slots__ = ("op", "arg", "future")

    def __init__(self, op: str, arg: Any, future: asyncio.Future) -> None:
        self.op, self.arg, self.future = op, arg, future


class SqliteStore:
    persistent = True

    def __init__(self, path: str, *, max_batch: int = 5000, synchronous: str = "normal",
                 writer: str = "process") -> None:
        if writer not in ("process", "loop"):
            raise ValueError(f"writer must be 'process' or 'loop', not {writer!r}")
        self.path = path
        self.max_batch = max_batch
        self.synchronous = synchronous
        self._conn: sqlite3.Connection | None = None
        self._pending: list[_Request] = []
        self._flush_scheduled = False
        self._writer = Writer(path, synchronous, self._written) if writer == "process" else None
        self._in_hand: deque[list[_Request]] = deque()  # batches the writer process has, oldest first
        self.commits = 0  # transactions committed (group-commit efficiency = requests / commits)
        self.holder, self.lease = "", 30.0

    def own(self, holder: str, lease: float) -> None:
        self.holder, self.lease = holder, lease

    async def open(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._conn = connect(self.path, self.synchronous)
        migrate(self._conn)
        if self._writer is not None:
            await self._writer.start()

    async def close(self) -> None:
        """Write whatever is pending, then stop the writer and close."""
        if self._writer is not None:
            while self._pending or self._writer.in_flight:
                self._flush()
                await asyncio.sleep(0.002)
            await self._writer.stop()
        elif self._pending:
            self._flush()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- writes: group commit -------------------------------------------------

    async def create(self, orders: list[NewOrder]) -> list[tuple[str, bool]]:
        return await self._write("create", (orders, self.holder))

    async def checkpoint(self, records: list[Checkpoint]) -> set[str]:
        return await self._write("checkpoint", (records, self.holder))

    async def next_block(self, name: str, size: int) -> int:
        return await self._write("next_block", (name, size))

    async def checkpoint_if(self, record: Checkpoint, expect_state: str) -> bool:
        return await self._write("checkpoint_if", (record, expect_state, self.holder))

    async def claim(self, order_no: str, expect_state: str, now: float) -> bool:
        return await self._write("claim_order", (self.holder, order_no, expect_state))

    async def renew(self, now: float) -> None:
        await self._write("renew", (self.holder, now + self.lease))

    async def take_over(self, now: float, limit: int = 500) -> list[StoredOrder]:
        return [StoredOrder(*r) for r in await self._write("take_over", (self.holder, now, limit))]

    def outbox_handoff(self, holder: str, now: Callable[[], float], notify: Callable[[], None]) -> None:
        return None  # the relay claims every row

    async def outbox_claim(self, holder: str, limit: int, lease: float, now: float) -> list[OutboxRow]:
        rows = await self._write("outbox_claim", (holder, now, now - lease, limit))
        return sorted(OutboxRow(*r) for r in rows)

    async def outbox_done(self, ids: list[int]) -> None:
        await self._write("outbox_done", ids)

    async def reverse_create(self, record: ReverseRecord) -> tuple[str, bool]:
        return await self._write("reverse_create", record)

    async def _write(self, op: str, arg: Any) -> Any:
        if self._conn is None:
            raise RuntimeError("the store is not open")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(_Request(op, arg, future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)  # after the work already due in this turn of the loop
        return await future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._writer is not None:
            while self._pending and self._writer.in_flight < WRITER_DEPTH:  # else: when the writer answers
                n = _first_rows(self._pending, WRITER_ROWS)
                batch, self._pending = self._pending[:n], self._pending[n:]
                self._in_hand.append(batch)
                self._writer.send([(r.op, r.arg) for r in batch])
            return
        while self._pending:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            try:
                results = transaction(self._conn, [(OPERATIONS[r.op], r.arg) for r in batch])
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
                _settle(batch, None, exc)
            else:
                self.commits += 1
                _settle(batch, results, None)

    def _written(self, results: list | None, error: BaseException | None) -> None:
        """The writer process answered for the batch in hand; the next one goes at once."""
        batch = self._in_hand.popleft()
        if error is None:
            self.commits += 1
        _settle(batch, results, error)
        if self._pending:
            self._flush()

    # -- reads (indexed look-ups: microseconds, on the loop too) --------------

    async def _rows(self, sql: str, *args: Any) -> list[tuple]:
        if self._conn is None:
            raise RuntimeError("the store is not open")
        return self._conn.execute(sql, args).fetchall()

    async def get(self, order_no: str) -> StoredOrder | None:
        rows = await self._rows(Q["get_order"], order_no)
        return StoredOrder(*rows[0]) if rows else None

    async def find_external(self, source: str, external_id: str) -> str | None:
        rows = await self._rows(Q["order_by_external"], source, external_id)
        return rows[0][0] if rows else None

    async def active(self) -> list[StoredOrder]:
        return [StoredOrder(*r) for r in await self._rows(Q["active_orders"], self.holder)]

    async def in_state(self, state: str, limit: int = 100, after: str = "") -> list[StoredOrder]:
        return [StoredOrder(*r) for r in await self._rows(Q["orders_in_state"], state, after, limit)]

    async def children(self, parent_no: str) -> list[StoredOrder]:
        return [StoredOrder(*r) for r in await self._rows(Q["children"], parent_no)]

    async def search(self, *, member: str = "", statuses: tuple[str, ...] = (), state: str = "",
                     limit: int = 100, after: str = "") -> list[StoredOrder]:
        rows = await self._rows(Q["search_orders"], member, orjson.dumps(list(statuses)).decode(), state, after, limit)
        return [StoredOrder(*r) for r in rows]

    async def history(self, order_no: str) -> list[HistoryEntry]:
        return history_entries(await self._rows(Q["order_history"], order_no))

    async def events(self, order_no: str) -> list[Event]:
        return stored_events(order_no, await self._rows(Q["order_events"], order_no))

    async def counts(self) -> dict[str, int]:
        return dict(await self._rows(Q["counts"]))

    async def outbox_pending(self) -> int:
        return (await self._rows(Q["outbox_pending"]))[0][0]

    async def overdue(self, before: float, limit: int = 500) -> list[StoredOrder]:
        return [StoredOrder(*r) for r in await self._rows(Q["overdue"], before, limit)]

    async def stranded(self, before: float, limit: int = 500, after: str = "") -> list[StoredOrder]:
        return [StoredOrder(*r) for r in await self._rows(Q["stranded"], self.holder, before, after, limit)]

    async def reverse_get(self, reverse_no: str) -> ReverseRecord | None:
        rows = await self._rows(Q["reverse_get"], reverse_no)
        return ReverseRecord(*rows[0]) if rows else None

    async def reverse_of(self, order_no: str) -> list[ReverseRecord]:
        return [ReverseRecord(*r) for r in await self._rows(Q["reverse_of"], order_no)]

    async def reverse_open(self, limit: int = 500, after: str = "") -> list[ReverseRecord]:
        return [ReverseRecord(*r) for r in await self._rows(Q["reverse_open"], after, limit)]


def _first_rows(requests: list[_Request], rows: int) -> int:
    """How many of the requests, from the first, make up about `rows` rows (at least one)."""
    total = 0
    for i, request in enumerate(requests):
        total += len(request.arg[0]) if request.op in ("create", "checkpoint") else 1
        if total >= rows:
            return i + 1
    return len(requests)


def _settle(requests: list[_Request], results: list | None, error: BaseException | None) -> None:
    for i, request in enumerate(requests):
        if request.future.done():
            continue
        if error is None:
            request.future.set_result(results[i])
        else:
            request.future.set_exception(error)


def _insert_row(conn: sqlite3.Connection, o: NewOrder, holder: str) -> bool:
    cur = conn.execute(Q["create_order"], (o.order_no, o.source, o.external_id, o.kind, o.state, o.stage,
                                           o.status, o.wake_at, o.parent_no, o.doc, o.at, o.at, o.member_id,
                                           holder))
    return cur.rowcount == 1


def _create(conn: sqlite3.Connection, arg: tuple[list[NewOrder], str]) -> list[tuple[str, bool]]:
    orders, holder = arg
    return [_create_one(conn, order, holder) for order in orders]


def _create_one(conn: sqlite3.Connection, order: NewOrder, holder: str) -> tuple[str, bool]:
    if _insert_row(conn, order, holder):
        conn.execute(Q["history"], history_row(order.order_no, "intake", "created", "", order.at, order.events))
        conn.executemany(Q["add_outbox"], outbox_entries(order.order_no, order.at, order.events))
        return order.order_no, True
    return conn.execute(Q["order_no_by_external"], (order.source, order.external_id)).fetchone()[0], False


def _checkpoint(conn: sqlite3.Connection, arg: tuple[list[Checkpoint], str]) -> set[str]:
    records, holder = arg
    rejected: set[str] = set()
    if holder:
        numbers = orjson.dumps([r.order_no for r in records]).decode()
        rejected = {row[0] for row in conn.execute(Q["owned_elsewhere"], (numbers, holder))}
        records = [r for r in records if r.order_no not in rejected]
    conn.executemany(Q["checkpoint"], [(r.state, r.stage, r.status, r.attempts, r.wake_at, r.doc,
                                        r.at, holder, r.order_no) for r in records])
    conn.executemany(Q["history"], history_rows(records))
    _side_rows(conn, records)
    for r in records:
        for child in r.children:
            if _insert_row(conn, child, holder):
                conn.execute(Q["history"], history_row(child.order_no, r.from_stage, "created",
                                                       f"child of {r.order_no}", r.at))
    return rejected


def _checkpoint_if(conn: sqlite3.Connection, arg: tuple[Checkpoint, str, str]) -> bool:
    r, expect_state, holder = arg
    cur = conn.execute(Q["checkpoint_if"], (r.state, r.stage, r.status, r.attempts, r.wake_at, r.doc, r.at,
                                            holder, r.order_no, expect_state))
    if cur.rowcount != 1:
        return False
    conn.executemany(Q["history"], history_rows([r]))
    _side_rows(conn, [r])
    return True


def _side_rows(conn: sqlite3.Connection, records: list[Checkpoint]) -> None:
    """The outbox rows and reverse orders written with checkpoints."""
    conn.executemany(Q["add_outbox"], [row for r in records
                                       for row in outbox_entries(r.order_no, r.at, r.events, r.commands)])
    conn.executemany(Q["reverse_upsert"], [reverse for r in records for reverse in r.reverse])


def _claim_order(conn: sqlite3.Connection, arg: tuple[str, str, str]) -> bool:
    return conn.execute(Q["claim"], arg).rowcount == 1


def _renew(conn: sqlite3.Connection, arg: tuple[str, float]) -> None:
    conn.execute(Q["renew"], arg)


def _take_over(conn: sqlite3.Connection, arg: tuple[str, float, int]) -> list[tuple]:
    return conn.execute(Q["take_over"], arg).fetchall()


def _claim(conn: sqlite3.Connection, arg: tuple[str, float, float, int]) -> list[tuple]:
    return conn.execute(Q["outbox_claim"], arg).fetchall()


def _outbox_done(conn: sqlite3.Connection, ids: list[int]) -> None:
    conn.executemany(Q["outbox_done"], [(row_id,) for row_id in ids])


def _reverse_create(conn: sqlite3.Connection, record: ReverseRecord) -> tuple[str, bool]:
    if conn.execute(Q["reverse_insert"], record).rowcount == 1:
        return record.reverse_no, True
    return conn.execute(Q["reverse_by_key"], (record.order_no, record.request_key)).fetchone()[0], False


def _next_block(conn: sqlite3.Connection, arg: tuple[str, int]) -> int:
    name, size = arg
    after = conn.execute(Q["next_block"], (name, size + 1)).fetchone()[0]
    return after - size


OPERATIONS: dict[str, Callable] = {  # the writes, by the name a batch names them with
    "create": _create, "checkpoint": _checkpoint, "next_block": _next_block, "checkpoint_if": _checkpoint_if,
    "claim_order": _claim_order, "renew": _renew, "take_over": _take_over, "outbox_claim": _claim,
    "outbox_done": _outbox_done, "reverse_create": _reverse_create,
}
