"""The effect log's SQLite file: its tables, how it is opened, and reading it from outside.

Both durable modes write this one format: the retaining log through its writer
thread (effects.py), the state file on the event-loop thread (state_file.py),
which also keeps the inventory's reservations here.
"""
from __future__ import annotations

import sqlite3
from typing import Any

import msgspec

SCHEMA = (
    # One idempotency key may reach several systems/operations (a reservation
    # key is reserved, then confirmed or released), so the key alone is not unique.
    "CREATE TABLE IF NOT EXISTS effects (key TEXT NOT NULL, system TEXT NOT NULL, op TEXT NOT NULL,"
    " result TEXT NOT NULL, at REAL NOT NULL, payload TEXT NOT NULL, PRIMARY KEY (key, system, op))",
    "CREATE TABLE IF NOT EXISTS duplicates (system TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)

# Set while the state file's `open_reservations` table (reservations.py) is complete. The
# retaining log keeps reservations in memory and does not maintain that table, so it clears
# the mark when it opens the file: the state file then rebuilds the table from the effects.
RESERVATIONS_KEPT = "reservations_kept"


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # in WAL mode a commit survives a process kill
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def read_effects(path: str) -> list[tuple[str, str, str, Any, float]]:
    """(key, system, op, result, at) of every stored effect, in commit order.

    Usable from any process, also after the writer was killed: WAL recovery
    makes every committed transaction visible.
    """
    conn = connect(path)
    try:
        rows = conn.execute("SELECT key, system, op, result, at FROM effects ORDER BY rowid").fetchall()
    finally:
        conn.close()
    return [(key, system, op, msgspec.json.decode(result), at) for key, system, op, result, at in rows]


def read_duplicates(path: str) -> dict[str, int]:
    """Duplicate calls per system stored in a durable log file."""
    conn = connect(path)
    try:
        return dict(conn.execute("SELECT system, count FROM duplicates").fetchall())
    finally:
        conn.close()
