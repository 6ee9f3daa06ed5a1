"""The reverse flow on the embedded adapters, one behaviour a test (DESIGN R-5).

The daemon's App runs with the real stages and routing table, the simulated
downstream systems and the outbox relay; the tests pay orders the way the
payment handler does, send reverse requests and WMS/TMS reports, and then
look at money (finance refunds, account credits), stock and the order's state.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from oms_pipeline import app as app_module
from oms_pipeline import config, states
from oms_pipeline.order import decode
from oms_pipeline.ports import store as st
from oms_pipeline.reverse import view
from oms_pipeline.schemas import DecisionIn, ReportIn, ReverseIn, ReverseLineIn

pytestmark = pytest.mark.anyio

ROUTES = Path(__file__).resolve().parent.parent / "config" / "routes.toml"
STOCK = 50


def order_request(ext: str, lines=((1, "A", 2, 1990),), kind: str = "toc", pickup_point: str | None = None,
                  amounts: dict | None = None) -> dict:
    body = {"source": "app", "external_id": ext, "kind": kind, "member_id": "M1",
            "consignee": {"name": "张三", "phone": "13812345678", "province": "北京市", "city": "北京市",
                          "district": "朝阳区", "detail": "建国路 1 号"},
            "lines": [{"sku": sku, "qty": qty, "unit_price": price, "warehouse": "WH-BJ"}
                      for _, sku, qty, price in lines],
            "amounts": amounts or {}}
    if pickup_point:
        body["consignee"]["pickup_point"] = pickup_point
    if kind != "toc":
        body.update(source="sales_plan", payment_method="none")
    return body


def settings(tmp_path, **extra) -> config.Settings:
    raw = {"store": {"url": f"sqlite:///{tmp_path / 'oms.sqlite3'}"}, "metrics": {"port": 0},
           "routing": {"file": str(ROUTES)},
           "downstream": {"inventory": {"stock": {"WH-BJ": {"A": STOCK, "B": STOCK, "C": STOCK}}}}}
    for key, value in extra.items():
        raw[key] = {**raw.get(key, {}), **value}
    return config.from_mapping(raw)


class Env:
    def __init__(self, app) -> None:
        self.app = app
        self.pipeline = app.pipeline
        self.store = app.pipeline.store
        self.ports = app.pipeline.ports

    async def create(self, ext: str, **kw) -> str:
        created = (await self.app.intake.create([self.app.intake.request(order_request(ext, **kw))]))[0]
        assert created.created, created
        return created.order_no

    async def pay(self, no: str) -> None:
        def booked(o):
            o.amounts.paid = o.amounts.cash = o.amounts.payable
            o.results["payment_id"] = f"P-{no}"
        assert await self.pipeline.release(no, "paid", booked)

    async def order(self, no: str):
        stored = await self.store.get(no)
        return stored, decode(stored.doc)

    async def until(self, no: str, *states_: str, timeout: float = 10.0) -> None:
        with anyio.fail_after(timeout):
            while (await self.store.get(no)).state not in states_:
                await anyio.sleep(0.01)

    async def settled(self) -> None:
        """Nothing in flight and every outbox command applied."""
        with anyio.fail_after(10):
            while self.pipeline.in_flight or await self.store.outbox_pending():
                await anyio.sleep(0.01)

    async def reverse(self, no: str, request_id: str, **kw):
        return await self.app.reverse.request(no, ReverseIn(request_id=request_id, **kw))

    async def answered(self, answer, *states_: str):
        """The reverse order of `answer` once it is in one of `states_` (the warehouse answers an
        interception through the outbox, a moment later)."""
        with anyio.fail_after(10):
            while (record := await self.store.reverse_get(answer.body["reverse_no"])).state not in states_:
                await anyio.sleep(0.01)
        return view(record)

    async def report(self, no: str, event: str):
        if event == "outbound":
            assert await self.ports.wms.mark_outbound(no)
        return await self.app.reverse.report(ReportIn(order_no=no, event=event, report_id=f"{no}-{event}"))

    def refunded(self, no: str) -> int:
        return self.ports.finance.refunded[no]

    def stock(self, sku: str = "A") -> tuple[int, int, int]:
        level = self.ports.inventory.level(sku, "WH-BJ")
        return level.sellable, level.reserved, level.sold

    def effects(self, system: str, op: str, no: str) -> list:
        # A command's key begins with its order's number or with its reverse number (R + order number).
        return [e for e in self.app.effects.applied(system) if e.op == op and e.key.startswith((no, "R" + no))]


@asynccontextmanager
async def running(tmp_path, **extra):
    app = await app_module.build(settings(tmp_path, **extra))
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(app.pipeline.run)
            yield Env(app)
            tg.cancel_scope.cancel()
    finally:
        await app.aclose()


async def test_a_cancel_before_payment_cancels_at_once_and_releases_the_reservation(tmp_path):
    async with running(tmp_path) as env:
        no = await env.create("E1")
        answer = await env.reverse(no, "c1")
        assert answer.status == 200 and answer.body["state"] == "done" and answer.body["refund"] == 0
        stored, order = await env.order(no)
        assert stored.state == st.CANCELLED and order.status == states.CANCELLED
        await env.settled()
        assert env.stock() == (STOCK, 0, 0)
        assert env.refunded(no) == 0


async def test_a_cancel_in_flight_stops_the_order_before_dispatch_and_refunds_what_was_paid(tmp_path):
    slow = {"latency": {"tms": {"mean_ms": 300.0}}}  # waybill takes a while: the order is in flight
    async with running(tmp_path, downstream=slow) as env:
        no = await env.create("E1")
        await env.pay(no)
        await anyio.sleep(0.1)
        answer = await env.reverse(no, "c1", reason="changed my mind")
        assert answer.body["state"] == "done", answer
        stored, order = await env.order(no)
        assert stored.state == st.CANCELLED and order.status == states.CANCELLED
        assert [e.to_status for e in await env.store.events(no)][-2:] == [states.CANCEL_REQUESTED, states.CANCELLED]
        await env.settled()
        assert env.refunded(no) == order.amounts.paid == 2 * 1990
        assert env.stock() == (STOCK, 0, 0)
        assert not env.effects("wms", "dispatch", no)


async def test_a_cancel_after_dispatch_asks_the_warehouse_to_intercept(tmp_path):
    async with running(tmp_path) as env:
        no = await env.create("E1")
        await env.pay(no)
        await env.until(no, st.DONE)
        answer = await env.reverse(no, "c1")
        assert answer.status == 202 and answer.body["state"] == "intercepting"
        done = await env.answered(answer, "done")
        assert "intercepted by the warehouse" in done["notes"]
        stored, order = await env.order(no)
        assert stored.state == st.CANCELLED
        assert states.INTERCEPTING in order.timestamps
        await env.settled()
        assert env.refunded(no) == 2 * 1990 and env.stock() == (STOCK, 0, 0)
        assert len(env.effects("wms", "intercept", no)) == 1


async def test_a_cancel_after_outbound_becomes_a_return_refunded_when_the_goods_are_back(tmp_path):
    async with running(tmp_path) as env:
        no = await env.create("E1", amounts={"freight": 500})
        await env.pay(no)
        await env.until(no, st.DONE)
        assert (await env.report(no, "outbound")).status == 200
        answer = await env.reverse(no, "c1")
        assert answer.status == 202 and answer.body["state"] == "waiting_goods"
        assert (await env.order(no))[1].status == states.RETURN_REQUESTED
        assert env.refunded(no) == 0
        received = await env.report(no, "return_received")
        assert received.status == 200 and received.body["state"] == "done"
        await env.settled()
        _, order = await env.order(no)
        assert order.status == states.REFUNDED
        assert env.refunded(no) == 2 * 1990  # freight stays with a return (refund_freight_on_return = false)
        assert env.stock() == (STOCK, 0, 0)


async def test_a_partial_return_refunds_the_allocated_amount_of_its_lines_and_keeps_the_promotion(tmp_path):
    async with running(tmp_path) as env:
        lines = ((1, "A", 1, 3000), (2, "B", 3, 1000))
        no = await env.create("E1", lines=lines, amounts={"discount": 600, "freight": 0})
        await env.pay(no)
        await env.until(no, st.DONE)
        await env.report(no, "outbound")
        await env.report(no, "delivered")
        _, order = await env.order(no)
        line2 = next(line for line in order.lines if line.line_no == 2)
        first = await env.reverse(no, "r1", kind="return", lines=[ReverseLineIn(line_no=2, qty=1)])
        assert first.body["state"] == "waiting_goods"
        await env.report(no, "return_received")
        await env.settled()
        one_unit = line2.payable // 3  # 3000 - 300 of discount, over 3 units
        assert env.refunded(no) == one_unit == 900
        assert (await env.order(no))[1].status == states.DELIVERED
        assert env.stock("B") == (STOCK - 2, 0, 2)
        rest = await env.reverse(no, "r2", kind="return")
        assert rest.body["state"] == "waiting_goods"
        await env.report(no, "return_received")
        await env.settled()
        assert env.refunded(no) == order.amounts.paid == 5400
        assert (await env.order(no))[1].status == states.REFUNDED
        assert env.stock("A") == env.stock("B") == (STOCK, 0, 0)


async def test_duplicate_reverse_requests_are_one_reverse_order_and_refund_once(tmp_path):
    async with running(tmp_path) as env:
        no = await env.create("E1")
        await env.pay(no)
        await env.until(no, st.DONE)
        answers = []
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                async def send():
                    answers.append(await env.reverse(no, "same-request"))
                tg.start_soon(send)
        assert len({a.body["reverse_no"] for a in answers}) == 1
        assert sum(not a.body["duplicate"] for a in answers) == 1
        await env.answered(answers[0], "done")
        await env.settled()
        assert env.refunded(no) == 2 * 1990
        assert len(await env.store.reverse_of(no)) == 1
        other = await env.reverse(no, "same-request", kind="return")
        assert other.status == 409  # one request id, one kind


async def test_a_rejected_parcel_comes_back_and_is_refunded(tmp_path):
    async with running(tmp_path) as env:
        no = await env.create("E1")
        await env.pay(no)
        await env.until(no, st.DONE)
        await env.report(no, "outbound")
        assert (await env.report(no, "rejected")).body["status"] == states.REJECTED
        assert [r.kind for r in await env.store.reverse_of(no)] == ["reject"]
        await env.report(no, "return_received")
        await env.settled()
        assert (await env.order(no))[1].status == states.REFUNDED
        assert env.refunded(no) == 2 * 1990 and env.stock() == (STOCK, 0, 0)


async def test_an_exchange_takes_the_goods_back_and_ships_a_new_order_without_money(tmp_path):
    async with running(tmp_path) as env:
        no = await env.create("E1")
        await env.pay(no)
        await env.until(no, st.DONE)
        await env.report(no, "outbound")
        await env.report(no, "delivered")
        answer = await env.reverse(no, "x1", kind="exchange", pickup=True)
        new_no = answer.body["new_order_no"]
        assert new_no and answer.body["state"] == "waiting_goods"
        await env.until(new_no, st.DONE)
        _, new = await env.order(new_no)
        assert new.kind == "exchange" and new.amounts.payable == 0
        await env.report(no, "return_received")
        await env.settled()
        assert env.refunded(no) == 0
        assert (await env.order(no))[1].status == states.DELIVERED
        assert len(env.effects("tms", "pickup", no)) == 1
        assert env.stock() == (STOCK - 2, 0, 2)  # two came back, two went out again


async def test_a_reissue_ships_a_new_order_and_leaves_the_original_as_it_was(tmp_path):
    async with running(tmp_path) as env:
        no = await env.create("E1")
        await env.pay(no)
        await env.until(no, st.DONE)
        assert (await env.reverse(no, "early", kind="reissue")).body["state"] == "refused"
        await env.report(no, "outbound")
        answer = await env.reverse(no, "r1", kind="reissue", lines=[ReverseLineIn(line_no=1, qty=1)])
        assert answer.body["state"] == "done"
        await env.until(answer.body["new_order_no"], st.DONE)
        _, new = await env.order(answer.body["new_order_no"])
        assert new.kind == "reissue" and [line.qty for line in new.lines] == [1]
        assert (await env.order(no))[1].status == states.SHIPPED


async def test_a_partial_cancel_before_dispatch_ships_the_rest_and_refunds_the_cancelled_units(tmp_path):
    slow = {"latency": {"tms": {"mean_ms": 300.0}}}
    async with running(tmp_path, downstream=slow) as env:
        no = await env.create("E1", lines=((1, "A", 3, 1000), (2, "B", 1, 500)))
        await env.pay(no)
        await anyio.sleep(0.1)
        answer = await env.reverse(no, "c1", lines=[ReverseLineIn(line_no=1, qty=2)])
        assert answer.body["state"] == "done" and answer.body["refund"] == 2000
        await env.until(no, st.DONE)
        await env.settled()
        _, order = await env.order(no)
        assert [(line.sku, line.qty) for line in order.lines] == [("A", 1), ("B", 1)]
        assert order.amounts.payable == 1500 and env.refunded(no) == 2000
        assert env.stock("A") == (STOCK - 1, 0, 1)


async def test_a_buyer_cannot_cancel_an_o2o_order_once_it_is_in_production(tmp_path):
    async with running(tmp_path) as env:
        no = await env.create("E1", pickup_point="STORE-7")
        await env.pay(no)
        await env.until(no, st.DONE)
        refused = await env.reverse(no, "c1")
        assert refused.body["state"] == "refused" and "o2o_pickup" in refused.body["result"]
        assert (await env.store.get(no)).state == st.DONE
        by_service = await env.reverse(no, "c2", source="customer_service")
        assert (await env.answered(by_service, "done"))["result"] == "cancelled"


async def test_a_merchant_refusal_goes_to_arbitration_where_customer_service_decides(tmp_path):
    async with running(tmp_path, reverse={"return_approval": "merchant"}) as env:
        no = await env.create("E1")
        await env.pay(no)
        await env.until(no, st.DONE)
        await env.report(no, "outbound")
        await env.report(no, "delivered")
        answer = await env.reverse(no, "r1", kind="return")
        assert answer.body["state"] == "awaiting_merchant"
        rno = answer.body["reverse_no"]
        refused = await env.app.reverse.decide(rno, **DecisionIn(decision="refuse").model_dump())
        assert refused.body["state"] == "arbitration"
        approved = await env.app.reverse.decide(rno, "approve", "customer_service", "")
        assert approved.body["state"] == "waiting_goods"
        await env.report(no, "return_received")
        await env.settled()
        assert env.refunded(no) == 2 * 1990


async def test_a_cancel_racing_the_warehouse_shipping_becomes_a_return(tmp_path):
    async with running(tmp_path) as env:
        no = await env.create("E1")
        await env.pay(no)
        await env.until(no, st.DONE)
        env.ports.wms.outbound.add(no)  # out of the door before the interception arrives, not yet reported
        answer = await env.reverse(no, "c1")
        record = await env.answered(answer, "waiting_goods")
        assert "too late" in " ".join(record["notes"])
        assert (await env.order(no))[1].status == states.RETURN_REQUESTED
        assert (await env.report(no, "return_received")).body["state"] == "done"
        await env.settled()
        assert env.refunded(no) == 2 * 1990 and env.stock() == (STOCK, 0, 0)


async def test_a_tob_order_settled_on_account_is_credited_not_refunded(tmp_path):
    async with running(tmp_path) as env:
        no = await env.create("B1", kind="tob", lines=((1, "A", 2, 1000), (2, "B", 1, 500)))
        await env.until(no, st.DONE)
        await env.report(no, "outbound")
        answer = await env.reverse(no, "r1", kind="return", lines=[ReverseLineIn(line_no=1, qty=1)])
        assert answer.body["state"] == "waiting_goods"
        await env.report(no, "return_received")
        await env.settled()
        assert env.refunded(no) == 0 and env.ports.finance.credited[no] == 1000
        assert env.stock() == (STOCK - 1, 0, 1)
