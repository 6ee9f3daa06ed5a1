"""Acceptance: the order model and the 16 stages on a generated mix.

A 5,000-order generated mix runs end to end on the embedded default (SQLite
store, in-process timers and counters, simulated downstream systems with their
defaults): every order ends in its kind's expected terminal state; each kind's
stage path matches the routing table; allocated line amounts sum to order
totals for every order; every dispatched non-virtual child has a waybill and an
ERP occupation.

What each order should end as is computed from its REQUEST, not from the
pipeline:

* a buyer remark -> manual review at `audit`. Audit runs after `split`, so a
  remark order that splits leaves its parent in runtime state `split` (it
  waits for children that are all in the exception centre) and every child in
  `manual`;
* everything else -> `done` (DISPATCHED); split parents settle to `done` once
  their children are.

No other manual or cancel case can happen with the defaults, and the test says
why it relies on that: fraud scores are base [0, 40) + 30 for >= 5,000 yuan, so
at most 69 < review threshold 70 < cheat threshold 90; nobody is black-listed;
the generator's members (200k) and phones (random 10 digits) make more than 20
orders per hour per member or phone practically impossible; ERP and inventory
hold 1,000,000 per (sku, warehouse) and no forced shortages; warehouses take
100,000 orders a day; every generated province is served and every address
complete; the generator caps deductions so nothing is over-deducted. Any such
case showing up is a failure, reported with the order's last history rows.

Exceptions to "every shipment has a waybill": O2O pickup orders are collected
at the pickup point (no carrier, `waybill` skips them), but still get an ERP
occupation and a WMS task per shipment.
"""
from __future__ import annotations

import logging
import time
import tomllib
from collections import Counter, defaultdict
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest

from oms_pipeline import config
from oms_pipeline.app import build
from oms_pipeline.clock import VirtualClock
from oms_pipeline.generator import generate
from oms_pipeline.order import Order, decode
from oms_pipeline.outcome import OUTCOMES
from oms_pipeline.ports import store as st
from tests.support.runtime import all_orders

pytestmark = pytest.mark.slow

N = 5000
SEED = 20240611
START = 1_700_000_000.0
BATCH = 200
ROUTES = Path(__file__).resolve().parent.parent / "config" / "routes.toml"
MONEY = ("discount", "coupon", "points", "freight", "payable")
PAID = ("paid", "non_cash", "cash")


@pytest.fixture
def anyio_backend():
    return "asyncio"


# -- expectations from the request and the routing file alone ------------------

def _split_key(line: dict[str, Any]) -> tuple:
    if line.get("virtual"):
        return ("virtual",)
    return tuple(line.get(k) or "" for k in ("warehouse", "zone", "supplier", "delivery_date"))


def expected_children(request: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The request's lines per child order (empty: it ships as one). No gift campaign is
    configured and bundle components take their bundle's keys, so request lines decide."""
    by_key: dict[tuple, list[int]] = {}
    for i, line in enumerate(request["lines"]):
        by_key.setdefault(_split_key(line), []).append(i)
    if len(by_key) <= 1:
        return []
    # Children come in the order of their lowest line number after `fill`: other lines keep
    # theirs (1..n), a bundle's components are numbered after them, bundle by bundle.
    n = len(request["lines"])
    first = {key: min(i + 1 + (n if request["lines"][i].get("bundle") else 0) for i in idx)
             for key, idx in by_key.items()}
    return [[request["lines"][i] for i in by_key[key]] for key in sorted(by_key, key=first.get)]


def expected_end(request: dict[str, Any]) -> str:
    return st.MANUAL if request["remark"].strip() else st.DONE


class RouteFile:
    """The path of a kind with its flags, compiled from routes.toml by hand (not by routing.py)."""

    KNOWN_FLAGS = {"virtual"}  # the flags this test can tell from an order's lines

    def __init__(self, path: Path) -> None:
        self.raw = tomllib.loads(path.read_text())
        unknown = {fr["flag"] for fr in self.raw.get("flag_rules", [])} - self.KNOWN_FLAGS
        assert not unknown, f"routes.toml has flag rules this test cannot predict: {unknown}"
        forward = [r for r in self.raw.get("rules", []) if r["outcome"] in ("next", "skip")]
        assert not forward, f"routes.toml overrides next/skip targets, update this test: {forward}"

    def stages(self, kind: str, virtual: bool) -> tuple[str, ...]:
        (path,) = [p for p in self.raw["paths"].values() if kind in p["kinds"]]
        skip = set(path.get("skip", ()))
        for rule in self.raw.get("flag_rules", []):
            if rule["flag"] == "virtual" and virtual:
                skip |= set(rule["skip"])
        return tuple(s for s in self.raw["stages"] if s not in skip)


def ran_stages(history) -> list[str]:
    """The stages an order ran, in order: stage outcome rows only (not intake, release,
    a child's creation or a parent's settling), consecutive repeats (park, retry) collapsed."""
    out: list[str] = []
    for h in history:
        if h.outcome in OUTCOMES and (not out or out[-1] != h.stage):
            out.append(h.stage)
    return out


# -- driving the pipeline ------------------------------------------------------

def _pay(o: Order) -> None:
    # What POST /payments does (api.py `payment`).
    o.amounts.paid = o.amounts.cash = o.amounts.payable
    o.results["payment_id"] = f"P-{o.order_no}"


async def _submit_all(app, requests: list[dict[str, Any]]) -> list[str]:
    numbers: list[str] = []
    for i in range(0, len(requests), BATCH):
        created = await app.intake.create(requests[i:i + BATCH])
        assert all(c.created for c in created)
        numbers.extend(c.order_no for c in created)
        waiting = [c for c in created if c.status == "WAIT_PAY"]
        released: list[bool] = []

        async def pay(order_no: str, amount: int) -> None:
            released.append(await app.pipeline.release(order_no, f"paid {amount} via test", _pay))

        async with anyio.create_task_group() as tg:
            for c in waiting:
                tg.start_soon(pay, c.order_no, c.payable)
        assert all(released) and len(released) == len(waiting)
    return numbers


async def _run_to_rest(app, clock: VirtualClock) -> int:
    """Let every order run; advance the virtual clock to each next timer until none is
    pending and the store holds no active order. Returns how many clock steps it took."""
    pipeline, store = app.pipeline, app.pipeline.store
    steps = 0
    while True:
        await pipeline.wait_until(lambda: not pipeline.in_flight)
        await anyio.sleep(0.005)  # due timers resume, split parents settle
        if pipeline.in_flight:
            continue
        if clock.next_deadline is not None:
            clock.set(clock.next_deadline)
            steps += 1
            continue
        counts = await store.counts()
        if not any(counts.get(s) for s in st.ACTIVE_STATES) and pipeline.timers.pending == 0:
            await anyio.sleep(0.05)  # last settle tasks
            if not pipeline.in_flight and clock.next_deadline is None:
                return steps




# -- the test ------------------------------------------------------------------

@pytest.mark.anyio
async def test_generated_mix_runs_end_to_end(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="oms.pipeline")
    started = time.perf_counter()
    requests = list(generate(N, SEED, start_at=START))
    routes = RouteFile(ROUTES)
    settings = config.from_mapping({
        "store": {"url": f"sqlite:///{tmp_path}/oms.sqlite3"},
        "metrics": {"port": 0},
        "routing": {"file": str(ROUTES)},
    })
    clock = VirtualClock(START)
    app = await build(settings, clock=clock)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(app.pipeline.run)
            with anyio.fail_after(150):
                numbers = await _submit_all(app, requests)
                steps = await _run_to_rest(app, clock)
            rows = await all_orders(app.pipeline.store)
            histories = {no: await app.pipeline.store.history(no) for no in rows}
            tg.cancel_scope.cancel()
        effects = {(e.system, e.op, e.key) for e in app.effects.applied()}
        elapsed = time.perf_counter() - started

        docs = {no: decode(r.doc) for no, r in rows.items()}
        children_of: dict[str, list[str]] = defaultdict(list)
        for no, r in sorted(rows.items(), key=lambda item: (item[0].split("-")[0], len(item[0]), item[0])):
            if r.parent_no:
                children_of[r.parent_no].append(no)  # PARENT-1, PARENT-2, ... in split order
        assert len(rows) == N + sum(map(len, children_of.values()))
        assert set(children_of) <= set(numbers)

        problems: list[str] = []

        def check(ok: bool, no: str, what: str) -> None:
            if not ok:
                last = [(h.stage, h.outcome, h.reason) for h in histories.get(no, [])[-3:]]
                problems.append(f"{no} ({rows[no].kind}, state {rows[no].state}): {what}; last: {last}")

        by_kind_end: Counter = Counter()
        want_kind_end: Counter = Counter()
        for request, no in zip(requests, numbers):
            kind, row, doc = request["kind"], rows[no], docs[no]
            want_children = expected_children(request)
            end = expected_end(request)
            kids = children_of.get(no, [])
            want_kind_end[(kind, "split" if want_children else "single", end)] += 1
            leaf_states = {rows[c].state for c in kids} if kids else {row.state}
            by_kind_end[(kind, "split" if kids else "single", "/".join(sorted(leaf_states)))] += 1

            # 1. the end state, from the request
            check(len(kids) == len(want_children), no, f"{len(kids)} children, expected {len(want_children)}")
            if kids:
                check(row.state == (st.DONE if end == st.DONE else st.SPLIT), no, f"parent ended {row.state}")
                for c in kids:
                    check(rows[c].state == end, c, f"child ended {rows[c].state}, expected {end}")
            else:
                check(row.state == end, no, f"ended {row.state}, expected {end}")
            status = {st.DONE: "DISPATCHED", st.MANUAL: "MANUAL_REVIEW", st.SPLIT: "SPLIT"}
            for o in [no, *kids]:
                check(rows[o].status == status.get(rows[o].state) == docs[o].status, o,
                      f"status {rows[o].status}/{docs[o].status} for state {rows[o].state}")

            # 2. the path, from routes.toml and from the compiled route
            virtual = all(line.get("virtual") for line in request["lines"])
            route = app.pipeline.route_of(doc).stages
            check(route == routes.stages(kind, virtual), no, f"compiled route {route}")
            ran = ran_stages(histories[no])
            if kids:
                want = list(route[:route.index("split") + 1])
            elif end == st.MANUAL:
                want = list(route[:route.index("audit") + 1])
            else:
                want = list(route)
            check(ran == want, no, f"ran {ran}, route {want}")
            for c, lines in zip(kids, want_children):
                child_virtual = all(line.get("virtual") for line in lines)
                croute = app.pipeline.route_of(docs[c]).stages
                check(croute == routes.stages(kind, child_virtual), c, f"compiled child route {croute}")
                after = list(croute[croute.index("split") + 1:])
                if end == st.MANUAL:
                    after = after[:after.index("audit") + 1]
                cran = ran_stages(histories[c])
                check(cran == after, c, f"child ran {cran}, route {after}")

            # the generator's dated lines are business (UTC+8) dates 2-6 (scheduled) or
            # 10-30 (presale) days after the order was placed, as effective_time reads them
            placed = datetime.fromtimestamp(request["placed_at"], TZ).date()
            leads = {(date.fromisoformat(line["delivery_date"]) - placed).days
                     for line in request["lines"] if line.get("delivery_date")}
            low, high = (10, 30) if request["presale"] else (2, 6)
            check(all(low <= lead <= high for lead in leads), no, f"delivery in {sorted(leads)} days")

            # 3. money, to the cent
            goods = sum(line["qty"] * line["unit_price"] for line in request["lines"])
            a = request["amounts"]
            payable = goods - a["discount"] - a["coupon"] - a["points"] + a["freight"]
            check(doc.amounts.payable == payable, no, f"payable {doc.amounts.payable} != request's {payable}")
            if request["kind"] == "toc" and request["payment_method"] != "cod":
                check(doc.amounts.paid == doc.amounts.cash == payable, no, f"paid {doc.amounts}")
            for o in [no, *kids]:
                d = docs[o]
                for name in MONEY:
                    total = sum(getattr(line, name) for line in d.lines)
                    check(total == getattr(d.amounts, name), o,
                          f"lines' {name} sum to {total}, order has {getattr(d.amounts, name)}")
                check(all(line.payable >= 0 for line in d.lines), o, "a line payable < 0")
                check(d.goods == sum(line.goods for line in d.lines), o, "goods")
            if kids:
                check(sum(docs[c].goods for c in kids) == doc.goods, no, "children's goods != parent's")
                for name in MONEY + PAID:
                    total = sum(getattr(docs[c].amounts, name) for c in kids)
                    check(total == getattr(doc.amounts, name), no,
                          f"children's {name} sum to {total}, parent has {getattr(doc.amounts, name)}")

            # 4. what every dispatched leaf booked downstream, and when it was released
            _check_paid_stages(no, request, doc, effects, check)
            for o, lines in zip(kids or [no], want_children or [request["lines"]]):
                if rows[o].state == st.DONE:
                    _check_dispatched(o, docs[o], effects, check)
                    _check_leaf_stages(o, request, docs[o], effects, check)
                    _check_release(o, request, lines, histories[o], check)
                for h in histories[o]:
                    check(h.outcome != "retry" and (h.outcome != "park" or h.stage == "effective_time"), o,
                          f"unexpected {h.outcome} at {h.stage}: {h.reason}")

        assert not problems, f"{len(problems)} problems, first ones:\n" + "\n".join(problems[:25])
        # Each stage ran once per order (no crash here): no downstream call was repeated, and
        # what the systems booked is exactly what the orders' results say, nothing more.
        assert app.effects.duplicates == {}
        booked = {(system, key) for system, _, key in effects}
        assert booked == set().union(*(_wanted_effects(no, d) for no, d in docs.items()))
        unexpected = {k: v for k, v in by_kind_end.items() if k[2] not in (st.DONE, st.MANUAL)}
        assert not unexpected, unexpected
        assert by_kind_end == want_kind_end
        illegal = [r for r in caplog.records if r.name == "oms.pipeline"
                   and (getattr(r, "event", "") == "illegal_transition" or "illegal" in r.getMessage())]
        assert not illegal, [getattr(r, "reason", r.getMessage()) for r in illegal[:5]]

        # the mix covered what it is for
        kinds = {k for k, _, _ in by_kind_end}
        assert kinds == {"toc", "tob", "third_party", "reissue", "exchange", "pullback"}
        assert any(s == "split" for _, s, _ in by_kind_end) and steps >= 2
        n_children = sum(map(len, children_of.values()))
        leaves = [o for o, r in rows.items() if o not in children_of]
        done = sum(1 for o in leaves if rows[o].state == st.DONE)
        manual = sum(1 for o in leaves if rows[o].state == st.MANUAL)
        print(f"\nfulfilment mix: orders={N} children={n_children} done={done} manual={manual} "
              f"(leaves) clock_steps={steps} elapsed={elapsed:.1f}s")
    finally:
        await app.aclose()


TZ = timezone(timedelta(hours=8))  # effective_time's business timezone (its default)


def _local(day: date, hour: int) -> float:
    return datetime(day.year, day.month, day.day, hour, tzinfo=TZ).timestamp()


def expected_release(request: dict[str, Any], lines: list[dict[str, Any]]) -> float | None:
    """When a leaf may go to the warehouse (None: at once), from the request and the
    stage's documented defaults: presale / scheduled at 08:00 the day before the earliest
    line date, next-day at the 20:00 cut-off of the day it was taken in (START)."""
    dates = [date.fromisoformat(line["delivery_date"]) for line in lines if line.get("delivery_date")]
    if request["presale"] or request["delivery_promise"] == "scheduled":
        return _local(min(dates) - timedelta(days=1), 8)
    if request["delivery_promise"] == "next_day":
        assert not dates
        day = datetime.fromtimestamp(START, TZ).date()
        cutoff = _local(day, 20)
        return cutoff if START <= cutoff else _local(day + timedelta(days=1), 20)
    return None


def _check_release(no: str, request: dict[str, Any], lines: list[dict[str, Any]], history, check) -> None:
    rows = [(h.outcome, h.at) for h in history if h.stage == "effective_time"]
    release = expected_release(request, lines)
    if release is None:
        check([o for o, _ in rows] == ["next"] and rows[0][1] == START, no, f"effective_time {rows}")
    else:
        # the clock steps to each next timer, so the order resumes exactly at its release
        check(release > START and rows == [("park", START), ("next", release)], no,
              f"effective_time {rows}, expected release at {release}")


def _check_paid_stages(no: str, request: dict[str, Any], doc: Order, effects: set, check) -> None:
    """Stages before the split book on the order as taken in (the parent)."""
    paid = request["kind"] == "toc" and request["payment_method"] in ("online", "mixed") and doc.amounts.payable > 0
    voucher = doc.results.get("voucher")
    check(bool(voucher) == paid, no, f"voucher {voucher}")
    if paid:
        check(voucher["amount"] == doc.amounts.paid and ("finance", "push_voucher", f"{no}:voucher") in effects,
              no, f"voucher {voucher}")
        check(bool(doc.results.get("notify_paid", {}).get("messages")), no, "paid, not notified")


def _check_leaf_stages(no: str, request: dict[str, Any], doc: Order, effects: set, check) -> None:
    results = doc.results
    amount = doc.amounts.paid or doc.amounts.payable
    wants_invoice = bool(request["invoice_title"]) and amount > 0
    check(bool(results.get("invoice")) == wants_invoice, no, f"invoice {results.get('invoice')}")
    if wants_invoice:
        check(results["invoice"]["amount"] == amount and ("invoice", "request", f"{no}:invoice") in effects,
              no, f"invoice {results['invoice']}")
    presale = request["presale"] and any(not line.virtual for line in doc.lines)
    check(bool(results.get("presale")) == presale, no, f"presale {results.get('presale')}")
    if presale:
        check(("purchasing", "push_presale", f"{no}:presale") in effects, no, "presale not pushed")
    sms = request["kind"] in ("reissue", "exchange")
    check(bool(results.get("reissue_sms")) == sms, no, f"reissue_sms {results.get('reissue_sms')}")


def _wanted_effects(no: str, doc: Order) -> set[tuple[str, str]]:
    """(system, idempotency key) of every effect an order's results say it booked."""
    r = doc.results
    wanted = {("notification", f"{no}:notify_paid:{ch}") for ch in r.get("notify_paid", {}).get("messages", {})}
    wanted |= {("tms", f"{no}:waybill:{g}") for g in r.get("waybill", {})}
    wanted |= {("erp", f"{no}:erp_stock:{i}") for i, _ in enumerate(r.get("erp_stock", {}).get("occupations", ()))}
    dispatched = r.get("dispatch_wms", {})
    wanted |= {("wms", f"{no}:dispatch_wms:wms:{g}") for g in dispatched.get("wms", {})}
    wanted |= {("supplier", f"{no}:dispatch_wms:supplier:{s}") for s in dispatched.get("supplier", {})}
    for stage, system in (("voucher", "finance"), ("presale", "purchasing"), ("invoice", "invoice"),
                          ("reissue_sms", "notification")):
        if stage in r:
            wanted.add((system, f"{no}:{stage}"))
    # stock reserved at intake (then confirmed under the same key), one key per sku@warehouse; a split
    # child's lines hold stock under its parent's reservations (the "root" of its stock records)
    stock = r.get("stock", {})
    root = stock.get("root", no)
    wanted |= {("inventory", f"{root}:reserve:{sku}@{wh}") for sku, wh, _ in stock.get("lines", {}).values()}
    return wanted


def _check_dispatched(no: str, doc: Order, effects: set, check) -> None:
    """A DONE leaf: waybill per own (warehouse/zone) shipment, ERP occupation, WMS task,
    supplier task per drop-ship supplier, virtual outbound for virtual lines."""
    results = doc.results
    check(not any(line.bundle for line in doc.lines), no, "a bundle line was not expanded")
    own = [line for line in doc.lines if not line.virtual and not line.supplier]
    groups = {f"{line.warehouse}/{line.zone}" for line in own}
    suppliers = {line.supplier for line in doc.lines if line.supplier and not line.virtual}
    dispatched = results.get("dispatch_wms") or {}
    check(bool(dispatched), no, "done without dispatch_wms results")
    if own:
        check(all(line.warehouse for line in own), no, "an own line without warehouse")
        if doc.consignee.pickup_point:
            check("waybill" not in results, no, "a pickup order got a waybill")
        else:
            waybills = results.get("waybill") or {}
            check(set(waybills) == groups and all(waybills.values()), no, f"waybills {waybills} for {groups}")
            check(all(("tms", "request_waybill", f"{no}:waybill:{g}") in effects for g in groups), no,
                  "waybill not booked in TMS")
        erp = results.get("erp_stock") or {}
        check(bool(erp.get("occupations")) and not erp.get("short"), no, f"erp_stock {erp}")
        occupied = Counter()
        for sku, warehouse, qty in erp.get("occupied", ()):
            occupied[(sku, warehouse)] += qty
        want = Counter()
        for line in own:
            want[(line.sku, line.warehouse)] += line.qty
        check(occupied == want, no, f"occupied {dict(occupied)} != lines {dict(want)}")
        check(set(dispatched.get("wms", {})) == groups, no, f"wms tasks {dispatched.get('wms')} for {groups}")
        check(all(("wms", "dispatch", f"{no}:dispatch_wms:wms:{g}") in effects for g in groups), no,
              "WMS task not booked")
    else:
        check("erp_stock" not in results and "waybill" not in results, no, "no own lines, yet stock/waybill")
    check(set(dispatched.get("supplier", {})) == suppliers, no,
          f"supplier tasks {dispatched.get('supplier')} for {suppliers}")
    check(all(("supplier", "dispatch", f"{no}:dispatch_wms:supplier:{s}") in effects for s in suppliers), no,
          "drop-ship not sent to its supplier")
    if any(line.virtual for line in doc.lines):
        check(dispatched.get("virtual_outbound") is True, no, "virtual lines without virtual outbound")
