"""What only the PostgreSQL store has: migrations run by an operator, group commit
over a pool, retries of stale statements. The shared behaviour is in test_store_contract.py."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from oms_pipeline import sqlfiles
from oms_pipeline.adapters.postgres_store import MigrationNeeded, PostgresStore, _apply, migrate
from oms_pipeline.ports import store as st

from tests.support.postgres import fresh_postgres_database

from .test_store_contract import cp, new

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parent.parent
ALL = [f"{v:03d}_{n}" for v, n, _ in sqlfiles.migrations("postgres")]


@pytest.fixture
async def url():
    async with fresh_postgres_database() as url:
        yield url


@pytest.fixture
async def store(url):
    await migrate(url)
    s = PostgresStore(url)
    await s.open()
    yield s
    await s.close()


async def test_open_on_an_unmigrated_database_says_to_run_oms_migrate(url):
    with pytest.raises(MigrationNeeded, match=r"is not migrated \(missing 001_orders, .*\): run `oms migrate`"):
        await PostgresStore(url).open()


async def test_migrate_applies_every_migration_once(url):
    assert await migrate(url) == ALL
    assert await migrate(url) == []


async def test_two_instances_migrating_at_once_apply_each_migration_once(url):
    first, second = await asyncio.gather(migrate(url), migrate(url))
    assert sorted(first + second) == ALL


async def test_order_keys_are_filled_from_the_orders_of_a_database_migrated_before_them(url):
    # Migration 012 moves intake idempotency and the member look-up to order_keys: the orders
    # already stored keep both.
    conn = await asyncpg.connect(url)
    try:
        for version, name, sql in sqlfiles.migrations("postgres"):
            if version < 12:
                await _apply(conn, version, name, sql)
        await conn.execute("INSERT INTO orders (order_no, source, external_id, kind, state, stage, status,"
                           " member_id, doc, created_at, updated_at) VALUES ('N1', 'app', 'E1', 'toc',"
                           " 'queued', 'a', 'PAID', 'M1', '{}', 1, 1)")
    finally:
        await conn.close()
    assert (await migrate(url))[0] == "012_order_keys"
    store = PostgresStore(url)
    await store.open()
    try:
        assert await store.find_external("app", "E1") == "N1"
        assert await store.create([new("N2")._replace(external_id="E1")]) == [("N1", False)]
        assert [o.order_no for o in await store.search(member="M1")] == ["N1"]
    finally:
        await store.close()


async def test_concurrent_checkpoints_share_few_commits(store):
    await store.create([new(f"N{i:04d}") for i in range(1000)])
    before = store.commits
    await asyncio.gather(*(store.checkpoint([cp(f"N{i:04d}", "a", st.PARKED, "b", wake_at=float(i))])
                           for i in range(1000)))
    assert store.commits - before < 50  # group commit: far fewer transactions than calls
    assert (await store.counts()) == {st.PARKED: 1000}
    assert (await store.get("N0999")).wake_at == 999.0


async def test_store_writers_from_the_config_commit_side_by_side(url):
    from oms_pipeline import app, config
    await migrate(url)
    s = app._store_for(url, config.from_mapping({"store": {"url": url, "writers": 4}}))
    assert isinstance(s, PostgresStore) and s.writers == 4
    await s.open()
    try:
        await s.create([new(f"N{i:04d}") for i in range(400)])
        # Callers arriving while batches are being written: up to four transactions at once.
        async def stage(i: int) -> None:
            await asyncio.sleep(i % 7 * 0.002)
            await s.checkpoint([cp(f"N{i:04d}", "a", st.QUEUED, "b")])
            await s.checkpoint([cp(f"N{i:04d}", "b", st.DONE, "@done")])
        await asyncio.gather(*(stage(i) for i in range(400)))
        assert await s.counts() == {st.DONE: 400}
        assert [h.stage for h in await s.history("N0399")] == ["intake", "a", "b"]
    finally:
        await s.close()


async def test_an_order_checkpointed_twice_in_one_batch_ends_at_the_last_record(store):
    await store.create([new("N1")])
    await asyncio.gather(store.checkpoint([cp("N1", "a", st.QUEUED, "b"), cp("N1", "b", st.QUEUED, "c")]),
                         store.checkpoint([cp("N1", "c", st.PARKED, "d", wake_at=5.0)]))
    got = await store.get("N1")
    assert (got.state, got.stage, got.wake_at) == (st.PARKED, "d", 5.0)
    assert [h.stage for h in await store.history("N1")] == ["intake", "a", "b", "c"]


async def test_an_order_number_already_taken_fails_the_create_loudly(store):
    # Only a fault gives two new orders one number (two instances with one instance id). The
    # create fails; it never answers the new order with the other order's number as a duplicate.
    await store.create([new("N1")])
    with pytest.raises(asyncpg.UniqueViolationError, match="orders_pkey"):
        await store.create([new("N1", ext="another")])
    assert await store.find_external("app", "another") is None  # its key went with the failed batch
    assert await store.create([new("N2", ext="another")]) == [("N2", True)]  # its retry gets a number of its own
    assert (await store.get("N1")).doc == b'{"x":1}'


@pytest.mark.parametrize("external_id", ["", "has\x1fa unit separator", "\x1e", "has\x1ea record separator"])
async def test_text_that_looks_like_the_joined_encoding_round_trips(store, external_id):
    # One-row batches (a lone empty string), separators inside a value (the batch goes as arrays).
    order = new("N1")._replace(external_id=external_id, member_id=external_id)
    assert await store.create([order]) == [("N1", True)]
    assert await store.create([new("N2")._replace(external_id=external_id)]) == [("N1", False)]  # a duplicate
    assert await store.find_external("app", external_id) == "N1"
    await store.checkpoint([cp("N1", "a", st.QUEUED, external_id or "b", status=external_id or "PAID")])
    got = await store.get("N1")
    assert (got.stage, got.status, got.parent_no) == (external_id or "b", external_id or "PAID", None)
    assert [o.order_no for o in await store.search(member=external_id)] == ["N1"]


async def test_open_states_and_statuses_are_found_by_index_final_ones_by_order_number(store, url):
    # Migration 011: the state and status indexes hold only open orders, so the last write of an
    # order (done, dispatched) takes no entry in them; look-ups still find every order.
    await store.create([new(f"N{i:04d}") for i in range(3000)])
    await store.checkpoint([cp(f"N{i:04d}", "a", st.MANUAL, "a", status="MANUAL_REVIEW") if i % 500 == 0 else
                            cp(f"N{i:04d}", "a", st.DONE, "@done", status="DISPATCHED") for i in range(3000)])
    manual = [f"N{i:04d}" for i in range(0, 3000, 500)]
    assert [o.order_no for o in await store.in_state(st.MANUAL)] == manual
    assert [o.order_no for o in await store.search(statuses=("MANUAL_REVIEW",))] == manual
    assert [o.order_no for o in await store.search(state=st.MANUAL, limit=2, after="N0500")] == manual[2:4]
    dispatched = [o.order_no for o in await store.search(statuses=("DISPATCHED",), limit=3, after="N0499")]
    assert dispatched == ["N0501", "N0502", "N0503"]
    assert len(await store.in_state(st.DONE, limit=5000)) == 3000 - len(manual)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ANALYZE orders; SET plan_cache_mode = force_custom_plan")
        plan = lambda query, *args: conn.fetchval(f"EXPLAIN (FORMAT JSON) {sqlfiles.queries('postgres')[query]}", *args)
        assert "orders_by_state" in await plan("orders_in_state", st.MANUAL, "", 100)
        assert "orders_by_status" in await plan("search_orders", "", ["MANUAL_REVIEW"], "", "", 100)
        assert "orders_by_state" not in await plan("orders_in_state", st.DONE, "", 100)  # most rows: by number
        assert "order_keys_by_member" in await plan("search_orders", "M1", [], "", "", 100)
    finally:
        await conn.close()


async def test_events_are_written_with_their_checkpoint_in_order(store):
    created = new("N1")._replace(events=(st.Event("N1", "", "CREATED", 100.0),))
    await store.create([created])
    await store.checkpoint([cp("N1", "a", st.QUEUED, "b", events=(st.Event("N1", "CREATED", "PAID", 101.0),
                                                                  st.Event("N1", "PAID", "SHIPPED", 102.0)))])
    assert [e.to_status for e in await store.events("N1")] == ["CREATED", "PAID", "SHIPPED"]


async def test_a_schema_change_while_open_is_retried_not_failed(store, url):
    await store.create([new("N1")])  # prepares the statement whose result type changes next
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ALTER TABLE orders ALTER COLUMN order_no TYPE varchar(64)")
    finally:
        await conn.close()
    assert await store.create([new("N2")]) == [("N2", True)]


async def test_oms_migrate_applies_then_reports_up_to_date(url, tmp_path):
    config = tmp_path / "oms.toml"
    config.write_text(f'[store]\nurl = "{url}"\n')
    first = _oms("migrate", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == [word for name in ALL for word in ("applied", name)]
    again = _oms("migrate", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "up to date"
    daemon_store = PostgresStore(url)
    await daemon_store.open()  # the daemon now finds its schema
    await daemon_store.close()


def test_oms_migrate_on_an_unreachable_database_fails_with_one_line(tmp_path):
    config = tmp_path / "oms.toml"
    config.write_text('[store]\nurl = "postgresql://postgres@127.0.0.1:1/nothing"\n')
    done = _oms("migrate", "--config", str(config))
    assert done.returncode == 1
    assert done.stderr.startswith("oms: ") and len(done.stderr.strip().splitlines()) == 1


def _oms(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMS__")}
    return subprocess.run([sys.executable, "-m", "oms_pipeline.cli", *args], check=False, capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)
