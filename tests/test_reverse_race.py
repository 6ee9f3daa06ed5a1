"""The reverse-flow race suite (DESIGN R-5; seed 000 "正向、逆向……混在一起，有race condition").

2,000 paid orders run through the real stages (simulated downstream systems
with small latencies, so orders are in flight while requests arrive), on the
embedded adapters and on the production ones (PostgreSQL, RabbitMQ, Redis).
While they run: cancels for 500 orders at random moments (one in five for some
units only), returns for 200 orders after the warehouse reported them out
(one in three for some units), 50 of those requests sent twice at once; the
warehouse ships some orders while their cancel is on its way, so intercepts
fail and cancels become returns. Every return's goods come back.

Afterwards, for every order:
* cancelled -> no WMS dispatch, or a dispatch followed by a successful intercept;
* out of the warehouse before its cancel -> a return, never a cancel;
* its refunds equal the allocated amounts of its reversed units (a whole cancel:
  everything paid; a return: the lines' payable without their freight, which a
  return keeps by default; a partial cancel: what the order's payable lost), and
  never more than it paid;
* for every sku: sellable + reserved + sold == the initial stock, and what is sold
  is exactly what kept orders hold: stock came back once per reversed unit.
"""
from __future__ import annotations

import random
import uuid
from collections import Counter
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from oms_pipeline import app as app_module
from oms_pipeline import config, states
from oms_pipeline.adapters import postgres_store
from oms_pipeline.order import decode
from oms_pipeline.ports import store as st
from oms_pipeline.schemas import ReportIn, ReverseIn, ReverseLineIn
from oms_pipeline.settlement import share
from tests.conftest import require_service
from tests.support.postgres import fresh_postgres_database
from tests.support.rabbitmq import delete_topology

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

N, CANCELS, RETURNS, DUPLICATES = 2000, 500, 200, 50
SKUS = [f"S{i}" for i in range(20)]
STOCK = 10_000
ROUTES = Path(__file__).resolve().parent.parent / "config" / "routes.toml"
SEED = 7


def settings(store_url: str, extra: dict) -> config.Settings:
    raw = {"store": {"url": store_url}, "metrics": {"port": 0}, "routing": {"file": str(ROUTES)},
           "reverse": {"retry_interval": 0.2},
           "downstream": {"inventory": {"stock": {"WH-1": {sku: STOCK for sku in SKUS}}},
                          "latency": {"tms": {"dist": "uniform", "mean_ms": 3.0},
                                      "erp": {"dist": "uniform", "mean_ms": 3.0},
                                      "notification": {"dist": "uniform", "mean_ms": 2.0}}}}
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config.from_mapping(raw)


@asynccontextmanager
async def backends(kind: str, tmp_path):
    if kind == "embedded":
        yield f"sqlite:///{tmp_path / 'oms.sqlite3'}", {}
        return
    require_service("RabbitMQ", "127.0.0.1", 5672)
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"oms-race-{uuid.uuid4().hex[:8]}"
    async with fresh_postgres_database() as url:
        await postgres_store.migrate(url)
        try:
            yield url, {"broker": {"url": "amqp://guest:guest@127.0.0.1:5672/", "prefix": prefix},
                        "coordination": {"url": "redis://127.0.0.1:6379/0", "prefix": f"{prefix}:"}}
        finally:
            await delete_topology(prefix)


def request(i: int, rng: random.Random) -> dict:
    lines = [{"sku": sku, "qty": rng.randint(1, 4), "unit_price": rng.choice([990, 1990, 4500]),
              "warehouse": "WH-1"} for sku in rng.sample(SKUS, rng.randint(1, 3))]
    goods = sum(line["qty"] * line["unit_price"] for line in lines)
    return {"source": "app", "external_id": f"RACE-{i}", "kind": "toc", "member_id": f"M{i}",
            "consignee": {"name": "李四", "phone": f"139{i:08d}", "province": "上海市", "city": "上海市",
                          "detail": "1 号"},
            "lines": lines, "amounts": {"discount": goods // 10, "freight": rng.choice([0, 600])}}


class Race:
    def __init__(self, app) -> None:
        self.app, self.store, self.ports = app, app.pipeline.store, app.pipeline.ports
        self.rng = random.Random(SEED)
        self.paid: dict[str, int] = {}
        self.out_before_cancel: set[str] = set()
        self.cancelled_lines: dict[str, dict[int, int]] = {}
        self.numbers: list[str] = []
        self.arrived = anyio.Event()

    async def create_and_pay(self) -> None:
        """Orders arrive in batches, so requests find them at every point of their way."""
        requests = [self.app.intake.request(request(i, self.rng)) for i in range(N)]
        for k in range(0, N, 50):
            for created in await self.app.intake.create(requests[k:k + 50]):
                assert created.created, created
                await self.pay(created.order_no, created.payable)
                self.numbers.append(created.order_no)
            self.arrived.set()
            self.arrived = anyio.Event()
            await anyio.sleep(0.03)

    async def number(self, i: int) -> str:
        while len(self.numbers) <= i:
            await self.arrived.wait()
        return self.numbers[i]

    async def pay(self, no: str, amount: int) -> None:
        def booked(o):
            o.amounts.paid = o.amounts.cash = amount
            o.results["payment_id"] = f"P-{no}"
        assert await self.app.pipeline.release(no, "paid", booked)
        self.paid[no] = amount

    async def until_done(self, no: str) -> None:
        with anyio.fail_after(120):
            while (await self.store.get(no)).state != st.DONE:
                await anyio.sleep(0.05)

    async def send(self, no: str, req: ReverseIn, twice: bool) -> None:
        for _ in range(50):  # "the order changed meanwhile": the requester asks again
            async with anyio.create_task_group() as tg:
                for _ in range(2 if twice else 1):
                    tg.start_soon(self.app.reverse.request, no, req)
            record = [r for r in await self.store.reverse_of(no) if r.request_key == req.request_id]
            if record and record[0].state != "requested":
                return
            await anyio.sleep(0.1)
        raise AssertionError(f"reverse request for {no} never settled")

    async def cancel(self, i: int, twice: bool) -> None:
        no = await self.number(i)
        await anyio.sleep(self.rng.uniform(0, 0.2))
        if self.rng.random() < 0.15:  # the warehouse ships it while the cancel is on its way
            await self.until_done(no)
            await self.outbound(no)
            self.out_before_cancel.add(no)
        lines = None
        if self.rng.random() < 0.2:
            order = decode((await self.store.get(no)).doc)
            line = order.lines[0]
            lines = [ReverseLineIn(line_no=line.line_no, qty=self.rng.randint(1, line.qty))]
        await self.send(no, ReverseIn(request_id=f"cancel-{no}", source="buyer", lines=lines), twice)

    async def outbound(self, no: str) -> None:
        assert await self.ports.wms.mark_outbound(no)
        answer = await self.app.reverse.report(ReportIn(order_no=no, event="outbound", report_id=f"out-{no}"))
        assert answer.status == 200, answer

    async def ret(self, i: int, twice: bool) -> None:
        no = await self.number(i)
        await self.until_done(no)
        await self.outbound(no)
        order = decode((await self.store.get(no)).doc)
        lines = None
        if self.rng.random() < 0.33:
            line = order.lines[-1]
            lines = [ReverseLineIn(line_no=line.line_no, qty=self.rng.randint(1, line.qty))]
        await self.send(no, ReverseIn(request_id=f"return-{no}", kind="return", lines=lines), twice)

    async def goods_back(self) -> None:
        """Every reverse order waiting for goods gets them (the warehouse receives the returns)."""
        with anyio.fail_after(120):
            while True:
                found = await self._all_reverse()
                waiting = {r.order_no for r in found if r.state == "waiting_goods"}
                if not waiting and not any(r.state == "intercepting" for r in found):
                    return
                for no in waiting:  # (interceptions are answered by the warehouse through the outbox)
                    await self.app.reverse.report(ReportIn(order_no=no, event="return_received",
                                                           report_id=f"in-{no}"))
                await anyio.sleep(0.05)

    async def _all_reverse(self):
        found = []
        for no in self.paid:
            found.extend(await self.store.reverse_of(no))
        return found

    async def settled(self) -> None:
        with anyio.fail_after(120):
            while self.app.pipeline.in_flight or await self.store.outbox_pending():
                await anyio.sleep(0.05)


async def run_race(kind: str, tmp_path) -> None:
    async with backends(kind, tmp_path) as (url, extra):
        app = await app_module.build(settings(url, extra))
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(app.pipeline.run)
                race = Race(app)
                rng = random.Random(SEED + 1)
                chosen = rng.sample(range(N), CANCELS + RETURNS)
                cancels, returns = chosen[:CANCELS], chosen[CANCELS:]
                twice = set(rng.sample(chosen, DUPLICATES))
                async with anyio.create_task_group() as work:
                    work.start_soon(race.create_and_pay)
                    for i in cancels:
                        work.start_soon(race.cancel, i, i in twice)
                    for i in returns:
                        work.start_soon(race.ret, i, i in twice)
                await race.goods_back()
                await race.settled()
                numbers = race.numbers
                await check(race, numbers, {numbers[i] for i in cancels}, {numbers[i] for i in returns})
                tg.cancel_scope.cancel()
        finally:
            await app.aclose()


async def check(race: Race, numbers: list[str], cancels: set[str], returns: set[str]) -> None:
    effects = race.app.effects
    dispatched = {e.payload["order_no"] for e in effects.applied("wms") if e.op == "dispatch"}
    intercepted = {e.payload["order_no"] for e in effects.applied("wms") if e.op == "intercept" and e.result}
    refunds = Counter()
    for e in effects.applied("finance"):
        if e.op == "refund":
            refunds[e.payload["order_no"]] += e.payload["amount"]
    sold = Counter()
    outcomes = Counter()
    for no in numbers:
        stored = await race.store.get(no)
        order = decode(stored.doc)
        reverse = await race.store.reverse_of(no)
        assert all(r.state in ("done", "refused") for r in reverse), (no, [r.state for r in reverse])
        assert refunds[no] <= race.paid[no], no
        if order.status == states.CANCELLED:
            assert no in cancels and no not in race.out_before_cancel, no
            assert no not in dispatched or no in intercepted, no
            assert refunds[no] == race.paid[no], no
            outcomes["cancelled"] += 1
            continue
        ledger = (order.results.get("reverse") or {}).get("lines", {})
        kept = {line.line_no: line.qty - ledger.get(str(line.line_no), 0) for line in order.lines}
        for line in order.lines:
            sold[line.sku] += kept[line.line_no]
        expected = race.paid[no] - order.amounts.payable  # what partial cancels took off the order
        expected += sum(share(line.payable - line.freight, line.qty, 0, ledger.get(str(line.line_no), 0))
                        for line in order.lines)
        if refunds[no] != expected:
            import pprint
            with open("/tmp/race_fail.txt", "w") as f:
                pprint.pprint([(h.stage, h.outcome, h.reason[:60], h.at) for h in await race.store.history(no)], f)
                pprint.pprint([(r.kind, r.state, r.doc) for r in reverse], f)
                pprint.pprint(await race.store.events(no), f)
        assert refunds[no] == expected, (no, order.status, refunds[no], expected)
        if no in race.out_before_cancel or no in returns:
            assert order.status in (states.REFUNDED, states.DELIVERED, states.SHIPPED, states.RETURN_REQUESTED), no
            assert any(r.kind in ("return", "cancel") and r.state == "done" for r in reverse), no
        outcomes[order.status] += 1
    total_refunded = sum(refunds.values())
    assert total_refunded <= sum(race.paid.values())
    for sku in SKUS:
        level = race.ports.inventory.level(sku, "WH-1")
        assert level.sellable + level.reserved + level.sold == STOCK, sku
        assert level.reserved == 0 and level.sold == sold[sku], (sku, level, sold[sku])
    restocks = Counter(e.key for e in effects.applied("inventory") if e.op == "restock")
    assert all(n == 1 for n in restocks.values())
    assert outcomes["cancelled"] > CANCELS // 2 and sum(refunds.values()) > 0
    print(f"reverse race: {dict(outcomes)}; {len(intercepted)} intercepted after dispatch; "
          f"refunded {total_refunded} of {sum(race.paid.values())} cents")


async def test_reverse_requests_racing_the_forward_flow_keep_money_stock_and_state_consistent(tmp_path):
    await run_race("embedded", tmp_path)


async def test_reverse_race_on_postgresql_rabbitmq_and_redis(tmp_path):
    await run_race("production", tmp_path)
