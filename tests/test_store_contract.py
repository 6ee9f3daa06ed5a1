"""One contract for every store adapter: the embedded SQLite file, the in-memory store and PostgreSQL.

The production adapters join the `store` fixture's parameters and must pass unchanged.
"""
from __future__ import annotations

from contextlib import asynccontextmanager

import anyio

import pytest

from oms_pipeline.adapters import postgres_store
from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.adapters.sqlite_store import SqliteStore
from oms_pipeline.ports import store as st
from oms_pipeline.ports.store import Checkpoint, NewOrder

from tests.support.postgres import fresh_postgres_database

pytestmark = pytest.mark.anyio

@asynccontextmanager
async def opened(param: str, tmp_path):
    if param == "postgres":
        async with fresh_postgres_database() as url:
            await postgres_store.migrate(url)
            yield postgres_store.PostgresStore(url)
        return
    yield MemoryStore() if param == "memory" else SqliteStore(str(tmp_path / "oms.sqlite3"))


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request, tmp_path):
    async with opened(request.param, tmp_path) as s:
        await s.open()
        yield s
        await s.close()


async def gather(*calls) -> list:
    """Await calls started together (in one turn of the loop), results in their order."""
    results: list = [None] * len(calls)

    async def one(i, call):
        results[i] = await call

    async with anyio.create_task_group() as tg:
        for i, call in enumerate(calls):
            tg.start_soon(one, i, call)
    return results


def new(no: str, ext: str | None = None, state: str = st.QUEUED, parent: str | None = None) -> NewOrder:
    return NewOrder(no, "app", ext or f"ext-{no}", "toc", state, "a", "IN_FULFILMENT", 100.0, b'{"x":1}', parent)


def cp(no: str, stage: str, state: str, to: str, **kw) -> Checkpoint:
    base = dict(order_no=no, from_stage=stage, outcome="next", reason="", at=101.0, state=state, stage=to,
                status="IN_FULFILMENT", attempts=0, wake_at=None, doc=b'{"x":2}')
    return Checkpoint(**{**base, **kw})


async def test_create_is_idempotent_on_source_and_external_id(store):
    assert await store.create([new("N1"), new("N2")]) == [("N1", True), ("N2", True)]
    assert await store.create([new("N3", ext="ext-N1")]) == [("N1", False)]
    assert await store.get("N3") is None
    assert (await store.get("N1")).state == st.QUEUED


async def test_find_external_names_the_order_taken_in_for_a_request(store):
    await store.create([new("N1")])
    assert await store.find_external("app", "ext-N1") == "N1"
    assert await store.find_external("app", "ext-N2") is None
    assert await store.find_external("web", "ext-N1") is None


async def test_duplicates_inside_one_batch_make_one_order(store):
    assert await store.create([new("N1", ext="same"), new("N2", ext="same")]) == [("N1", True), ("N1", False)]


async def test_checkpoint_moves_state_and_keeps_history(store):
    await store.create([new("N1")])
    await store.checkpoint([cp("N1", "a", st.QUEUED, "b")])
    await store.checkpoint([cp("N1", "b", st.PARKED, "b", outcome="park", reason="window full", wake_at=500.0)])
    got = await store.get("N1")
    assert (got.state, got.stage, got.wake_at, got.doc) == (st.PARKED, "b", 500.0, b'{"x":2}')
    assert [(h.stage, h.outcome, h.reason) for h in await store.history("N1")] == [
        ("intake", "created", ""), ("a", "next", ""), ("b", "park", "window full")]


async def test_a_checkpoint_carries_the_boundaries_passed_since_the_last_one(store):
    """Stages with checkpoint = false: their history rows come with the next checkpoint, in order,
    before its own, also through a compare-and-set."""
    await store.create([new("N1")])
    trail = (st.Step("a", "next", "", 101.0), st.Step("b", "skip", "not for it", 102.0))
    await store.checkpoint([cp("N1", "c", st.QUEUED, "d", at=103.0, trail=trail)])
    assert await store.checkpoint_if(cp("N1", "d", st.DONE, "@done", at=105.0,
                                        trail=(st.Step("e", "next", "", 104.0),)), st.QUEUED)
    assert [(h.stage, h.outcome, h.reason, h.at) for h in await store.history("N1")] == [
        ("intake", "created", "", 100.0), ("a", "next", "", 101.0), ("b", "skip", "not for it", 102.0),
        ("c", "next", "", 103.0), ("e", "next", "", 104.0), ("d", "next", "", 105.0)]


async def test_active_lists_queued_parked_and_waiting_orders_only(store):
    await store.create([new("N1"), new("N2"), new("N3", state=st.WAIT_PAY), new("N4")])
    await store.checkpoint([cp("N2", "a", st.DONE, "@done"), cp("N4", "a", st.PARKED, "a", wake_at=9.0)])
    assert sorted(o.order_no for o in await store.active()) == ["N1", "N3", "N4"]
    assert await store.counts() == {st.QUEUED: 1, st.DONE: 1, st.WAIT_PAY: 1, st.PARKED: 1}
    assert [o.order_no for o in await store.in_state(st.DONE)] == ["N2"]


async def test_split_children_are_stored_with_the_parent_checkpoint(store):
    await store.create([new("P")])
    children = (new("P-1", parent="P"), new("P-2", parent="P"))
    await store.checkpoint([cp("P", "split", st.SPLIT, "@split", outcome="split", children=children)])
    assert [c.order_no for c in await store.children("P")] == ["P-1", "P-2"]
    # A replayed split makes no second set of children.
    await store.checkpoint([cp("P", "split", st.SPLIT, "@split", outcome="split", children=children)])
    assert len(await store.children("P")) == 2


async def test_sequence_blocks_never_overlap(store):
    a = await store.next_block("order_no", 1000)
    b = await store.next_block("order_no", 1000)
    c = await store.next_block("other", 10)
    assert b == a + 1000 and c == 1


async def test_sqlite_survives_reopening(tmp_path):
    path = str(tmp_path / "oms.sqlite3")
    s = SqliteStore(path)
    await s.open()
    await s.create([new("N1")])
    await s.checkpoint([cp("N1", "a", st.QUEUED, "b")])
    await s.close()
    again = SqliteStore(path)
    await again.open()
    assert (await again.get("N1")).stage == "b"
    await again.close()


async def test_sqlite_groups_concurrent_writes_into_few_commits(tmp_path):
    import anyio
    s = SqliteStore(str(tmp_path / "oms.sqlite3"))
    await s.open()
    async with anyio.create_task_group() as tg:
        for i in range(500):
            tg.start_soon(s.create, [new(f"N{i}")])
    assert len(await s.in_state(st.QUEUED, limit=1000)) == 500
    assert s.commits < 100  # group commit: far fewer transactions than writes
    await s.close()


@pytest.mark.parametrize("writer", ["process", "loop"])
async def test_sqlite_writes_from_either_writer_are_read_back(tmp_path, writer):
    s = SqliteStore(str(tmp_path / "oms.sqlite3"), writer=writer)
    await s.open()
    await s.create([new("N1")])
    await s.checkpoint([cp("N1", "a", st.QUEUED, "b")])
    assert (await s.get("N1")).stage == "b"
    assert await s.checkpoint_if(cp("N1", "b", st.DONE, "@done"), st.QUEUED)
    await s.close()
    again = SqliteStore(str(tmp_path / "oms.sqlite3"), writer=writer)
    await again.open()
    assert (await again.get("N1")).state == st.DONE
    await again.close()


async def test_a_dead_sqlite_writer_process_is_replaced(tmp_path):
    """Killed (out of memory, by hand): what it had in hand fails as StoreUnavailable (the pipeline
    writes it again), and the next writes go to a new writer process."""
    s = SqliteStore(str(tmp_path / "oms.sqlite3"))
    await s.open()
    await s.create([new("N1")])
    s._writer._process.kill()
    s._writer._process.wait()
    for _ in range(2):  # the first write may still be sent to the dead one
        try:
            await s.checkpoint([cp("N1", "a", st.QUEUED, "b")])
        except st.StoreUnavailable:
            continue
        break
    assert (await s.get("N1")).stage == "b"
    assert await s.create([new("N2")]) == [("N2", True)]
    await s.close()


async def test_writes_sent_while_a_new_sqlite_writer_starts_go_to_that_one(tmp_path):
    import anyio
    s = SqliteStore(str(tmp_path / "oms.sqlite3"))
    await s.open()
    await s.create([new("N0")])
    s._writer._process.kill()
    s._writer._process.wait()
    await anyio.sleep(0.1)  # the loss is noticed: the next batches start one new writer
    async with anyio.create_task_group() as tg:
        for i in range(1, 2001):
            tg.start_soon(s.create, [new(f"N{i}")])
    assert len(await s.in_state(st.QUEUED, limit=3000)) == 2001
    await s.close()


async def test_search_filters_by_member_status_and_state_with_a_cursor(store):
    rows = [new(f"N{i}")._replace(member_id="M1" if i % 2 else "M2") for i in range(6)]
    await store.create(rows)
    await store.checkpoint([cp("N1", "a", st.DONE, "@done", status="DISPATCHED")])
    assert [o.order_no for o in await store.search(member="M1")] == ["N1", "N3", "N5"]
    assert [o.order_no for o in await store.search(member="M1", statuses=("DISPATCHED",))] == ["N1"]
    assert [o.order_no for o in await store.search(state=st.QUEUED, limit=2)] == ["N0", "N2"]
    assert [o.order_no for o in await store.search(state=st.QUEUED, limit=2, after="N2")] == ["N3", "N4"]


async def test_checkpoint_if_applies_only_in_the_expected_state(store):
    await store.create([new("N1", state=st.WAIT_PAY)])
    paid = cp("N1", "payment", st.QUEUED, "a", outcome="release", status="PAID")
    timeout = cp("N1", "payment", st.CANCELLED, "@cancelled", outcome="pay_timeout", status="CANCELLED")
    assert await store.checkpoint_if(paid, st.WAIT_PAY)
    assert not await store.checkpoint_if(timeout, st.WAIT_PAY)  # the payment won: the timeout changes nothing
    got = await store.get("N1")
    assert (got.state, got.status) == (st.QUEUED, "PAID")
    assert [h.outcome for h in await store.history("N1")] == ["created", "release"]


async def test_compare_and_sets_asked_at_once_apply_in_the_order_asked(store):
    """A payment and its deadline racing in one instant (one group commit on PostgreSQL): the
    first asked wins, the second sees its state and changes nothing; other orders are apart."""
    await store.create([new("N1", state=st.WAIT_PAY), new("N2", state=st.WAIT_PAY), new("N3")])
    paid = cp("N1", "payment", st.QUEUED, "a", outcome="release", status="PAID")
    timeout = cp("N1", "payment", st.CANCELLED, "@cancelled", outcome="pay_timeout", status="CANCELLED",
                 events=(st.Event("N1", "WAIT_PAY", "CANCELLED", 101.0),))
    other = cp("N2", "payment", st.CANCELLED, "@cancelled", outcome="pay_timeout", status="CANCELLED")
    stale = cp("N3", "payment", st.CANCELLED, "@cancelled", outcome="pay_timeout", status="CANCELLED")
    results = await gather(store.checkpoint_if(paid, st.WAIT_PAY), store.checkpoint_if(timeout, st.WAIT_PAY),
                           store.checkpoint_if(other, st.WAIT_PAY), store.checkpoint_if(stale, st.WAIT_PAY))
    assert results == [True, False, True, False]
    got = await gather(*(store.get(no) for no in ("N1", "N2", "N3", "N4", "N1")))
    assert [(g.state, g.status) if g else None for g in got] == [
        (st.QUEUED, "PAID"), (st.CANCELLED, "CANCELLED"), (st.QUEUED, "IN_FULFILMENT"), None, (st.QUEUED, "PAID")]
    assert [h.outcome for h in await store.history("N1")] == ["created", "release"]
    assert await store.events("N1") == []  # the losing timeout's event was not written


@pytest.mark.parametrize("param", ["sqlite", "postgres"])
async def test_status_changes_written_a_row_each_by_earlier_versions_are_read_first(param, tmp_path):
    """Earlier versions wrote a row per status change to order_events; now they are packed into the
    checkpoint's history row. An order upgraded mid-way lists the old rows, then the packed ones."""
    legacy = "INSERT INTO order_events (order_no, from_status, to_status, at) VALUES ('N1', '', 'CREATED', 100.0)"
    async with opened(param, tmp_path) as s:
        if param == "sqlite":
            import sqlite3

            from oms_pipeline.adapters.sqlite_store import migrate
            conn = sqlite3.connect(tmp_path / "oms.sqlite3", isolation_level=None)
            migrate(conn)
            conn.execute(legacy)
            conn.close()
        else:
            import asyncpg
            conn = await asyncpg.connect(s.url)
            await conn.execute(legacy)
            await conn.close()
        await s.open()
        try:
            await s.create([new("N1")])
            await s.checkpoint([cp("N1", "a", st.QUEUED, "b", events=(st.Event("N1", "CREATED", "PAID", 101.0),
                                                                      st.Event("N1", "PAID", "SHIPPED", 102.0)))])
            await s.checkpoint([cp("N1", "b", st.DONE, "@done", at=103.0,
                                   events=(st.Event("N1", "SHIPPED", "DONE", 103.0),))])
            assert await s.events("N1") == [st.Event("N1", "", "CREATED", 100.0),
                                            st.Event("N1", "CREATED", "PAID", 101.0),
                                            st.Event("N1", "PAID", "SHIPPED", 102.0),
                                            st.Event("N1", "SHIPPED", "DONE", 103.0)]
            assert [h.stage for h in await s.history("N1")] == ["intake", "a", "b"]
        finally:
            await s.close()


async def test_outbox_holds_events_and_commands_until_published(store):
    event = st.Event("N1", "IN_FULFILMENT", "CANCELLED", 101.0)
    await store.create([new("N1")])
    await store.checkpoint([cp("N1", "a", st.CANCELLED, "@cancelled", events=(event,),
                               commands=(st.Command("fms.refund", "N1:refund:1", b'{"amount":5}'),))])
    assert await store.outbox_pending() == 2
    rows = await store.outbox_claim("relay-1", 10, 30.0, 200.0)
    assert [(r.order_no, r.topic, r.key) for r in rows] == [("N1", "order.cancelled", ""),
                                                             ("N1", "fms.refund", "N1:refund:1")]
    assert rows[1].payload == b'{"amount":5}'
    assert rows[0].id < rows[1].id
    # Claimed: another relay gets nothing within the lease, everything after it.
    assert await store.outbox_claim("relay-2", 10, 30.0, 210.0) == []
    assert len(await store.outbox_claim("relay-2", 10, 30.0, 240.0)) == 2
    await store.outbox_done([rows[0].id])
    assert await store.outbox_pending() == 1
    assert [r.key for r in await store.outbox_claim("relay-1", 10, 30.0, 300.0)] == ["N1:refund:1"]


async def test_checkpoint_if_writes_its_outbox_rows_only_when_it_applies(store):
    await store.create([new("N1")])
    command = (st.Command("fms.refund", "N1:refund:1", b"{}"),)
    assert not await store.checkpoint_if(cp("N1", "a", st.DONE, "@done", commands=command), st.PARKED)
    assert await store.outbox_pending() == 0
    assert await store.checkpoint_if(cp("N1", "a", st.DONE, "@done", commands=command), st.QUEUED)
    assert await store.outbox_pending() == 1


def reverse(no: str, order_no: str = "N1", key: str = "req-1", state: str = "requested") -> st.ReverseRecord:
    return st.ReverseRecord(no, order_no, key, "cancel", state, 100.0, 100.0, b'{"r":1}')


async def test_reverse_orders_are_unique_per_order_and_request_key(store):
    await store.create([new("N1")])
    assert await store.reverse_create(reverse("R1")) == ("R1", True)
    assert await store.reverse_create(reverse("R2")) == ("R1", False)
    assert await store.reverse_create(reverse("R3", key="req-2")) == ("R3", True)
    assert [r.reverse_no for r in await store.reverse_of("N1")] == ["R1", "R3"]
    assert await store.reverse_get("R2") is None


async def test_reverse_orders_change_with_the_checkpoint_and_closed_ones_leave_the_open_list(store):
    await store.create([new("N1")])
    await store.reverse_create(reverse("R1"))
    await store.reverse_create(reverse("R3", key="req-2"))
    done = reverse("R1", state="done")._replace(updated_at=105.0, doc=b'{"r":2}')
    await store.checkpoint([cp("N1", "reverse", st.CANCELLED, "@cancelled", reverse=(done,))])
    assert await store.reverse_get("R1") == done
    assert [r.reverse_no for r in await store.reverse_open()] == ["R3"]


async def test_overdue_lists_parked_and_waiting_orders_by_wake_time(store):
    await store.create([new("N1", state=st.WAIT_PAY)._replace(wake_at=150.0), new("N2"),
                        new("N3", state=st.WAIT_PAY)._replace(wake_at=300.0)])
    await store.checkpoint([cp("N2", "a", st.PARKED, "a", wake_at=120.0)])
    assert [o.order_no for o in await store.overdue(200.0)] == ["N2", "N1"]
    assert [o.order_no for o in await store.overdue(200.0, limit=1)] == ["N2"]
    await store.checkpoint([cp("N2", "a", st.QUEUED, "b")])
    assert [o.order_no for o in await store.overdue(1000.0)] == ["N1", "N3"]


async def test_stranded_lists_own_queued_orders_unwritten_since_a_time_by_number(store):
    store.own("A", 10.0)
    await store.create([new("N1"), new("N2"), new("N3"), new("N4", state=st.WAIT_PAY)._replace(wake_at=150.0)])
    await store.checkpoint([cp("N2", "a", st.QUEUED, "b", at=130.0), cp("N3", "a", st.DONE, "@done")])
    assert [o.order_no for o in await store.stranded(120.0)] == ["N1"]  # N2 written since; N3 ended; N4 waits
    assert [o.order_no for o in await store.stranded(140.0)] == ["N1", "N2"]
    assert [o.order_no for o in await store.stranded(140.0, limit=1, after="N1")] == ["N2"]
    store.own("B", 10.0)
    assert await store.stranded(140.0) == []  # A's orders are A's business


async def test_an_order_another_holder_took_over_is_not_checkpointed_by_its_old_owner(store):
    store.own("A", 10.0)
    await store.renew(100.0)  # A alive until 110
    await store.create([new("N1"), new("N2")])
    store.own("B", 10.0)
    await store.renew(100.0)
    assert await store.checkpoint([cp("N1", "a", st.QUEUED, "b")]) == {"N1"}  # A's, and A is alive
    assert [h.outcome for h in await store.history("N1")] == ["created"]
    assert [o.order_no for o in await store.active()] == []  # a live owner's queued orders: not ours
    assert await store.take_over(105.0) == []
    assert sorted(o.order_no for o in await store.take_over(111.0)) == ["N1", "N2"]  # A presumed dead
    assert await store.take_over(111.0) == []
    assert await store.checkpoint([cp("N1", "a", st.QUEUED, "b", at=112.0)]) == set()
    store.own("A", 10.0)  # A was only slow: its late completions are refused
    assert await store.checkpoint([cp("N1", "b", st.QUEUED, "c", at=113.0), cp("N2", "a", st.QUEUED, "b")]) \
        == {"N1", "N2"}
    assert (await store.get("N1")).stage == "b"
    # A compare-and-set (a payment, a timeout) takes an order over whoever owned it.
    assert await store.checkpoint_if(cp("N1", "b", st.PARKED, "b", at=114.0, wake_at=200.0), st.QUEUED)
    assert await store.checkpoint([cp("N1", "b", st.PARKED, "b", at=115.0, wake_at=200.0)]) == set()
    store.own("B", 10.0)
    assert await store.claim("N1", st.PARKED, 201.0)  # its wake-up came to B
    assert not await store.claim("N1", st.QUEUED, 201.0)
    store.own("A", 10.0)
    assert await store.checkpoint([cp("N1", "b", st.QUEUED, "c", at=202.0)]) == {"N1"}


async def test_take_over_takes_the_queued_orders_of_every_lapsed_or_unknown_owner_and_no_other(store):
    owners = {"A": 200.0, "C": None, "D": 90.0, "E": 200.0}  # alive until (None: never renewed)
    for n, (owner, alive_until) in enumerate(owners.items()):
        store.own(owner, 10.0)
        if alive_until is not None:
            await store.renew(alive_until - 10.0)
        await store.create([new(f"{owner}1"), new(f"{owner}2")])
        if owner == "D":
            await store.checkpoint([cp("D2", "a", st.DONE, "@done", at=95.0)])  # ended: nobody's to take
    store.own("B", 10.0)
    await store.renew(100.0)
    assert sorted(o.order_no for o in await store.take_over(100.0)) == ["C1", "C2", "D1"]
    assert await store.take_over(100.0) == []
    assert sorted(o.order_no for o in await store.take_over(300.0, limit=3)) == ["A1", "A2", "E1"]


async def test_a_live_instance_keeps_its_orders_and_a_restarted_one_resumes_them(store):
    store.own("A", 10.0)
    await store.create([new("N1")])
    await store.renew(150.0)  # A alive until 160
    store.own("B", 10.0)
    assert await store.take_over(155.0) == []
    store.own("A", 10.0)  # A restarted under the same name: its orders are still its own
    assert [o.order_no for o in await store.active()] == ["N1"]
