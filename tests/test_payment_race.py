"""The payment race suite (DESIGN R-4, seed 001 "订单支付超时取消，但用户却支付成功").

N generated orders, all made payable ToC, run in process on the embedded adapters
(memory store, in-process timers, simulated downstream systems) on a virtual
clock, with the full routing table and stages. Orders arrive in batches; the
payment centre's notifications go through `Api.pay` (what `POST /payments`
runs) at planned virtual times while the pay-deadline timers fire:

* 30% are never paid (the timeout cancels them);
* 10% are paid within +-1 s of their deadline (some exactly at it, which is still in
  time), racing the timer;
* 2% are notified twice with the same payment (half at once, half later);
* 1% are paid after they were cancelled;
* the rest are paid some time before their deadline.

Stock is short on purpose (`STOCK` per sku and warehouse), so intake refuses
some orders and stock given back by cancelled orders is sold again.

Afterwards: every paid order was fulfilled (done) or refunded in full; no
payment is lost (each one is booked on a fulfilled order or refunded, never
both); a payment up to the deadline is always taken, one after it always
refunded; no cancelled order reached `dispatch_wms` (no WMS or supplier
dispatch in the effect log); for every sku and warehouse sellable + reserved +
sold == the initial stock, nothing stays reserved, and what is sold is exactly
what the fulfilled orders hold.

Runtime on this 2-core machine: about 8 s for N = 10,000 (the printed line has it).
"""
from __future__ import annotations

import heapq
import itertools
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import anyio
import pytest

from oms_pipeline import api, config, schemas
from oms_pipeline import app as app_module
from oms_pipeline.clock import VirtualClock
from oms_pipeline.generator import generate
from oms_pipeline.order import decode
from oms_pipeline.ports import store as st
from tests.support.runtime import all_orders

pytestmark = pytest.mark.slow

N = 10_000
SEED = 4242
START = 1_700_000_000.0
BATCH = 100  # orders per intake call
ARRIVAL = 20.0  # virtual seconds between batches
STOCK = 12  # initial sellable per (sku, warehouse): about the median demand of the run
TIMEOUT = 600.0
ROUTES = Path(__file__).resolve().parent.parent / "config" / "routes.toml"


@pytest.fixture
def anyio_backend():
    return "asyncio"


def payable_toc(request: dict[str, Any]) -> dict[str, Any]:
    """A generated request as a ToC order paid online (or mixed): no remark (a person would
    hold it), service kinds' full discount and ToB's pallet quantities dropped."""
    out = {**request, "kind": "toc", "source": "app", "remark": "",
           "payment_method": "mixed" if request["payment_method"] == "mixed" else "online"}
    if request["kind"] != "toc":
        out["amounts"] = {}
        out["lines"] = [{**line, "qty": min(line["qty"], 5)} for line in request["lines"]]
    return out


def plan(rng: random.Random) -> list[tuple[str, float]]:
    """(what, seconds relative to the deadline) of each notification the payment centre sends."""
    r = rng.random()
    if r < 0.30:
        return []
    if r < 0.40:  # around the deadline, racing the timer; 1 in 10 exactly at it
        return [("edge", 0.0 if rng.random() < 0.1 else rng.uniform(-1.0, 1.0))]
    if r < 0.42:  # the same notification twice: at once, or again later
        at = -rng.uniform(5.0, TIMEOUT - 5)
        return [("twice", at), ("twice", at if rng.random() < 0.5 else at + rng.uniform(1.0, 900.0))]
    if r < 0.43:
        return [("after_cancel", rng.uniform(5.0, 900.0))]
    return [("normal", -rng.uniform(2.0, TIMEOUT - 1))]


class Run:
    def __init__(self, app, clock: VirtualClock) -> None:
        self.app, self.clock = app, clock
        self.server = api.Api(app)
        self.rng = random.Random(SEED)
        self.heap: list[tuple[float, int, str, Any]] = []
        self.seq = itertools.count()
        self.created: dict[str, dict[str, Any]] = {}  # order no -> {payable, deadline, mixed}
        self.refused = 0
        self.sent: dict[tuple[str, str], dict[str, Any]] = {}  # (no, payment id) -> what and when
        self.answers: list[tuple[str, str, int, dict]] = []
        self.retries = 0

    def push(self, at: float, kind: str, data: Any) -> None:
        heapq.heappush(self.heap, (at, next(self.seq), kind, data))

    async def create(self, requests: list[dict[str, Any]]) -> None:
        for request, c in zip(requests, await self.app.intake.create(requests)):
            if c.refused:
                assert c.refused.startswith("out of stock: "), c.refused
                self.refused += 1
                continue
            assert c.created and c.pay_deadline == self.clock.now() + TIMEOUT, c
            self.created[c.order_no] = {"payable": c.payable, "deadline": c.pay_deadline,
                                        "mixed": request["payment_method"] == "mixed"}
            for i, (what, offset) in enumerate(plan(self.rng)):
                pid = f"P-{c.order_no}" if what == "twice" else f"P-{c.order_no}-{i}"
                self.push(c.pay_deadline + offset, "pay", (c.order_no, pid, what))

    async def pay(self, no: str, pid: str, what: str) -> None:
        order = self.created[no]
        amount = order["payable"]
        self.sent.setdefault((no, pid), {"what": what, "at": self.clock.now(), "amount": amount})
        body = schemas.PaymentIn(order_no=no, payment_id=pid, amount=amount, channel="race",
                                 non_cash=amount // 3 if order["mixed"] else 0)
        for _ in range(5):  # the payment centre sends again until it gets an answer it can act on
            response = await self.server.pay(body)
            answer = json.loads(response.body)
            if response.status not in (409, 503) or "meanwhile" not in answer.get("error", "meanwhile"):
                break
            self.retries += 1
        self.answers.append((no, pid, response.status, answer))

    async def drive(self) -> None:
        requests = [payable_toc(r) for r in generate(N, SEED, start_at=START)]
        for k in range(0, N, BATCH):
            self.push(START + (k // BATCH) * ARRIVAL, "create", requests[k:k + BATCH])
        while self.heap:
            at = self.heap[0][0]
            self.clock.set(at)  # due pay-deadline timers fire as the events below run
            due = []
            while self.heap and self.heap[0][0] == at:
                due.append(heapq.heappop(self.heap))
            async with anyio.create_task_group() as tg:
                for _, _, kind, data in due:
                    if kind == "create":
                        tg.start_soon(self.create, data)
                    else:
                        tg.start_soon(self.pay, *data)

    async def run_to_rest(self) -> None:
        pipeline, store = self.app.pipeline, self.app.pipeline.store
        for _ in range(100_000):
            await pipeline.wait_until(lambda: not pipeline.in_flight)
            await anyio.sleep(0.005)  # due timers fire, split parents settle, the outbox is relayed
            if pipeline.in_flight:
                continue
            if self.clock.next_deadline is not None:
                self.clock.set(self.clock.next_deadline)
                continue
            counts = await store.counts()
            if not any(counts.get(s) for s in st.ACTIVE_STATES) and pipeline.timers.pending == 0 \
                    and not await store.outbox_pending():
                return
        raise AssertionError("the pipeline did not come to rest")




@pytest.mark.anyio
async def test_payments_racing_their_timeouts_lose_no_money_and_no_stock():
    started = time.perf_counter()
    settings = config.from_mapping({
        "store": {"url": "memory://"}, "metrics": {"port": 0}, "routing": {"file": str(ROUTES)},
        "payment": {"timeout": TIMEOUT},
        "downstream": {"seed": SEED, "inventory": {"default_stock": STOCK}},
    })
    clock = VirtualClock(START)
    app = await app_module.build(settings, clock=clock)
    run = Run(app, clock)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(app.pipeline.run)
            with anyio.fail_after(240):
                await run.drive()
                await run.run_to_rest()
                clock.advance(app.stock.ttl + app.stock.interval)  # anything left open has expired
                assert await app.stock.reconcile() == {}, "a reservation was left for the reconciler"
            rows = await all_orders(app.pipeline.store)
            histories = {no: await app.pipeline.store.history(no) for no in rows}
            tg.cancel_scope.cancel()
        elapsed = time.perf_counter() - started
        docs = {no: decode(r.doc) for no, r in rows.items()}
        effects = app.effects.applied()
        inventory = app.pipeline.ports.inventory

        # every answer is one the payment centre can act on; nothing is "try again" forever
        bad = [(no, pid, status, a) for no, pid, status, a in run.answers if status != 200]
        assert not bad, bad[:5]

        refunds = {e.key: e.payload["amount"] for e in effects if e.system == "finance" and e.op == "refund"}
        assert all(n == 1 for n in Counter(e.key for e in effects if e.op == "refund").values())
        dispatched = {e.payload["order_no"] for e in effects
                      if e.system in ("wms", "supplier") and e.op == "dispatch"}
        children: dict[str, list[str]] = defaultdict(list)
        for no, row in rows.items():
            if row.parent_no:
                children[row.parent_no].append(no)
        assert set(run.created) == {no for no, r in rows.items() if not r.parent_no}

        problems: list[str] = []
        outcome = Counter()
        for no, info in run.created.items():
            row, doc = rows[no], docs[no]
            payments = {pid: s for (o, pid), s in run.sent.items() if o == no}
            booked = doc.results.get("payment_id")
            for pid, sent in payments.items():
                key = f"{no}:refund:{pid}"
                if booked == pid:  # booked: the order was fulfilled, and this payment not refunded
                    ok = row.state == st.DONE and key not in refunds and doc.amounts.paid == sent["amount"]
                    outcome["booked"] += 1
                else:  # not booked: refunded in full
                    ok = refunds.get(key) == sent["amount"] and row.state == st.CANCELLED
                    outcome["refunded"] += 1
                if not ok:
                    problems.append(f"{no} {pid} ({sent['what']}): state {row.state}, booked {booked}, "
                                    f"refund {refunds.get(key)}")
                # the server's clock decides: up to the deadline taken, after it refunded
                if sent["at"] <= info["deadline"] and booked != pid:
                    problems.append(f"{no} {pid}: paid {info['deadline'] - sent['at']:.3f}s early, not taken")
                if sent["at"] > info["deadline"] and booked == pid:
                    problems.append(f"{no} {pid}: paid {sent['at'] - info['deadline']:.3f}s late, booked")
            if payments and row.state != st.DONE:
                refunded = sum(refunds.get(f"{no}:refund:{pid}", 0) for pid in payments)
                if refunded != sum(s["amount"] for s in payments.values()):
                    problems.append(f"{no}: paid, not fulfilled, refunded {refunded} only")
            if not payments and row.state != st.CANCELLED:
                problems.append(f"{no}: never paid, yet {row.state}")
            if row.state == st.CANCELLED:
                outcome["cancelled"] += 1
                for o in [no, *children.get(no, [])]:
                    if o in dispatched or any(h.stage == "dispatch_wms" for h in histories[o]):
                        problems.append(f"{o}: cancelled, yet it reached dispatch_wms")
                late = [p["payment_id"] for p in doc.results.get("late_payments", ())]
                if sorted(late) != sorted(pid for pid in payments if booked != pid):
                    problems.append(f"{no}: late payments on record {late}, sent {sorted(payments)}")
            else:
                outcome[row.state] += 1
        assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:20])

        # stock: conserved, nothing left reserved, sold == what fulfilled orders hold
        held: Counter = Counter()
        for no in run.created:
            if rows[no].state == st.DONE:
                for sku, warehouse, qty in docs[no].results.get("stock", {}).get("lines", {}).values():
                    held[(sku, warehouse)] += qty
        levels = inventory.levels()
        assert set(held) <= set(levels)
        for (sku, warehouse), level in levels.items():
            assert level.sellable + level.reserved + level.sold == STOCK, (sku, warehouse, level)
            assert min(level.sellable, level.sold) >= 0 and level.reserved == 0, (sku, warehouse, level)
            assert level.sold == held[(sku, warehouse)], (sku, warehouse, level, held[(sku, warehouse)])
        assert await inventory.open_reservations(float("inf")) == []

        # the suite covered what it is for
        whats = Counter(s["what"] for s in run.sent.values())
        edge = [(s["at"] - run.created[no]["deadline"], no, pid) for (no, pid), s in run.sent.items()
                if s["what"] == "edge"]
        assert run.refused > 0 and whats["after_cancel"] > 0 and whats["twice"] > 0
        assert any(d < 0 for d, _, _ in edge) and any(d > 0 for d, _, _ in edge) and any(d == 0 for d, _, _ in edge)
        assert outcome["refunded"] > whats["after_cancel"]  # late edge payments were refunded too
        assert sum(a.get("duplicate", False) for _, _, _, a in run.answers) >= whats["twice"]
        assert app.stock.counts["released"] > 0 and app.stock.counts["confirmed"] > 0
        print(f"\npayment race: orders={N} created={len(run.created)} refused_for_stock={run.refused} "
              f"{dict(outcome)} notifications={len(run.answers)} retries={run.retries} "
              f"stock={dict(app.stock.counts)} elapsed={elapsed:.1f}s")
    finally:
        await app.aclose()
