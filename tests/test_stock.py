"""Stock at intake (oms_pipeline/stock.py) on the simulated inventory: reserve all or nothing,
confirm, give back on cancel, and the reconciler that settles what nobody settled."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import anyio
import orjson
import pytest

from oms_pipeline import app as app_module
from oms_pipeline import config, states
from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.adapters.simulated import EffectLog, SimSettings, build_simulated_ports
from oms_pipeline.clock import VirtualClock
from oms_pipeline.order import Address, Amounts, Line, Order, encode
from oms_pipeline.outcome import PermanentError
from oms_pipeline.ports import store as st
from oms_pipeline.ports.store import NewOrder
from oms_pipeline.commands import apply
from oms_pipeline.settlement import cancel_everything
from oms_pipeline.stock import Stock, reservation_key
from stages.split import _child_stock

pytestmark = pytest.mark.anyio

START = 1_700_000_000.0
ROUTES = Path(__file__).resolve().parent.parent / "config" / "routes.toml"


def sim(stock: dict, clock: VirtualClock | None = None, log: EffectLog | None = None):
    clock = clock or VirtualClock(START)
    log = log if log is not None else EffectLog()
    table = {"inventory": {"stock": stock, "default_stock": 0}}
    return build_simulated_ports(SimSettings.from_mapping(table), clock, log).inventory, clock, log


def make_stock(inventory, clock, store=None, **stock_settings) -> Stock:
    return Stock(inventory, store or MemoryStore(), clock, config.from_mapping({"stock": stock_settings}))


def line(no: int, sku: str, qty: int, warehouse: str = "WH1", **kw) -> Line:
    return Line(line_no=no, sku=sku, qty=qty, unit_price=100, warehouse=warehouse, **kw)


def order(no: str, *lines: Line, **kw) -> Order:
    return Order(order_no=no, source="app", external_id=f"ext-{no}", kind="toc", member_id="M1",
                 consignee=Address(name="n", phone="13800000000", province="p", city="c"),
                 lines=list(lines), amounts=Amounts(payable=100), **kw)


async def put(store: MemoryStore, o: Order, state: str) -> None:
    await store.create([NewOrder(o.order_no, o.source, o.external_id, o.kind, state, "notify_paid", o.status,
                                 START, encode(o), o.parent_no)])


def levels(inventory, sku: str, warehouse: str = "WH1") -> tuple[int, int, int]:
    level = inventory.level(sku, warehouse)
    return level.sellable, level.reserved, level.sold


# -- reserve ---------------------------------------------------------------------------------

async def test_reserve_is_all_or_nothing():
    inventory, clock, _ = sim({"WH1": {"A": 5, "B": 1}})
    stock = make_stock(inventory, clock)
    o = order("O1", line(1, "A", 3), line(2, "B", 2))
    assert await stock.reserve(o) == "out of stock: B@WH1"
    assert levels(inventory, "A") == (5, 0, 0) and levels(inventory, "B") == (1, 0, 0)
    assert await inventory.open_reservations(float("inf")) == []
    assert "stock" not in o.results


async def test_only_physical_warehouse_lines_hold_stock_one_reservation_per_place():
    inventory, clock, log = sim({"WH1": {"A": 10, "BDL-1": 5}, "WH2": {"A": 10}})
    stock = make_stock(inventory, clock)
    o = order("O1", line(1, "A", 2), line(2, "A", 1), line(3, "A", 1, "WH2"),
              line(4, "GC-0100", 1, "", virtual=True),  # virtual: no warehouse stock, virtual outbound
              line(5, "S", 1, "", supplier="SUP-01"),  # drop-ship: the supplier's own stock
              line(6, "BDL-1", 2, bundle=True),  # a bundle holds its own SKU
              line(7, "X", 1, ""))  # no warehouse: no stock location
    assert await stock.reserve(o) == ""
    reserved = {r.key: r.qty for r in await inventory.open_reservations(float("inf"))}
    assert reserved == {"O1:reserve:A@WH1": 3, "O1:reserve:A@WH2": 1, "O1:reserve:BDL-1@WH1": 2}
    assert o.results["stock"] == {"lines": {"1": ["A", "WH1", 2], "2": ["A", "WH1", 1], "3": ["A", "WH2", 1],
                                            "6": ["BDL-1", "WH1", 2]}}
    assert levels(inventory, "A") == (7, 3, 0)
    assert {e.op for e in log.applied("inventory")} == {"reserve"}


async def test_confirm_makes_the_reservation_a_sale_once():
    inventory, clock, log = sim({"WH1": {"A": 5}})
    stock = make_stock(inventory, clock)
    o = order("O1", line(1, "A", 2))
    await stock.reserve(o)
    await stock.confirm(o)
    await stock.confirm(o)  # a replay: the key makes it once
    assert levels(inventory, "A") == (3, 0, 2)
    assert log.duplicates == {"inventory": 1}


async def test_a_release_for_a_refused_or_duplicate_order_gives_everything_back():
    inventory, clock, _ = sim({"WH1": {"A": 5}})
    stock = make_stock(inventory, clock)
    o = order("O1", line(1, "A", 2))
    await stock.reserve(o)
    await stock.release(o)
    assert levels(inventory, "A") == (5, 0, 0)


# -- give back on cancel (settlement commands, applied as the relay applies them) -------------

async def cancel(o: Order, inventory) -> list:
    commands = cancel_everything(o, "test cancel")
    ports = SimpleNamespace(inventory=inventory)
    for c in commands:
        await apply(ports, c.topic, c.key, orjson.loads(c.payload))
    return commands


async def test_a_cancel_before_payment_releases_the_reservation():
    inventory, clock, _ = sim({"WH1": {"A": 5}})
    stock = make_stock(inventory, clock)
    o = order("O1", line(1, "A", 2), timestamps={states.WAIT_PAY: START, states.CANCELLED: START + 600})
    await stock.reserve(o)
    await cancel(o, inventory)
    assert levels(inventory, "A") == (5, 0, 0)


@pytest.mark.parametrize("confirmed", [True, False], ids=["confirmed", "confirm-lost"])
async def test_a_cancel_after_the_start_restocks_the_sale(confirmed):
    inventory, clock, log = sim({"WH1": {"A": 5}})
    stock = make_stock(inventory, clock)
    o = order("O1", line(1, "A", 2), timestamps={states.PAID: START, states.IN_FULFILMENT: START})
    await stock.reserve(o)
    if confirmed:
        await stock.confirm(o)
    commands = await cancel(o, inventory)
    assert levels(inventory, "A") == (5, 0, 0)
    assert ("restock", "O1:cancel:restock:1") in {(e.op, e.key) for e in log.applied("inventory")}
    ports = SimpleNamespace(inventory=inventory)
    for c in commands:  # delivered twice (at least once): nothing more
        await apply(ports, c.topic, c.key, orjson.loads(c.payload))
    assert await cancel(o, inventory) == []  # and cancelled twice: nothing owed any more
    assert levels(inventory, "A") == (5, 0, 0)


async def test_a_split_child_gives_back_what_its_own_lines_hold():
    inventory, clock, _ = sim({"WH1": {"A": 5, "BDL-1": 5}, "WH2": {"B": 5}})
    stock = make_stock(inventory, clock)
    parent = order("P1", line(1, "A", 2), line(2, "B", 1, "WH2"), line(3, "BDL-1", 2, bundle=True),
                   timestamps={states.IN_FULFILMENT: START})
    await stock.reserve(parent)
    await stock.confirm(parent)
    # child 1: line 1 and the components `fill` made of bundle line 3, plus a gift line (holds nothing)
    child = order("P1-1", line(1, "A", 2), line(4, "C1", 2, bundle_of=3), line(5, "C2", 4, bundle_of=3),
                  line(6, "GIFT", 1, gift_of=1), parent_no="P1", timestamps={states.IN_FULFILMENT: START})
    child.results.update(_child_stock(parent, child.lines))
    await cancel(child, inventory)
    assert levels(inventory, "A") == (5, 0, 0) and levels(inventory, "BDL-1") == (5, 0, 0)
    assert levels(inventory, "B", "WH2") == (4, 0, 1)  # the other child still ships it
    parent.children = ["P1-1", "P1-2"]
    assert await cancel(parent, inventory) == []  # a split parent: its children settle their lines


# -- the reconciler ---------------------------------------------------------------------------

async def test_the_reconciler_settles_each_expired_reservation_by_its_order():
    inventory, clock, _ = sim({"WH1": {"A": 100}})
    store = MemoryStore()
    stock = make_stock(inventory, clock, store, reservation_ttl=900.0)
    cases = {
        "O1": (None, "released"),  # reserved, then the process died before the commit
        "O2": (st.CANCELLED, "released"),  # cancelled, its release lost
        "O3": (st.QUEUED, "confirmed"),  # paid, its confirm lost
        "O4": (st.DONE, "confirmed"),
        "O5": (st.WAIT_PAY, "kept"),  # its pay deadline decides
        "O6": (st.MANUAL, "kept"),  # a payment a person reviews
    }
    for no, (state, _) in cases.items():
        o = order(no, line(1, "A", 1), timestamps={states.IN_FULFILMENT: START} if state in (st.QUEUED, st.DONE)
                  else {})
        await stock.reserve(o)
        if state is not None:
            await put(store, o, state)
    clock.advance(899)
    assert await stock.reconcile() == {}  # nothing is older than the TTL yet
    clock.advance(1)
    assert await stock.reconcile() == {"released": 2, "confirmed": 2, "kept": 2}
    assert levels(inventory, "A") == (96, 2, 2)
    assert {r.key for r in await inventory.open_reservations(float("inf"))} == {
        reservation_key("O5", "A", "WH1"), reservation_key("O6", "A", "WH1")}


async def test_the_reconciler_runs_with_the_pipeline_and_wakes_on_the_clock():
    inventory, clock, _ = sim({"WH1": {"A": 10}})
    stock = make_stock(inventory, clock, reservation_ttl=100.0, reconcile_interval=10.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stock.run)
        await anyio.sleep(0.01)
        await stock.reserve(order("O1", line(1, "A", 4)))  # an order that never got committed
        await anyio.sleep(0.01)
        assert clock.next_deadline == START + 10  # something is open: it checks every interval
        clock.advance(100)
        with anyio.fail_after(5):
            while levels(inventory, "A") != (10, 0, 0):
                await anyio.sleep(0.01)
        await anyio.sleep(0.01)
        assert clock.next_deadline is None  # nothing open: no timer until something is reserved
        tg.cancel_scope.cancel()


def test_the_default_ttl_is_the_longest_payment_timeout_plus_five_minutes():
    assert config.from_mapping({}).stock.ttl(config.from_mapping({}).payment) == 900.0
    s = config.from_mapping({"payment": {"timeout_by_kind": {"toc": 1200.0}}})
    assert s.stock.ttl(s.payment) == 1500.0
    s = config.from_mapping({"stock": {"reservation_ttl": 60.0}})
    assert s.stock.ttl(s.payment) == 60.0 and s.stock.reconcile_interval == 60.0
    with pytest.raises(config.ConfigError, match="stock.reservation_ttl"):
        config.from_mapping({"stock": {"reservation_ttl": 0}})


# -- the simulated inventory's additions ------------------------------------------------------

async def test_open_reservations_page_by_key_with_their_creation_time_also_after_a_restart():
    inventory, clock, log = sim({"WH1": {"A": 10}})
    for i in range(5):
        await inventory.reserve(f"O{i}:reserve:A@WH1", "A", "WH1", 1)
        clock.advance(10)
    await inventory.confirm("O1:reserve:A@WH1")
    await inventory.release("O2:reserve:A@WH1")
    await inventory.restock("O1:restock:A@WH1", "A", "WH1", 1)
    page = await inventory.open_reservations(START + 30, limit=1)
    assert [(r.key, r.created_at) for r in page] == [("O0:reserve:A@WH1", START)]
    rest = await inventory.open_reservations(START + 30, after=page[0].key)
    assert [(r.key, r.created_at) for r in rest] == [("O3:reserve:A@WH1", START + 30)]
    again, _, _ = sim({"WH1": {"A": 10}}, clock, log)  # state rebuilt from the effect log
    assert await again.open_reservations(float("inf")) == await inventory.open_reservations(float("inf"))
    assert levels(again, "A") == levels(inventory, "A") == (7, 3, 0)  # O0, O3, O4 open


async def test_restock_moves_sold_back_and_refuses_more_than_was_sold():
    inventory, _, _ = sim({"WH1": {"A": 10}})
    await inventory.reserve("O1:reserve:A@WH1", "A", "WH1", 3)
    await inventory.confirm("O1:reserve:A@WH1")
    with pytest.raises(PermanentError, match="only 3"):
        await inventory.restock("O1:restock:A@WH1", "A", "WH1", 4)
    await inventory.restock("O1:restock:A@WH1", "A", "WH1", 3)
    await inventory.restock("O1:restock:A@WH1", "A", "WH1", 3)  # the key makes it once
    assert levels(inventory, "A") == (10, 0, 0)


# -- intake with the real pipeline ------------------------------------------------------------

def request(ext: str, qty: int = 2, kind: str = "toc", sku: str = "A") -> dict:
    body = {"source": "app", "external_id": ext, "kind": kind, "member_id": "M1",
            "consignee": {"name": "张三", "phone": "13812345678", "province": "北京市", "city": "北京市",
                          "district": "朝阳区", "detail": "建国路 1 号"},
            "lines": [{"sku": sku, "qty": qty, "unit_price": 1990, "warehouse": "WH-BJ"}]}
    if kind != "toc":
        body.update(source="sales_plan", payment_method="none")
    return body


def app_settings(tmp_path=None, **extra) -> config.Settings:
    store = f"sqlite:///{tmp_path / 'oms.sqlite3'}" if tmp_path else "memory://"
    raw = {"store": {"url": store}, "metrics": {"port": 0}, "routing": {"file": str(ROUTES)},
           "downstream": {"inventory": {"stock": {"WH-BJ": {"A": 5}}}}}
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config.from_mapping(raw)


async def test_intake_reserves_before_the_commit_and_a_duplicate_gives_its_reservation_back():
    clock = VirtualClock(START)
    app = await app_module.build(app_settings(), clock=clock)
    inv = app.pipeline.ports.inventory
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(app.pipeline.run)
            first = (await app.intake.create([request("E1")]))[0]
            # Two retries: the first reserves 2 more under its new number (1 left), the second
            # cannot reserve at all; both are the first order, neither is "out of stock".
            again = await app.intake.create([request("E1"), request("E1")])
            assert first.created and [(c.created, c.refused) for c in again] == [(False, ""), (False, "")]
            assert {c.order_no for c in again} == {first.order_no}
            assert levels(inv, "A", "WH-BJ") == (3, 2, 0)  # the retry's reservation went back at once
            released = {e.key.split(":")[0] for e in app.effects.applied("inventory") if e.op == "release"}
            assert len(released) == 1 and first.order_no not in released
            # concurrent retries of another request: still one order, one reservation
            async with anyio.create_task_group() as inner:
                for _ in range(5):
                    inner.start_soon(app.intake.create, [request("E2", 1)])
            assert levels(inv, "A", "WH-BJ") == (2, 3, 0)
            assert (await app.pipeline.store.counts()) == {st.WAIT_PAY: 2}
            tg.cancel_scope.cancel()
    finally:
        await app.aclose()


async def test_an_order_whose_stock_cannot_be_reserved_is_refused_and_not_created():
    app = await app_module.build(app_settings(), clock=VirtualClock(START))
    try:
        created = await app.intake.create([request("E1", 3), request("E2", 3), request("E3", 2)])
        assert [(c.created, c.refused) for c in created] == [(True, ""), (False, "out of stock: A@WH-BJ"),
                                                             (True, "")]
        assert await app.pipeline.store.counts() == {st.WAIT_PAY: 2}
        assert levels(app.pipeline.ports.inventory, "A", "WH-BJ") == (0, 5, 0)
    finally:
        app.pipeline.stop()
        await app.aclose()


@pytest.mark.parametrize("in_file", [False, True])  # True: effect_log with retain_effects = false
async def test_paid_confirms_timeout_releases_and_no_payment_confirms_at_intake(tmp_path, in_file):
    clock = VirtualClock(START)
    downstream = {"effect_log": str(tmp_path / "effects.sqlite3"), "retain_effects": False} if in_file else {}
    app = await app_module.build(app_settings(downstream=downstream), clock=clock)
    inv = app.pipeline.ports.inventory
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(app.pipeline.run)
            tob = (await app.intake.create([request("B1", 1, kind="tob")]))[0]
            assert tob.status == states.IN_FULFILMENT and levels(inv, "A", "WH-BJ") == (4, 0, 1)
            paid, unpaid = await app.intake.create([request("E1", 2), request("E2", 2)])
            assert levels(inv, "A", "WH-BJ") == (0, 4, 1)

            def pay(o):
                o.amounts.paid = o.amounts.cash = o.amounts.payable
            assert await app.pipeline.release(paid.order_no, "paid", pay)
            assert levels(inv, "A", "WH-BJ") == (0, 2, 3)
            clock.advance(600.5)  # past the unpaid one's deadline
            with anyio.fail_after(5):
                while levels(inv, "A", "WH-BJ") != (2, 0, 3):
                    await anyio.sleep(0.01)
            assert (await app.pipeline.store.get(unpaid.order_no)).state == st.CANCELLED
            tg.cancel_scope.cancel()
    finally:
        await app.aclose()


class Crash(BaseException):
    """The process dies here (nothing after it runs, no cleanup either)."""


@pytest.mark.parametrize("retain", [True, False])  # False: the reservations live in the effect log's file
async def test_a_crash_between_reserve_and_commit_is_repaired_by_the_reconciler_after_the_ttl(tmp_path, retain):
    effects = tmp_path / "effects.sqlite3"
    settings = app_settings(tmp_path, downstream={"effect_log": str(effects), "retain_effects": retain},
                            stock={"reconcile_interval": 30.0})
    clock = VirtualClock(START)
    app = await app_module.build(settings, clock=clock)

    def die(orders):
        raise Crash()
    app.intake.after_reserve = die
    with pytest.raises(Crash):
        await app.intake.create([request("E1", 4)])
    assert levels(app.pipeline.ports.inventory, "A", "WH-BJ") == (1, 4, 0)
    assert await app.pipeline.store.counts() == {}  # the order was never committed
    await app.aclose()  # the files are all that is left of it

    clock = VirtualClock(START + 60)  # restarted a minute later
    app = await app_module.build(settings, clock=clock)
    inv = app.pipeline.ports.inventory
    try:
        assert levels(inv, "A", "WH-BJ") == (1, 4, 0)  # rebuilt from the effect log
        async with anyio.create_task_group() as tg:
            await tg.start(app.pipeline.run)
            await anyio.sleep(0.05)
            assert levels(inv, "A", "WH-BJ") == (1, 4, 0)  # not before the TTL: it could be an order's
            clock.advance(900 - 60)  # START + TTL
            with anyio.fail_after(5):
                while levels(inv, "A", "WH-BJ") != (5, 0, 0):
                    await anyio.sleep(0.01)
            assert app.stock.counts["expired_released"] == 1
            # and the stock is sellable again
            assert (await app.intake.create([request("E9", 5)]))[0].created
            tg.cancel_scope.cancel()
    finally:
        await app.aclose()
