"""Where the simulated inventory keeps its reservations: in memory, or in the state file.

A reservation is kept by its key from the reserve on (or from a release that
overtook it: a tombstone, so the late reserve is refused). The open ones
(reserved, neither confirmed nor released) are what the OMS's reconciler pages
through. Both books answer the same calls; the inventory's rules (systems.py)
do not know which one they use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import msgspec

from .effect_file import RESERVATIONS_KEPT
from .state_file import StateFile

RESERVED = "reserved"


@dataclass(slots=True)
class Record:
    sku: str
    warehouse: str
    qty: int
    state: str  # reserved | sold | released | refused
    created_at: float = 0.0


class MemoryReservations:
    """Two dicts: every reservation by key, and the open ones."""

    in_file = False

    def __init__(self) -> None:
        self._all: dict[str, Record] = {}
        self._open: dict[str, Record] = {}
        self.get = self._all.get  # the dict's own method: no extra call on the hot path

    def add(self, key: str, record: Record) -> None:
        self._all[key] = record
        if record.state == RESERVED:
            self._open[key] = record

    def settle(self, key: str, record: Record, state: str) -> None:
        record.state = state
        self._open.pop(key, None)

    def open_page(self, created_before: float, limit: int, after: str) -> list[tuple[str, Record]]:
        keys = sorted(k for k, r in self._open.items() if k > after and r.created_at <= created_before)
        return [(k, self._open[k]) for k in keys[:limit]]


# The inventory's effect rows say what became of each reservation (the reserve, and a
# confirm or a release under the same key), so the file needs only the open ones beside
# them: ordered by creation time, a new one goes at the end of the table and a settled one
# leaves from near its start, so a commit writes a page or two of it, not a page per row.
_OPEN = ("CREATE TABLE IF NOT EXISTS open_reservations (created_at REAL NOT NULL, key TEXT NOT NULL,"
         " sku TEXT NOT NULL, warehouse TEXT NOT NULL, qty INTEGER NOT NULL, PRIMARY KEY (created_at, key))"
         " WITHOUT ROWID")
# What each inventory operation under a key makes of its reservation, as the memory book
# would have it: a release (also one that came first: the tombstone) or a confirm is final.
_SETTLED = {"release": "released", "confirm": "sold"}


class FileReservations:
    """Reservations read from the inventory's effect rows, the open ones in a table of their own;
    written in the transaction of the effect that made the change."""

    in_file = True

    def __init__(self, file: StateFile) -> None:
        self._file = file
        file.setup(_OPEN)
        _complete(file)

    def get(self, key: str) -> Record | None:
        found: Record | None = None
        state = ""
        for op, result, payload, at in self._file.all(
                "SELECT op, result, payload, at FROM effects WHERE key = ? AND system = 'inventory'", (key,)):
            if op == "reserve":
                p = msgspec.json.decode(payload)
                found = Record(p["sku"], p["warehouse"], p["qty"], RESERVED if result == "true" else "refused", at)
            elif op in _SETTLED:
                state = _SETTLED[op]
        if state:
            found = found or Record("", "", 0, state)
            found.state = state
        return found

    def add(self, key: str, record: Record) -> None:
        if record.state == RESERVED:  # refused ones and tombstones are their effect rows alone
            self._file.write("INSERT INTO open_reservations VALUES (?, ?, ?, ?, ?)",
                             (record.created_at, key, record.sku, record.warehouse, record.qty))

    def settle(self, key: str, record: Record, state: str) -> None:
        if record.state == RESERVED:
            self._file.write("DELETE FROM open_reservations WHERE created_at = ? AND key = ?",
                             (record.created_at, key))
        record.state = state

    def open_page(self, created_before: float, limit: int, after: str) -> list[tuple[str, Record]]:
        rows = self._file.all("SELECT key, sku, warehouse, qty, created_at FROM open_reservations"
                              " WHERE created_at <= ? AND key > ? ORDER BY key LIMIT ?",
                              (created_before, after, limit))
        return [(key, Record(sku, warehouse, qty, RESERVED, at)) for key, sku, warehouse, qty, at in rows]

    def held(self) -> Iterator[tuple[str, str, str, int]]:
        """(sku, warehouse, state, units) of the reserved and the sold, per place: the stock
        levels' start after a restart (restocks come on top, from the effect log)."""
        yield from ((sku, wh, RESERVED, units) for sku, wh, units in self._file.rows(
            "SELECT sku, warehouse, SUM(qty) FROM open_reservations GROUP BY sku, warehouse"))
        sold: dict[tuple[str, str], int] = {}
        for (payload,) in self._file.rows(
                "SELECT r.payload FROM effects r JOIN effects c ON c.key = r.key AND c.system = 'inventory'"
                " AND c.op = 'confirm' WHERE r.system = 'inventory' AND r.op = 'reserve'"):
            p = msgspec.json.decode(payload)
            sold[(p["sku"], p["warehouse"])] = sold.get((p["sku"], p["warehouse"]), 0) + p["qty"]
        yield from ((sku, wh, "sold", units) for (sku, wh), units in sold.items())


def _complete(file: StateFile) -> None:
    """Make the open table hold every open reservation of the file's effect rows.

    The retaining durable log writes the same effect rows but not this table (and clears
    the mark when it opens the file), so after it the table is rebuilt from those rows: a
    granted reserve with neither a confirm nor a release under its key. The mark is set
    last: a crash halfway only means rebuilding again.
    """
    if file.one("SELECT 1 FROM meta WHERE name = ?", (RESERVATIONS_KEPT,)) is not None:
        return
    file.setup("DELETE FROM open_reservations")
    file.setup("INSERT INTO open_reservations SELECT r.at, r.key, json_extract(r.payload, '$.sku'),"
               " json_extract(r.payload, '$.warehouse'), json_extract(r.payload, '$.qty')"
               " FROM effects r WHERE r.system = 'inventory' AND r.op = 'reserve'"
               " AND r.result = 'true' AND NOT EXISTS (SELECT 1 FROM effects s WHERE s.key = r.key"
               " AND s.system = 'inventory' AND s.op IN ('confirm', 'release'))")
    file.setup(f"INSERT INTO meta VALUES ('{RESERVATIONS_KEPT}', '1')")
