"""The simulated systems' per-key state in the effect log's SQLite file, on the event-loop thread.

Used when `downstream.effect_log` names a file and `retain_effects = false`:
nothing per idempotency key stays in the process. The effect log looks its keys
up here instead of in a dict, and the inventory keeps its reservations here
(reservations.py); what the process holds of them is SQLite's page cache, of a
fixed size.

Every write made during one turn of the event loop joins one transaction,
committed at the next turn (`loop.call_soon`); callers wait for that commit, so
an effect is on disk before its call returns (as with the retaining durable
log) and the calls of a busy turn share one commit.

Why on the loop thread and not on a writer thread like the retaining log's: a
look-up must see what was written but not yet committed, which one connection
inside its open transaction does without a second copy in memory; and a writer
thread beside a busy loop must win the GIL back after every row (bench/RESULTS.md,
"Where SQLite's commits run"). An indexed look-up or a one-row
write is a few microseconds.
"""
from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import msgspec

from .effect_file import SCHEMA, connect

# SQLite's page cache for this file, in KiB: all the process keeps of the state, whatever
# the number of keys. Keys are order numbers, random by design, so a look-up of a new one
# misses any cache size; the OS's file cache serves it. Measured at a 177 MB file: 2 MiB
# ~22 µs a reserve, 8 MiB the same, 32 MiB ~27 µs (and 36 MB more RSS).
CACHE_KIB = 2048


class StateFile:
    def __init__(self, path: str, on_failure: Callable[[BaseException], None]) -> None:
        self.path = path
        self.commits = 0
        self._on_failure = on_failure  # a failed commit: the caller must stop trusting its state
        self._conn: sqlite3.Connection | None = None
        self._turn: asyncio.Future | None = None  # the open transaction's commit
        self._duplicates: Counter[str] = Counter()  # counted in this turn, stored with its commit

    @property
    def running(self) -> bool:
        return self._conn is not None

    def start(self) -> None:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = connect(self.path)
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # No fsync on the event loop: with NORMAL every WAL checkpoint (each ~4 MB written) syncs
        # twice, stalling the loop 5-20 ms each here. A commit still survives the process being
        # killed, the crash the simulation is for; only an OS crash or power loss could lose it.
        conn.execute("PRAGMA synchronous=OFF")
        for statement in SCHEMA:
            conn.execute(statement)
        self._conn = conn

    def stop(self) -> None:
        if self._conn is None:
            return
        if self._turn is not None:
            self._commit()  # what the last turn wrote; the scheduled commit then finds nothing
        self._conn.close()
        self._conn = None

    # -- reads: they see this turn's writes too ---------------------------------

    def one(self, sql: str, args: tuple = ()) -> tuple | None:
        return self._connection().execute(sql, args).fetchone()

    def all(self, sql: str, args: tuple = ()) -> list[tuple]:
        return self._connection().execute(sql, args).fetchall()

    def rows(self, sql: str, args: tuple = ()) -> Iterator[tuple]:
        """A lazy cursor: for reading a whole table at startup without holding it."""
        return iter(self._connection().execute(sql, args))

    def setup(self, statement: str) -> None:
        """A schema statement of a user of the file (reservations.py), run at once."""
        self._connection().execute(statement)

    # -- writes: into the turn's transaction --------------------------------------

    def write(self, sql: str, args: tuple) -> asyncio.Future:
        """Execute now, inside this turn's transaction; returns the future of its commit."""
        turn = self._begin()
        self._conn.execute(sql, args)
        return turn

    def count_duplicate(self, system: str) -> None:
        self._begin()
        self._duplicates[system] += 1

    # -- the effect log's rows ----------------------------------------------------

    def find(self, key: str, system: str, op: str) -> str | None:
        """The stored result (JSON) of (key, system, op), or None if it was never applied."""
        row = self.one("SELECT result FROM effects WHERE key = ? AND system = ? AND op = ?", (key, system, op))
        return None if row is None else row[0]

    def submit(self, effect: Any) -> asyncio.Future:
        """Store an applied effect (effects.Effect); returns the future of its commit."""
        row = (effect.key, effect.system, effect.op, msgspec.json.encode(effect.result).decode(),
               effect.at, msgspec.json.encode(effect.payload).decode())
        return self.write("INSERT INTO effects (key, system, op, result, at, payload) VALUES (?, ?, ?, ?, ?, ?)",
                          row)

    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """(effects applied, duplicates) per system, as stored."""
        counts = dict(self.all("SELECT system, COUNT(*) FROM effects GROUP BY system"))
        return counts, dict(self.all("SELECT system, count FROM duplicates"))

    # -- the transaction ------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"state file {self.path} is not open")
        return self._conn

    def _begin(self) -> asyncio.Future:
        if self._turn is None:
            conn = self._connection()
            loop = asyncio.get_running_loop()
            conn.execute("BEGIN IMMEDIATE")
            self._turn = loop.create_future()
            loop.call_soon(self._commit)  # after the work already due in this turn of the loop
        return self._turn

    def _commit(self) -> None:
        turn, self._turn = self._turn, None
        if turn is None:
            return
        duplicates, self._duplicates = self._duplicates, Counter()
        try:
            self._conn.executemany("INSERT INTO duplicates VALUES (?, ?) ON CONFLICT (system) "
                                   "DO UPDATE SET count = count + excluded.count", list(duplicates.items()))
            self._conn.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            self._on_failure(exc)
            if not turn.done():
                turn.set_exception(exc)
                turn.exception()  # reported through on_failure: no "never retrieved" warning too
            return
        if not turn.done():
            turn.set_result(None)

