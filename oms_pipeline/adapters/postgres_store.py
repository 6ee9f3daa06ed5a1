"""The production durable store: PostgreSQL through an asyncpg pool.

Writes are group-committed as in the SQLite adapter: callers append requests,
and a flush takes everything pending and writes it in ONE transaction with
set-based statements (one UPDATE ... FROM unnest for all checkpoints, one
binary COPY for all history rows, their status changes packed in them, one
for the outbox), so a thousand stage boundaries cost one commit and a handful
of statements.
Compare-and-set checkpoints (payments, pay deadlines, replays) join the same
commit as one conditional UPDATE ... FROM unnest, and the `get`s asked in one
turn of the loop go as one query: a burst of pay deadlines falling due costs
a few round trips per batch, not a transaction per order (a cancel burst went
from ~500 to ~1,100 orders/s, bench/RESULTS.md).

Up to `writers` flushes (default 2) run at once on different pool
connections: when a batch is being written, the next one starts on another
connection instead of waiting, so the loop encodes one batch while the server
executes and commits the other. Measured (bench/postgres_checkpoints.py,
2 shared noisy cores, ~1.3 KB documents): with callers arriving at different
times (64 x 32 records, up to 5 ms apart) 1 writer gave ~34-48k
checkpoints/s, 2 writers ~40-64k (2 ahead in 5 of 6 runs), 4 writers
no more than 2 with twice the commits; with callers in lockstep (16 x 256)
every flush takes all of them and the writer count makes no difference
(~30-41k/s: server CPU and WAL per 1.3 KB row are the limit, ~25 us a row).
Concurrent writers are safe because an order is never checkpointed by two
callers at once (a stage awaits its checkpoint before the next stage runs),
rows are locked in order-number order, and a deadlock (two batches creating
the same external ids in opposite orders) is retried like a stale statement.

Migrations are never applied by `open()`: a schema change on a shared
database is an operator's step (`oms migrate`), and a daemon that finds its
schema missing says so and stops.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import msgspec

from .. import sqlfiles
from ..ports.store import (Checkpoint, Event, HistoryEntry, HistoryRow, NewOrder, OutboxHandoff, OutboxRow,
                           ReverseRecord, StoredOrder, StoreUnavailable, history_entries, history_row, history_rows,
                           outbox_entries, stored_events)

Q = sqlfiles.queries("postgres")
# The append-only rows of a group commit go in by COPY, not INSERT ... SELECT FROM unnest: asyncpg
# encodes COPY records without inspecting every array element, and the server plans nothing
# (bench/RESULTS.md: ~1.8-2.0 -> 0.3 us of client CPU a row, the server's time a little lower).
APPENDS = {
    "history": ("stage_history", ("order_no", "stage", "outcome", "reason", "at", "trail", "events")),  # HistoryRow
    "outbox": ("outbox", ("order_no", "topic", "key", "payload", "at")),  # outbox_entries
    # a handed batch whose claim lapsed, back as ordinary rows under their own ids
    "lapsed_outbox": ("outbox", ("id", "order_no", "topic", "key", "payload", "at")),
}
OUTBOX_IDS = 1000  # outbox ids reserved at a time for handed-off rows
LAPSED_BATCHES = 100  # lapsed handed batches a claim pass writes back at a time
WRITE_BACK_EVERY = 1.0  # seconds between looks for lapsed batches (claim passes may run back to back)
_BATCH_ENCODER = msgspec.msgpack.Encoder()
_BATCH_DECODER = msgspec.msgpack.Decoder(list[OutboxRow])
ACQUIRE_TIMEOUT = 30.0  # never wait forever for a connection (PITFALLS 11)
DEFAULT_WRITERS = 2
# A migration while the daemon runs invalidates prepared statements, and
# asyncpg cannot retry inside a transaction (PITFALLS 9); a deadlock between
# two writers aborts one of them. Both succeed when the whole transaction runs again.
RETRIED = (asyncpg.InvalidCachedStatementError, asyncpg.DeadlockDetectedError)
# The server is away (restarting, shutting down, unreachable): callers wait and try again.
# InternalClientError: a pooled connection left mid-operation by the server going away ("cannot
# switch to state ..."): the pool drops it on release and the next attempt gets a fresh one.
UNREACHABLE = (OSError, asyncio.TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
               asyncpg.CannotConnectNowError, asyncpg.AdminShutdownError, asyncpg.ConnectionFailureError,
               asyncpg.InternalClientError)


class MigrationNeeded(RuntimeError):
    """The database lacks migrations this build needs; `oms migrate` applies them."""


# -- migrations ----------------------------------------------------------------

async def migrate(url: str) -> list[str]:
    """Apply the numbered migrations not yet applied, each in its own transaction,
    under an advisory lock so that concurrent migrators take turns. Returns the names applied."""
    conn = await asyncpg.connect(url)
    try:
        return [name for name in [await _apply(conn, *m) for m in sqlfiles.migrations("postgres")] if name]
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, version: int, name: str, sql: str) -> str | None:
    async with conn.transaction():
        await conn.execute(Q["migration_lock"])
        await conn.execute(Q["ensure_migrations_table"])
        if await conn.fetchval(Q["migration_applied"], version):
            return None
        await conn.execute(sql)
        await conn.execute(Q["record_migration"], version, name)
    return f"{version:03d}_{name}"


async def missing_migrations(conn: asyncpg.Connection) -> tuple[str, list[str]]:
    """(database name, names of the migrations it lacks)."""
    database, has_table = await conn.fetchrow(Q["schema_state"])
    applied = {row[0] for row in await conn.fetch(Q["applied_migrations"])} if has_table else set()
    return database, [f"{v:03d}_{n}" for v, n, _ in sqlfiles.migrations("postgres") if v not in applied]


# -- the store -------------------------------------------------------------------

class _Request:
    __slots__ = ("arg", "future", "op", "result")

    def __init__(self, op: str, arg: Any, future: asyncio.Future) -> None:
        self.op, self.arg, self.future, self.result = op, arg, future, None


class PostgresStore:
    persistent = True

    def __init__(self, url: str, *, max_batch: int = 5000, pool_size: int = 8,
                 writers: int = DEFAULT_WRITERS, command_timeout: float = 60.0) -> None:
        self.url = url
        self.max_batch = max_batch  # requests per transaction
        self.pool_size = pool_size
        self.writers = max(1, min(writers, pool_size))
        self.command_timeout = command_timeout
        self.commits = 0  # transactions committed (group-commit efficiency = requests / commits)
        self._pool: asyncpg.Pool | None = None
        self._pending: list[_Request] = []
        self._kick_scheduled = False
        self._flushing: set[asyncio.Task] = set()
        self._reads: list[tuple[str, asyncio.Future]] = []  # `get`s of this turn of the loop
        self._reading: set[asyncio.Task] = set()
        self.holder, self.lease = "", 30.0
        self.handoff: OutboxHandoff | None = None
        self._outbox_ids: deque[int] = deque()
        # Handed batches (migration 013) not yet all published: first id -> (size, ids left), and
        # each handed row's batch. A batch row is deleted when its last row is published.
        self._batches: dict[int, tuple[int, set[int]]] = {}
        self._batch_of: dict[int, int] = {}
        self._next_write_back = 0.0

    def own(self, holder: str, lease: float) -> None:
        self.holder, self.lease = holder, lease

    async def open(self) -> None:
        pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_size,
                                         command_timeout=self.command_timeout, reset=_session_kept)
        try:
            async with pool.acquire(timeout=ACQUIRE_TIMEOUT) as conn:
                database, missing = await missing_migrations(conn)
            if missing:
                raise MigrationNeeded(f"database {database} is not migrated "
                                      f"(missing {', '.join(missing)}): run `oms migrate`")
        except BaseException:
            await pool.close()
            raise
        self._pool = pool

    async def close(self) -> None:
        """Write whatever is pending, then close the pool."""
        while self._pending or self._flushing:
            self._kick()
            await asyncio.gather(*self._flushing, return_exceptions=True)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # -- writes: group commit ----------------------------------------------------

    async def create(self, orders: list[NewOrder]) -> list[tuple[str, bool]]:
        return await self._write("create", orders)

    async def checkpoint(self, records: list[Checkpoint]) -> set[str]:
        return await self._write("checkpoint", records)

    async def next_block(self, name: str, size: int) -> int:
        return await self._write("next_block", (name, size))

    async def checkpoint_if(self, record: Checkpoint, expect_state: str) -> bool:
        # In the group commit too: a burst of pay deadlines falling due is a burst of these.
        return await self._write("checkpoint_if", (record, expect_state))

    async def claim(self, order_no: str, expect_state: str, now: float) -> bool:
        return await self._transaction(lambda conn: conn.fetchval(
            Q["claim"], order_no, self.holder, expect_state)) is not None

    async def renew(self, now: float) -> None:
        await self._transaction(lambda conn: conn.execute(Q["renew"], self.holder, now + self.lease))

    async def take_over(self, now: float, limit: int = 500) -> list[StoredOrder]:
        rows = await self._transaction(lambda conn: conn.fetch(Q["take_over"], self.holder, now, limit))
        return [StoredOrder(*r) for r in rows]

    # The relay's two statements run on their own, outside a transaction block: one round trip
    # each instead of three (BEGIN, the statement, COMMIT), and just as atomic.
    async def outbox_claim(self, holder: str, limit: int, lease: float, now: float) -> list[OutboxRow]:
        if now >= self._next_write_back:
            self._next_write_back = now + WRITE_BACK_EVERY
            for first_id, rows in await self._transaction(lambda conn: self._write_back_lapsed(conn, now - lease)):
                self._batches.pop(first_id, None)  # written back: no longer tracked as a batch
                for row in rows:
                    self._batch_of.pop(row.id, None)
        rows = await self._rows("outbox_claim", holder, now, now - lease, limit)
        return sorted(OutboxRow(*r) for r in rows)

    async def _write_back_lapsed(self, conn: asyncpg.Connection, before: float) -> list[tuple[int, list]]:
        """Handed batches whose claim lapsed before `before` (a relay that died, or gave up on one
        of their rows) go back into the outbox as ordinary unclaimed rows, to be claimed like any
        other: the rows this process knows were published left out, all of them otherwise."""
        lapsed = []
        for first_id, packed in await conn.fetch(Q["outbox_batches_lapsed"], before, LAPSED_BATCHES):
            rows = _BATCH_DECODER.decode(packed)
            left = self._batches.get(first_id, (0, None))[1]
            await _append(conn, "lapsed_outbox", [r for r in rows if left is None or r.id in left])
            lapsed.append((first_id, rows))
        return lapsed

    async def outbox_done(self, ids: list[int]) -> None:
        rows, batches = [], []
        for i in ids:
            first_id = self._batch_of.pop(i, None)
            if first_id is None:
                rows.append(i)
                continue
            left = self._batches[first_id][1]
            left.discard(i)
            if not left:
                del self._batches[first_id]
                batches.append(first_id)
        if rows or batches:
            await self._rows("outbox_done", rows, batches)

    def _handed(self, rows: list[OutboxRow]) -> None:
        """A committed batch of handed rows: kept track of until its last row is published."""
        first_id = rows[0].id
        self._batches[first_id] = (len(rows), {row.id for row in rows})
        for row in rows:
            self._batch_of[row.id] = first_id

    def outbox_handoff(self, holder: str, now: Callable[[], float],
                       notify: Callable[[], None]) -> OutboxHandoff | None:
        """Outbox rows are numbered here (ids reserved from the table's sequence a block at a
        time) and written claimed by `holder`, so the relay that asked publishes them from memory
        without the claim statement, which took about a tenth of PostgreSQL's statement time
        (bench/RESULTS.md). A commit's handed rows are written as one row of outbox_batches
        (migration 013), deleted when the relay has published the last of them."""
        if self.handoff is not None:
            return None  # a second relay on this store claims
        self.handoff = OutboxHandoff(holder, now, notify)
        return self.handoff

    async def _reserve_outbox_ids(self, conn: asyncpg.Connection, n: int) -> list[int]:
        ids = self._outbox_ids
        while len(ids) < n:
            ids.extend(row[0] for row in await conn.fetch(Q["outbox_ids"], max(n - len(ids), OUTBOX_IDS)))
        return [ids.popleft() for _ in range(n)]

    async def reverse_create(self, record: ReverseRecord) -> tuple[str, bool]:
        async def insert(conn: asyncpg.Connection) -> tuple[str, bool]:
            if await conn.fetchval(Q["reverse_insert"], *record) is not None:
                return record.reverse_no, True
            return await conn.fetchval(Q["reverse_by_key"], record.order_no, record.request_key), False
        return await self._transaction(insert)

    async def _write(self, op: str, arg: Any) -> Any:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(_Request(op, arg, future))
        if not self._kick_scheduled:
            self._kick_scheduled = True
            loop.call_soon(self._kick)  # after the work already due in this turn of the loop
        return await future

    def _kick(self) -> None:
        """Start a flush per free writer, each with up to max_batch pending requests."""
        self._kick_scheduled = False
        while self._pending and len(self._flushing) < self.writers:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            task = asyncio.get_running_loop().create_task(self._flush(batch))
            self._flushing.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task) -> None:
        self._flushing.discard(task)
        self._kick()  # what arrived while this batch was being written

    async def _flush(self, batch: list[_Request]) -> None:
        try:
            handed = await self._transaction(lambda conn: _write_batch(conn, batch, self))
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            _settle(batch, exc)
            return
        except BaseException:
            _cancel(batch)
            raise
        self.commits += 1
        if handed:
            self._handed(handed)
            self.handoff.put(handed)
        _settle(batch, None)

    async def _transaction(self, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        """Run `work` in one transaction; once more from the start on a stale statement or deadlock.
        A lost connection (the server restarting, a network cut) is StoreUnavailable."""
        for attempt in (1, 2):
            try:
                async with self._acquire() as conn, _dropped_if_broken(conn), conn.transaction():
                    return await work(conn)
            except RETRIED:
                if attempt == 2:
                    raise
            except UNREACHABLE as exc:
                raise StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from None

    def _acquire(self) -> Any:
        if self._pool is None:
            raise RuntimeError("the store is not open")
        return self._pool.acquire(timeout=ACQUIRE_TIMEOUT)

    # -- reads -------------------------------------------------------------------

    async def _rows(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """One statement on its own (autocommit). Outside a transaction asyncpg itself re-prepares
        a stale statement once."""
        try:
            async with self._acquire() as conn, _dropped_if_broken(conn):
                return await conn.fetch(Q[query], *args)
        except UNREACHABLE as exc:
            raise StoreUnavailable(f"postgresql: {type(exc).__name__}: {exc}") from None

    async def get(self, order_no: str) -> StoredOrder | None:
        """Reads asked for in one turn of the loop go as one query (a burst of due timers, the
        payments of a batch): one round trip and one pooled connection for all of them."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._reads.append((order_no, future))
        if len(self._reads) == 1:
            loop.call_soon(self._read_kick)
        return await future

    def _read_kick(self) -> None:
        reads, self._reads = self._reads, []
        task = asyncio.get_running_loop().create_task(self._read(reads))
        self._reading.add(task)
        task.add_done_callback(self._reading.discard)

    async def _read(self, reads: list[tuple[str, asyncio.Future]]) -> None:
        try:
            rows = await self._rows("get_orders", list({no for no, _ in reads}))
        except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
            for _, future in reads:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in reads:
                future.cancel()
            raise
        found = {row[0]: StoredOrder(*row) for row in rows}
        for no, future in reads:
            if not future.done():  # (a caller cancelled meanwhile)
                future.set_result(found.get(no))

    async def find_external(self, source: str, external_id: str) -> str | None:
        rows = await self._rows("orders_by_external", [source], [external_id])
        return rows[0]["order_no"] if rows else None

    async def active(self) -> list[StoredOrder]:
        return [StoredOrder(*r) for r in await self._rows("active_orders", self.holder)]

    async def in_state(self, state: str, limit: int = 100, after: str = "") -> list[StoredOrder]:
        return await self._planned_with_values("orders_in_state", state, after, limit)

    async def children(self, parent_no: str) -> list[StoredOrder]:
        return [StoredOrder(*r) for r in await self._rows("children", parent_no)]

    async def search(self, *, member: str = "", statuses: tuple[str, ...] = (), state: str = "",
                     limit: int = 100, after: str = "") -> list[StoredOrder]:
        return await self._planned_with_values("search_orders", member, list(statuses), state, after, limit)

    async def _planned_with_values(self, query: str, *args: Any) -> list[StoredOrder]:
        """A look-up planned for its values (custom_plans): only then can the planner tell that a
        partial index (migration 011) or one of the optional filters applies."""
        async def run(conn: asyncpg.Connection) -> list[asyncpg.Record]:
            await conn.execute(Q["custom_plans"])
            return await conn.fetch(Q[query], *args)
        return [StoredOrder(*r) for r in await self._transaction(run)]

    async def history(self, order_no: str) -> list[HistoryEntry]:
        return history_entries(await self._rows("order_history", order_no))

    async def events(self, order_no: str) -> list[Event]:
        return stored_events(order_no, await self._rows("order_events", order_no))

    async def counts(self) -> dict[str, int]:
        return {state: count for state, count in await self._rows("counts")}

    async def outbox_pending(self) -> int:
        """Rows not yet published; a handed batch counts whole in the database until its last row
        is, so the rows of it this process has published are taken off."""
        published = sum(size - len(left) for size, left in self._batches.values())
        return (await self._rows("outbox_pending"))[0][0] - published

    async def overdue(self, before: float, limit: int = 500) -> list[StoredOrder]:
        return [StoredOrder(*r) for r in await self._rows("overdue", before, limit)]

    async def stranded(self, before: float, limit: int = 500, after: str = "") -> list[StoredOrder]:
        return [StoredOrder(*r) for r in await self._rows("stranded", self.holder, before, after, limit)]

    async def reverse_get(self, reverse_no: str) -> ReverseRecord | None:
        rows = await self._rows("reverse_get", reverse_no)
        return ReverseRecord(*rows[0]) if rows else None

    async def reverse_of(self, order_no: str) -> list[ReverseRecord]:
        return [ReverseRecord(*r) for r in await self._rows("reverse_of", order_no)]

    async def reverse_open(self, limit: int = 500, after: str = "") -> list[ReverseRecord]:
        return [ReverseRecord(*r) for r in await self._rows("reverse_open", after, limit)]


async def _session_kept(conn: asyncpg.Connection) -> None:
    """The pool's reset of a released connection. The store leaves no session state behind: its
    one setting is SET LOCAL, its one advisory lock transaction-scoped, and it never LISTENs or
    keeps a cursor open; an open transaction is still rolled back by the pool before this runs.
    So the default reset (pg_advisory_unlock_all, CLOSE ALL, UNLISTEN *, RESET ALL: a round trip
    and four statements on the server at every release) is left out."""


@contextlib.asynccontextmanager
async def _dropped_if_broken(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """A connection the server's going away left mid-operation is closed here, so the pool
    opens a fresh one instead of handing it out again."""
    try:
        yield
    except asyncpg.InternalClientError:
        conn.terminate()
        raise


def _settle(requests: list[_Request], error: BaseException | None) -> None:
    for request in requests:
        if request.future.done():  # the caller was cancelled; the write stands
            continue
        if error is None:
            request.future.set_result(request.result)
        else:
            request.future.set_exception(error)


def _cancel(requests: list[_Request]) -> None:
    for request in requests:
        request.future.cancel()


# -- one group commit: set-based statements ------------------------------------------

class _Rows:
    """History, outbox and reverse rows gathered from a whole batch, written with one statement each."""

    def __init__(self, holder: str = "") -> None:
        self.holder = holder  # who writes: the owner of what it creates and checkpoints
        self.history: list[HistoryRow] = []
        self.outbox: list[tuple[str, str, str, bytes, float]] = []
        self.reverse: list[ReverseRecord] = []


async def _write_batch(conn: asyncpg.Connection, batch: list[_Request], store: "PostgresStore") -> list[OutboxRow]:
    """The batch's writes; returns its outbox rows for the relay if they are handed off."""
    rows = _Rows(store.holder)
    await _create(conn, [r for r in batch if r.op == "create"], rows)
    await _checkpoint(conn, [r for r in batch if r.op == "checkpoint"], rows)
    await _checkpoint_if(conn, [r for r in batch if r.op == "checkpoint_if"], rows)
    await _append(conn, "history", rows.history)
    handed = await _side_rows(conn, rows, store)
    for request in batch:
        if request.op == "next_block":
            request.result = await _next_block(conn, *request.arg)
    return handed


async def _create(conn: asyncpg.Connection, requests: list[_Request], rows: _Rows) -> None:
    if not requests:
        return
    # The first order of the batch with a given (source, external_id) is the one stored.
    firsts: dict[tuple[str, str], NewOrder] = {}
    for request in requests:
        for order in request.arg:
            firsts.setdefault((order.source, order.external_id), order)
    inserted = await _insert_orders(conn, "create_orders", list(firsts.values()), rows)
    numbers = {key: o.order_no for key, o in firsts.items() if o.order_no in inserted}
    numbers.update(await _existing(conn, [key for key in firsts if key not in numbers]))
    seen: set[tuple[str, str]] = set()
    for request in requests:
        request.result = [_created(order, numbers, inserted, seen) for order in request.arg]
    for order in firsts.values():
        if order.order_no in inserted:
            rows.history.append(history_row(order.order_no, "intake", "created", "", order.at, order.events))
            rows.outbox.extend(outbox_entries(order.order_no, order.at, order.events))


def _created(order: NewOrder, numbers: dict, inserted: set[str], seen: set) -> tuple[str, bool]:
    key = (order.source, order.external_id)
    new = key not in seen and order.order_no in inserted
    seen.add(key)
    return numbers[key], new


async def _existing(conn: asyncpg.Connection, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    if not keys:
        return {}
    found = await conn.fetch(*_statement("orders_by_external", keys))
    return {(source, external_id): order_no for source, external_id, order_no in found}


async def _checkpoint(conn: asyncpg.Connection, requests: list[_Request], rows: _Rows) -> None:
    records = [record for request in requests for record in request.arg]
    if not records:
        return
    last = {r.order_no: r for r in records}  # an order checkpointed twice in a batch ends at its last record
    updates = [(r.order_no, r.state, r.stage, r.status, r.attempts, r.wake_at, r.doc, r.at)
               for _, r in sorted(last.items())]
    status = await conn.execute(*_statement("checkpoint_orders", updates), rows.holder)
    rejected: set[str] = set()
    if int(status.split()[-1]) < len(updates):  # rare: another instance took some over
        rejected = {row[0] for row in await conn.fetch(Q["owned_elsewhere"], list(last), rows.holder)}
        records = [r for r in records if r.order_no not in rejected]
    for request in requests:
        request.result = {r.order_no for r in request.arg} & rejected
    await _children(conn, records, rows)
    _gather(records, rows)


def _gather(records: list[Checkpoint], rows: _Rows) -> None:
    """What written checkpoints add besides the order rows: history (status changes packed in it),
    outbox, reverse orders."""
    rows.history.extend(history_rows(records))
    for r in records:
        if r.events or r.commands:
            rows.outbox.extend(outbox_entries(r.order_no, r.at, r.events, r.commands))
        rows.reverse.extend(r.reverse)


async def _side_rows(conn: asyncpg.Connection, rows: _Rows, store: "PostgresStore") -> list[OutboxRow]:
    """The outbox rows and reverse orders written with the batch; the outbox rows written for the
    relay's handoff, if there is one."""
    handoff, handed = store.handoff, []
    if handoff is None:
        await _append(conn, "outbox", rows.outbox)
    elif rows.outbox:
        ids = await store._reserve_outbox_ids(conn, len(rows.outbox))
        handed = [OutboxRow(i, *row) for i, row in zip(ids, rows.outbox)]
        await conn.execute(Q["outbox_batch_insert"], ids[0], handoff.holder, handoff.now(), len(handed),
                           _BATCH_ENCODER.encode(handed))
    if rows.reverse:
        await conn.executemany(Q["reverse_upsert"], rows.reverse)
    return handed


async def _children(conn: asyncpg.Connection, records: list[Checkpoint], rows: _Rows) -> None:
    """Split children, stored with their parent's checkpoint (before any checkpoint of theirs)."""
    parents: dict[str, Checkpoint] = {}
    children = []
    for record in records:
        for child in record.children:
            parents.setdefault(child.order_no, record)
            children.append(child)
    inserted = await _insert_orders(conn, "create_orders", children, rows)
    for child_no, parent in parents.items():
        if child_no in inserted:
            rows.history.append(history_row(child_no, parent.from_stage, "created", f"child of {parent.order_no}",
                                            parent.at))


async def _insert_orders(conn: asyncpg.Connection, query: str, orders: list[NewOrder], rows: _Rows) -> set[str]:
    if not orders:
        return set()
    values = [(o.order_no, o.source, o.external_id, o.kind, o.state, o.stage, o.status, o.parent_no,
               o.doc, o.at, o.member_id, o.wake_at) for o in orders]
    return {row[0] for row in await conn.fetch(*_statement(query, values), rows.holder)}


async def _append(conn: asyncpg.Connection, kind: str, rows: list[Sequence]) -> None:
    """Append-only rows by binary COPY, in the batch's transaction and in the order given (their
    identity column keeps each order's entries in the order they were made)."""
    if rows:
        table, columns = APPENDS[kind]
        await conn.copy_records_to_table(table, records=rows, columns=columns)


async def _checkpoint_if(conn: asyncpg.Connection, requests: list[_Request], rows: _Rows) -> None:
    """Compare-and-sets, in the order they were asked: an order's first in one statement, its
    second (a payment racing its own deadline) in the next, which sees what the first did."""
    rounds: list[list[tuple[Checkpoint, str, _Request]]] = []
    seen: dict[str, int] = {}
    for request in requests:
        record, expect = request.arg
        n = seen[record.order_no] = seen.get(record.order_no, -1) + 1
        if n == len(rounds):
            rounds.append([])
        rounds[n].append((record, expect, request))
    for round_ in rounds:
        round_.sort(key=lambda item: item[0].order_no)  # rows locked in one order by every writer
        values = [(r.order_no, r.state, r.stage, r.status, r.attempts, r.wake_at, r.doc, r.at, expect)
                  for r, expect, _ in round_]
        applied = {row[0] for row in await conn.fetch(*_statement("checkpoint_if_orders", values), rows.holder)}
        for record, _, request in round_:
            request.result = record.order_no in applied
        _gather([record for record, _, _ in round_ if record.order_no in applied], rows)


async def _next_block(conn: asyncpg.Connection, name: str, size: int) -> int:
    after = await conn.fetchval(Q["next_block"], name, size + 1)
    return after - size


# A set-based statement's text columns travel as one string each: SEP before every value, NONE
# for a null, split again by the server's string_to_array (the leading SEP keeps a single empty
# value from becoming no value at all). asyncpg encodes an array parameter element by element
# (~1 us of client CPU a text element); a join costs a tenth of that, and the server splits a
# string in about the time it decodes an array (bench/postgres_checkpoints.py, RESULTS.md).
# Numbers and documents stay arrays: binary, nothing to parse. A batch with a value that holds
# either character (no validated field can) goes as arrays, with the statement as written.
SEP, NONE = "\x1f", "\x1e"
_TEXT_ARRAY = re.compile(r"\$(\d+)::text\[\]")
_SPLIT = f"(string_to_array(${{}}::text, E'\\x{ord(SEP):02x}', E'\\x{ord(NONE):02x}'))[2:]"
JOINED = {name: _TEXT_ARRAY.sub(lambda m: _SPLIT.format(m[1]), Q[name])
          for name in ("create_orders", "orders_by_external", "checkpoint_orders",
                       "checkpoint_if_orders")}
TEXT_COLUMNS = {name: {int(n) - 1 for n in _TEXT_ARRAY.findall(Q[name])} for name in JOINED}


def _statement(name: str, rows: list[Sequence]) -> tuple[Any, ...]:
    """The named set-based statement and one parameter per column of `rows` (the parallel arrays
    that unnest turns back into rows)."""
    columns = [list(column) for column in zip(*rows)]
    text = TEXT_COLUMNS[name]
    params = [_joined(column) if i in text else column for i, column in enumerate(columns)]
    if None in params:
        return (Q[name], *columns)
    return (JOINED[name], *params)


def _joined(values: list[str | None]) -> str | None:
    nones = values.count(None)
    joined = SEP + SEP.join([NONE if v is None else v for v in values] if nones else values)
    if joined.count(SEP) != len(values) or joined.count(NONE) != nones:
        return None  # a value holds a separator
    return joined
