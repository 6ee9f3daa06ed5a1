"""The effect log: every effect a simulated system applied, with its idempotency key.

A repeated key returns the first result and only counts a duplicate. Three modes:

* in memory (the default): keys and results in a dict, every effect too unless
  `retain = False`;
* durable and retaining (`EffectLog(path)`): as in memory, and every effect
  written to a SQLite file by a writer thread, so the crash tests can check,
  after a SIGKILL, that each (order, stage) effect was applied exactly once,
  and a restart rebuilds the systems' state from the file;
* in the file (`EffectLog(path, retain=False)`): nothing per key in memory;
  keys are looked up in and written to the file on the event-loop thread
  (state_file.py), where the inventory also keeps its reservations.
"""
from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import anyio
import msgspec

from .effect_file import RESERVATIONS_KEPT, SCHEMA, connect, read_duplicates, read_effects
from .state_file import StateFile

__all__ = ["Effect", "EffectLog", "read_duplicates", "read_effects"]

T = TypeVar("T")


class Effect(msgspec.Struct, frozen=True):
    key: str
    system: str
    op: str
    payload: dict[str, Any]  # a small summary, enough to rebuild the system's state
    result: Any
    at: float


@dataclass(slots=True)
class _Restored:
    """A result read back from the file, typed on first use by the caller's result type."""

    value: Any


_MISSING = object()


class _InFile:
    """The de-duplication table when it lives in the state file: keys looked up there, nothing kept."""

    __slots__ = ("_file",)

    def __init__(self, file: StateFile) -> None:
        self._file = file

    def get(self, ident: tuple[str, str, str], default: Any) -> Any:
        found = self._file.find(*ident)
        return default if found is None else _Restored(msgspec.json.decode(found))

    def __setitem__(self, ident: tuple[str, str, str], result: Any) -> None:
        pass  # the effect's row, written with its commit, is the record


class EffectLog:
    """Every applied effect, at most once per (key, system, op).

    `EffectLog()` keeps it in memory; `EffectLog(path)` also writes it to a
    SQLite file, `EffectLog(path, retain=False)` keeps it in that file alone
    (call `open()` first, `close()` at the end); both return from an effect
    only once its row is committed.
    """

    def __init__(self, path: str | None = None, *, max_batch: int = 5000, retain: bool = True) -> None:
        self.path = path
        # False: payloads do not stay in memory; with a path, keys and results do not either.
        self.retain = retain
        self.counts: dict[str, int] = {}  # effects applied, per system
        self.duplicates: dict[str, int] = {}  # per system
        self._effects: list[Effect] = []
        # The state file (keys, results, the inventory's reservations) when nothing per key is kept here.
        self.file = StateFile(path, self._fail) if path and not retain else None
        self._results: dict[tuple[str, str, str], Any] | _InFile = _InFile(self.file) if self.file else {}
        self._writer = self.file or (_Writer(path, max_batch) if path else None)
        self._pending: dict[tuple[str, str, str], asyncio.Future] = {}  # rows not committed yet
        self._failed: BaseException | None = None

    @property
    def durable(self) -> bool:
        return self._writer is not None

    @property
    def is_open(self) -> bool:
        return self._writer is None or self._writer.running

    @property
    def commits(self) -> int:
        """Transactions committed (durable log): calls per commit shows the grouping."""
        return self._writer.commits if self._writer else 0

    async def open(self) -> None:
        """Start the writer and load what an earlier run stored (a no-op in memory)."""
        if self._writer is None or self._writer.running:
            return
        if self.file is not None:
            self.file.start()  # on the loop thread, where it is used (see state_file.py)
            counts, duplicates = self.file.totals()
            self.counts.update(counts)
            self.duplicates.update(duplicates)
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        rows, duplicates = await anyio.to_thread.run_sync(self._writer.start)
        for key, system, op, result, at, payload in rows:
            value = msgspec.json.decode(result)
            self._results[(key, system, op)] = _Restored(value)
            self._keep(Effect(key, system, op, msgspec.json.decode(payload), value, at))
        self.duplicates.update(duplicates)

    async def close(self) -> None:
        if self.file is not None:
            self.file.stop()
        elif self._writer is not None and self._writer.running:
            await anyio.to_thread.run_sync(self._writer.stop)

    async def __aenter__(self) -> "EffectLog":
        await self.open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def apply(self, system: str, op: str, key: str, payload: dict[str, Any],
                    effect: Callable[[], T], *, at: float, result_type: Any = Any) -> T:
        """Run `effect()` unless (key, system, op) was applied; either way return its result.

        `effect` runs synchronously, so checking the key and applying it cannot
        interleave with another call. An exception from it records nothing.
        """
        if self._writer is None:
            return self.apply_now(system, op, key, payload, effect, at=at)
        if self._failed is not None:
            raise RuntimeError(f"effect log {self.path}: an earlier commit failed: {self._failed}")
        if not self.is_open:
            raise RuntimeError(f"effect log {self.path} is not open: await open() first")
        ident = (key, system, op)
        found = self._results.get(ident, _MISSING)
        if found is not _MISSING:
            return await self._duplicate(ident, found, result_type)
        result = effect()
        self._results[ident] = result
        row = Effect(key, system, op, payload, result, at)
        self._keep(row)
        await self._persist(ident, row)
        return result

    def apply_now(self, system: str, op: str, key: str, payload: dict[str, Any], effect: Callable[[], T], *,
                  at: float) -> T:
        """`apply` on a log kept in memory alone (`not durable`): there is no commit to wait for,
        so it is a plain call (the simulated systems take it when they have no latency either)."""
        if self._writer is not None:
            raise RuntimeError(f"effect log {self.path} is durable: use apply()")
        ident = (key, system, op)
        found = self._results.get(ident, _MISSING)
        if found is not _MISSING:
            self.duplicates[system] = self.duplicates.get(system, 0) + 1
            return found
        result = effect()
        self._results[ident] = result
        self.counts[system] = self.counts.get(system, 0) + 1
        if self.retain:
            self._effects.append(Effect(key, system, op, payload, result, at))
        return result

    async def _duplicate(self, ident: tuple[str, str, str], found: Any, result_type: Any) -> Any:
        system = ident[1]
        self.duplicates[system] = self.duplicates.get(system, 0) + 1
        if self._writer is not None:
            self._writer.count_duplicate(system)
            pending = self._pending.get(ident)
            if pending is not None:  # the first call's row is not committed yet: neither is this answer
                await asyncio.shield(pending)
        if isinstance(found, _Restored):
            found = found.value if result_type is Any else msgspec.convert(found.value, result_type)
            self._results[ident] = found
        return found

    async def _persist(self, ident: tuple[str, str, str], row: Effect) -> None:
        try:
            future = self._writer.submit(row)
        except BaseException as exc:
            self._fail(exc)  # applied but not stored
            raise
        self._pending[ident] = future
        future.add_done_callback(lambda f: self._settled(ident, f))
        # Shielded: a cancelled caller must not cancel the commit other callers share.
        await asyncio.shield(future)

    def _settled(self, ident: tuple[str, str, str], future: asyncio.Future) -> None:
        self._pending.pop(ident, None)
        if not future.cancelled() and future.exception() is not None:
            self._fail(future.exception())

    def _fail(self, exc: BaseException) -> None:
        # The effect is applied in memory but not stored: nothing after it can be trusted.
        self._failed = self._failed or exc

    def _keep(self, effect: Effect) -> None:
        self.counts[effect.system] = self.counts.get(effect.system, 0) + 1
        if self.retain:
            self._effects.append(effect)

    def applied(self, system: str | None = None) -> list[Effect]:
        if not self.retain:
            raise RuntimeError("this effect log does not retain effects (retain_effects = false)")
        return [e for e in self._effects if system is None or e.system == system]

    def stored(self) -> Iterable[Effect]:
        """Every effect applied so far, oldest first, to rebuild the systems' state from: the
        retained ones, or read from the state file one at a time (none without either)."""
        return self._effects if self.file is None else self._read_file()

    def _read_file(self) -> Iterator[Effect]:
        for key, system, op, result, at, payload in self.file.rows(
                "SELECT key, system, op, result, at, payload FROM effects ORDER BY rowid"):
            yield Effect(key, system, op, msgspec.json.decode(payload), msgspec.json.decode(result), at)

    def count(self, system: str | None = None) -> int:
        if system is None:
            return sum(self.counts.values())
        return self.counts.get(system, 0)


class _Writer:
    """The durable log's SQLite thread: one transaction for whatever queued during the last commit.

    Callers wait for the commit of their batch, so an effect is on disk before
    its call returns, yet a thousand concurrent calls cost a handful of commits.
    """

    def __init__(self, path: str, max_batch: int) -> None:
        self.path = path
        self.max_batch = max_batch
        self.commits = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> tuple[list[tuple], dict[str, int]]:
        conn = connect(self.path)
        for statement in SCHEMA:
            conn.execute(statement)
        # This log keeps reservations in memory, not in the state file's open table: mark that
        # table stale for a later run in the file mode (reservations.py rebuilds it).
        conn.execute("DELETE FROM meta WHERE name = ?", (RESERVATIONS_KEPT,))
        rows = conn.execute("SELECT key, system, op, result, at, payload FROM effects ORDER BY rowid").fetchall()
        duplicates = dict(conn.execute("SELECT system, count FROM duplicates").fetchall())
        self._thread = threading.Thread(target=self._loop, args=(conn,), name="effect-log-write", daemon=True)
        self._thread.start()
        return rows, duplicates

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._thread = None

    def submit(self, effect: Effect) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        row = (effect.key, effect.system, effect.op, msgspec.json.encode(effect.result).decode(),
               effect.at, msgspec.json.encode(effect.payload).decode())
        self._queue.put((row, future))
        return future

    def count_duplicate(self, system: str) -> None:
        self._queue.put((system, None))  # nobody waits: a counter, committed with the next batch

    def _loop(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                batch = [self._queue.get()]
                if batch[0] is None:
                    return
                stop = False
                while len(batch) < self.max_batch:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(conn, batch)
                if stop:
                    return
        finally:
            conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple]) -> None:
        rows = [item for item, future in batch if future is not None]
        duplicates = Counter(item for item, future in batch if future is None)
        error: BaseException | None = None
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR IGNORE INTO effects (key, system, op, result, at, payload) "
                             "VALUES (?, ?, ?, ?, ?, ?)", rows)
            conn.executemany("INSERT INTO duplicates VALUES (?, ?) ON CONFLICT (system) "
                             "DO UPDATE SET count = count + excluded.count", list(duplicates.items()))
            conn.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            error = exc
        _resolve([future for _, future in batch if future is not None], error)


def _resolve(futures: list[asyncio.Future], error: BaseException | None) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for future in futures:
        by_loop.setdefault(future.get_loop(), []).append(future)
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, group, error)
        except RuntimeError:
            pass  # that loop is closed: nobody is waiting any more


def _settle(futures: list[asyncio.Future], error: BaseException | None) -> None:
    for future in futures:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

