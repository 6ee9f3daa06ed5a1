"""The effect log kept in its file (`effect_log` with `retain_effects = false`): keys, results and
the inventory's reservations in SQLite, nothing per key in the process."""
from __future__ import annotations

import sqlite3
import tracemalloc
from pathlib import Path

import anyio
import pytest

from oms_pipeline.adapters.simulated import (
    EffectLog, SimSettings, build_simulated_ports, read_duplicates, read_effects,
)
from oms_pipeline.adapters.simulated.reservations import FileReservations
from oms_pipeline.clock import VirtualClock
from oms_pipeline.outcome import PermanentError
from oms_pipeline.ports.downstream import Occupation, StockLevel

START = 1_700_000_000.0
STOCK = {"inventory": {"stock": {"WH1": {"A": 10}}, "default_stock": 0}, "erp": {"stock": {"WH1": {"A": 5}}}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def in_file(path: Path) -> EffectLog:
    return EffectLog(str(path), retain=False)


def ports_of(log: EffectLog, clock: VirtualClock | None = None):
    return build_simulated_ports(SimSettings.from_mapping(STOCK), clock or VirtualClock(START), log)


def rows(path: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.anyio
async def test_a_repeated_key_returns_the_first_result_from_the_file_and_counts_a_duplicate(tmp_path: Path) -> None:
    path = tmp_path / "effects.db"
    async with in_file(path) as log:
        ports = ports_of(log)
        first = await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 3)])
        again = await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 4)])  # other arguments: ignored
        assert isinstance(again, Occupation) and again == first
        assert ports.erp.available("A", "WH1") == 2
        voucher = await ports.finance.push_voucher("O1:voucher", "O1", 1999, "online")
        assert await ports.finance.push_voucher("O1:voucher", "O1", 1999, "online") == voucher
        assert log.duplicates == {"erp": 1, "finance": 1} and log.count() == 2

    async with in_file(path) as log:  # a restart: the file answers
        ports = ports_of(log)
        assert await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 1)]) == first
        assert await ports.finance.push_voucher("O1:voucher", "O1", 1, "online") == voucher
        assert log.duplicates == {"erp": 2, "finance": 2} and log.count() == 2
        assert await ports.finance.push_voucher("O2:voucher", "O2", 5, "online") != voucher  # ids not reused
    assert read_duplicates(str(path)) == {"erp": 2, "finance": 2}
    assert [(key, op) for key, _, op, _, _ in read_effects(str(path))] == [
        ("O1:erp_stock", "occupy"), ("O1:voucher", "push_voucher"), ("O2:voucher", "push_voucher")]


@pytest.mark.anyio
async def test_concurrent_calls_with_one_key_apply_once_and_calls_share_commits(tmp_path: Path) -> None:
    async with in_file(tmp_path / "effects.db") as log:
        ports = ports_of(log)
        results = []

        async def call(i: int) -> None:
            results.append(await ports.tms.request_waybill(f"O{i % 10}:waybill", f"O{i % 10}", "WH1", "ambient"))

        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(call, i)
        assert len(set(results)) == 10 and log.count("tms") == 10 and log.duplicates["tms"] == 990
        assert log.commits <= 50, f"{log.commits} commits for 1000 calls: not grouped"


@pytest.mark.anyio
async def test_reservations_live_in_the_file_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "effects.db"
    clock = VirtualClock(START)
    async with in_file(path) as log:
        inv = ports_of(log, clock).inventory
        for i in range(5):
            assert await inv.reserve(f"O{i}:reserve:A@WH1", "A", "WH1", 2)
            clock.advance(10)
        assert await inv.reserve("O9:reserve:A@WH1", "A", "WH1", 1) is False  # nothing left
        await inv.confirm("O1:reserve:A@WH1")
        await inv.release("O2:reserve:A@WH1")
        await inv.release("O7:reserve:A@WH1")  # a release before its reserve: a tombstone
        await inv.restock("O1:restock:1", "A", "WH1", 1)
        before = inv.level("A", "WH1"), await inv.open_reservations(float("inf"))
        assert before[0] == StockLevel(sellable=3, reserved=6, sold=1)
        assert [r.key for r in before[1]] == ["O0:reserve:A@WH1", "O3:reserve:A@WH1", "O4:reserve:A@WH1"]
        stored = rows(path, "SELECT key FROM open_reservations ORDER BY key")
        assert [key for (key,) in stored] == [r.key for r in before[1]]

    async with in_file(path) as log:
        inv = ports_of(log, VirtualClock(START + 3600)).inventory
        assert (inv.level("A", "WH1"), await inv.open_reservations(float("inf"))) == before
        page = await inv.open_reservations(START + 30, limit=1)
        assert [(r.key, r.created_at) for r in page] == [("O0:reserve:A@WH1", START)]
        assert await inv.reserve("O0:reserve:A@WH1", "A", "WH1", 2) is True  # the first answer
        assert await inv.reserve("O7:reserve:A@WH1", "A", "WH1", 1) is False  # the tombstone holds
        with pytest.raises(PermanentError, match="is sold"):
            await inv.release("O1:reserve:A@WH1")
        with pytest.raises(PermanentError, match="is released"):
            await inv.confirm("O2:reserve:A@WH1")
        await inv.confirm("O3:reserve:A@WH1")
        await inv.release("O4:reserve:A@WH1")
        assert inv.level("A", "WH1") == StockLevel(sellable=5, reserved=2, sold=3)
        assert [r.key for r in await inv.open_reservations(float("inf"))] == ["O0:reserve:A@WH1"]
        assert log.duplicates == {"inventory": 1}


@pytest.mark.anyio
async def test_nothing_per_key_stays_in_memory(tmp_path: Path) -> None:
    async with in_file(tmp_path / "effects.db") as log:
        ports = ports_of(log)
        inv = ports.inventory
        assert isinstance(inv._reservations, FileReservations) and not isinstance(log._results, dict)

        async def orders(first: int, n: int) -> None:
            for i in range(first, first + n):
                key = f"O{i}:reserve:A@WH1"
                await inv.reserve(key, "A", "WH1", 1)
                await inv.release(key)
                await inv.release(key)  # a duplicate
                await ports.notification.send(f"O{i}:notify", "sms", "13812345678", "paid", {})

        await orders(0, 200)  # warm up: statement caches, the levels of the one place
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            await orders(200, 3000)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
        # A dict entry with its key and result is ~200 bytes; 9,000 new keys kept would be ~2 MB.
        assert grown < 100_000, f"{grown} bytes more after 12,000 calls: something keeps keys"
        assert log._effects == [] and log._pending == {}
        assert log.count() == 3200 * 3 and log.duplicates == {"inventory": 3200}
        assert inv.level("A", "WH1") == StockLevel(sellable=10, reserved=0, sold=0)


async def some_reservations(inv) -> None:
    for i in range(4):
        await inv.reserve(f"O{i}:reserve:A@WH1", "A", "WH1", 2)
    await inv.confirm("O1:reserve:A@WH1")
    await inv.release("O2:reserve:A@WH1")


EXPECTED = StockLevel(sellable=4, reserved=4, sold=2), ["O0:reserve:A@WH1", "O3:reserve:A@WH1"]


@pytest.mark.anyio
async def test_one_file_serves_both_durable_modes_one_after_the_other(tmp_path: Path) -> None:
    path = tmp_path / "effects.db"
    async with EffectLog(str(path)) as log:  # retaining: its reservations are in memory and in its effects
        await some_reservations(ports_of(log).inventory)
    async with in_file(path) as log:  # the open ones are rebuilt from the effect rows
        inv = ports_of(log).inventory
        assert (inv.level("A", "WH1"), [r.key for r in await inv.open_reservations(float("inf"))]) == EXPECTED
        await inv.release("O3:reserve:A@WH1")
    async with EffectLog(str(path)) as log:  # and back: the retaining log replays every effect
        inv = ports_of(log).inventory
        assert inv.level("A", "WH1") == StockLevel(sellable=6, reserved=2, sold=2)
        await inv.confirm("O0:reserve:A@WH1")
    async with in_file(path) as log:
        inv = ports_of(log).inventory
        assert inv.level("A", "WH1") == StockLevel(sellable=6, reserved=0, sold=4)
        assert await inv.open_reservations(float("inf")) == []


def test_the_file_needs_open(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        ports_of(in_file(tmp_path / "e.db"))
