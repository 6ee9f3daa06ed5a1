"""Seed 001's payment boundaries over the HTTP API, in process, on a virtual clock.

The pipeline's workers and timers do not run here, so "the timeout has not fired
yet" is a state the tests hold on purpose; `expire_payment` stands in for the
pay-deadline timer where a test wants it to have fired.
"""
from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from aiohttp.test_utils import TestClient, TestServer

from oms_pipeline import api, config, openapi, states
from oms_pipeline import app as app_module
from oms_pipeline.clock import VirtualClock
from oms_pipeline.outcome import TransientError
from oms_pipeline.ports import store as st

pytestmark = pytest.mark.anyio

START = 1_700_000_000.0
ROUTES = Path(__file__).resolve().parent.parent / "config" / "routes.toml"


class Env:
    def __init__(self, client: TestClient, app, clock: VirtualClock) -> None:
        self.client, self.app, self.clock = client, app, clock

    async def call(self, method: str, path: str, body=None) -> tuple[int, dict]:
        resp = await self.client.request(method, path, json=body)
        return resp.status, await resp.json()

    async def create(self, ext: str, qty: int = 2, **over) -> dict:
        body = {"source": "app", "external_id": ext, "kind": "toc", "member_id": "M1",
                "consignee": {"name": "张三", "phone": "13812345678", "province": "北京市", "city": "北京市",
                              "district": "朝阳区", "detail": "建国路 1 号"},
                "lines": [{"sku": "A", "qty": qty, "unit_price": 1990, "warehouse": "WH-BJ"}], **over}
        status, created = await self.call("POST", "/orders", body)
        assert status == 201, created
        return created

    async def pay(self, no: str, pid: str, amount: int, **over) -> tuple[int, dict]:
        return await self.call("POST", "/payments", {"order_no": no, "payment_id": pid, "amount": amount, **over})

    async def stored(self, no: str):
        return await self.app.pipeline.store.get(no)

    def refunds(self) -> dict[str, int]:
        return {e.key: e.payload["amount"] for e in self.app.effects.applied("finance") if e.op == "refund"}

    def stock(self) -> tuple[int, int, int]:
        level = self.app.pipeline.ports.inventory.level("A", "WH-BJ")
        return level.sellable, level.reserved, level.sold


@pytest.fixture
async def env():
    settings = config.from_mapping({"store": {"url": "memory://"}, "metrics": {"port": 0},
                                    "routing": {"file": str(ROUTES)},
                                    "downstream": {"inventory": {"stock": {"WH-BJ": {"A": 10}}}}})
    clock = VirtualClock(START)
    app = await app_module.build(settings, clock=clock)
    server = api.Api(app)
    client = TestClient(TestServer(server.web_app()))
    await client.start_server()
    try:
        yield Env(client, app, clock)
    finally:
        await client.close()
        app.pipeline.stop()
        await app.aclose()


# -- can-pay ----------------------------------------------------------------------------------

async def test_can_pay_answers_no_once_the_deadline_has_passed_even_before_the_timeout(env):
    created = await env.create("E1")
    no, deadline = created["order_no"], created["pay_deadline"]
    assert deadline == START + 600
    status, body = await env.call("GET", f"/orders/{no}/can-pay")
    assert status == 200 and body == {"order_no": no, "can_pay": True, "reason": "waiting for payment",
                                      "pay_deadline": deadline}
    openapi.CanPay.model_validate(body)
    env.clock.set(deadline)
    assert (await env.call("GET", f"/orders/{no}/can-pay"))[1]["can_pay"] is True  # at the deadline: still
    env.clock.advance(0.001)
    body = (await env.call("GET", f"/orders/{no}/can-pay"))[1]
    assert (body["can_pay"], body["reason"]) == (False, "the pay deadline has passed")
    assert (await env.stored(no)).state == st.WAIT_PAY  # the timeout has not been processed


async def test_can_pay_is_no_for_paid_cancelled_unprepaid_and_404_for_unknown(env):
    paid, cancelled = await env.create("E1"), await env.create("E2")
    assert (await env.pay(paid["order_no"], "P1", paid["payable"]))[0] == 200
    env.clock.advance(601)
    assert await env.app.pipeline.expire_payment(cancelled["order_no"])
    tob_status, tob = await env.call("POST", "/orders", {
        "source": "sales_plan", "external_id": "B1", "kind": "tob", "member_id": "B1", "payment_method": "none",
        "consignee": {"name": "n", "phone": "13800000000", "province": "北京市", "city": "北京市"},
        "lines": [{"sku": "A", "qty": 1, "unit_price": 100, "warehouse": "WH-BJ"}]})
    assert tob_status == 201
    for no, reason in ((paid["order_no"], "a payment was received already"),
                       (cancelled["order_no"], "the order is cancelled"),
                       (tob["order_no"], "this order is not paid at a cashier")):
        assert (await env.call("GET", f"/orders/{no}/can-pay"))[1]["reason"] == reason
        assert (await env.call("GET", f"/orders/{no}/can-pay"))[1]["can_pay"] is False
    assert (await env.call("GET", "/orders/999999999999999999/can-pay"))[0] == 404


# -- the deadline -----------------------------------------------------------------------------

async def test_a_payment_exactly_at_the_deadline_is_taken(env):
    created = await env.create("E1")
    env.clock.set(created["pay_deadline"])
    assert await env.app.pipeline.expire_payment(created["order_no"]) is False  # its timer, right at it
    status, body = await env.pay(created["order_no"], "P1", created["payable"])
    assert (status, body["status"]) == (200, "PAID")
    assert await env.app.pipeline.expire_payment(created["order_no"]) is False  # the timer then changes nothing
    assert env.stock() == (8, 0, 2)  # confirmed: sold


async def test_a_payment_just_after_the_deadline_cancels_the_order_now_and_is_refunded(env):
    created = await env.create("E1")
    no = created["order_no"]
    env.clock.set(created["pay_deadline"] + 0.5)  # the timeout has not fired yet
    status, body = await env.pay(no, "P-LATE", created["payable"], channel="wechat")
    assert status == 200, body
    openapi.PaymentResult.model_validate(body)
    assert body == {"order_no": no, "duplicate": False, "status": "CANCELLED", "refunded": True,
                    "refund_id": body["refund_id"]} and body["refund_id"]
    stored = await env.stored(no)
    assert (stored.state, stored.status) == (st.CANCELLED, states.CANCELLED)
    assert env.refunds() == {f"{no}:refund:P-LATE": created["payable"]}


# -- late payments ----------------------------------------------------------------------------

async def test_a_payment_after_cancellation_is_recorded_refunded_once_and_never_revives_the_order(env):
    created = await env.create("E1")
    no, payable = created["order_no"], created["payable"]
    env.clock.advance(601)
    assert await env.app.pipeline.expire_payment(no)  # the timer fired
    events_before = await env.app.pipeline.store.events(no)
    env.clock.advance(3600)
    status, body = await env.pay(no, "P-1", payable, non_cash=500)
    assert (status, body["refunded"], body["duplicate"]) == (200, True, False)
    status, again = await env.pay(no, "P-1", payable, non_cash=500)  # the payment centre retries
    assert (status, again["refunded"], again["duplicate"], again["refund_id"]) == (200, True, True, body["refund_id"])
    stored = await env.stored(no)
    assert (stored.state, stored.status) == (st.CANCELLED, states.CANCELLED)
    doc = (await env.call("GET", f"/orders/{no}"))[1]
    assert doc["order"]["results"]["late_payments"] == [
        {"payment_id": "P-1", "amount": payable, "non_cash": 500, "cash": payable - 500, "channel": "unknown",
         "at": START + 4201, "why": "after cancellation"}]
    assert doc["order"]["amounts"]["paid"] == 0  # never booked on the order
    late = [h for h in doc["history"] if h["outcome"] == "late_payment"]
    assert len(late) == 1 and late[0]["stage"] == "payment" and "P-1" in late[0]["reason"]
    assert await env.app.pipeline.store.events(no) == events_before  # no state change at all
    assert env.refunds() == {f"{no}:refund:P-1": payable}
    assert env.app.effects.duplicates.get("finance") == 1  # the retry found the refund booked
    # a second, different late payment is refunded by its own key
    await env.pay(no, "P-2", 100)
    assert env.refunds() == {f"{no}:refund:P-1": payable, f"{no}:refund:P-2": 100}


async def test_a_refund_that_fails_is_answered_503_and_booked_when_the_notification_comes_again(env):
    created = await env.create("E1")
    no = created["order_no"]
    env.clock.advance(601)
    finance = env.app.pipeline.ports.finance
    real = finance.refund

    async def down(*args, **kwargs):
        raise TransientError("finance: simulated outage")
    finance.refund = down
    status, body = await env.pay(no, "P-1", created["payable"])
    assert status == 503 and "recorded" in body["error"]
    finance.refund = real
    status, body = await env.pay(no, "P-1", created["payable"])
    assert status == 200 and body["refunded"] is True
    assert env.refunds() == {f"{no}:refund:P-1": created["payable"]}


# -- amounts ----------------------------------------------------------------------------------

async def test_an_amount_that_differs_is_recorded_and_sent_to_manual_review(env):
    created = await env.create("E1")
    no, payable = created["order_no"], created["payable"]
    status, body = await env.pay(no, "P-WRONG", payable - 1)
    assert status == 200, body
    openapi.PaymentResult.model_validate(body)
    assert body == {"order_no": no, "duplicate": False, "status": "MANUAL_REVIEW",
                    "reason": f"paid {payable - 1}, payable {payable}"}
    stored = await env.stored(no)
    assert (stored.state, stored.status) == (st.MANUAL, states.MANUAL_REVIEW)
    view = (await env.call("GET", f"/orders/{no}"))[1]
    assert view["order"]["amounts"]["paid"] == payable - 1 and view["order"]["results"]["payment_id"] == "P-WRONG"
    items = (await env.call("GET", "/exceptions"))[1]["items"]
    assert [i["order_no"] for i in items] == [no] and f"paid {payable - 1}, payable {payable}" in items[0]["reason"]
    assert (await env.pay(no, "P-WRONG", payable - 1))[1]["duplicate"] is True
    assert (await env.pay(no, "P-OTHER", payable))[0] == 409  # a person decides first
    assert env.stock() == (8, 2, 0)  # still held for the order
    env.clock.advance(600)
    assert await env.app.pipeline.expire_payment(no) is False  # the timeout does not cancel it
    # the person accepts it: fulfilment starts and the stock is sold
    status, body = await env.call("POST", f"/exceptions/{no}/replay")
    assert status == 200, body
    assert env.stock() == (8, 0, 2)
    assert [(e.from_status, e.to_status) for e in await env.app.pipeline.store.events(no)] == [
        ("CREATED", "WAIT_PAY"), ("WAIT_PAY", "MANUAL_REVIEW"), ("MANUAL_REVIEW", "IN_FULFILMENT")]


async def test_a_mixed_payment_records_its_non_cash_and_cash_parts(env):
    created = await env.create("E1")
    no, payable = created["order_no"], created["payable"]
    status, body = await env.pay(no, "P1", payable, non_cash=payable + 1)
    assert status == 422 and body["errors"][0]["path"] == "non_cash"
    assert (await env.pay(no, "P1", payable, non_cash=1000))[0] == 200
    amounts = (await env.call("GET", f"/orders/{no}"))[1]["order"]["amounts"]
    assert (amounts["paid"], amounts["non_cash"], amounts["cash"]) == (payable, 1000, payable - 1000)


# -- stock at intake --------------------------------------------------------------------------

async def test_an_order_whose_stock_is_short_is_409_and_not_created(env):
    await env.create("E1", qty=8)
    body = {"source": "app", "external_id": "E2", "kind": "toc", "member_id": "M1",
            "consignee": {"name": "n", "phone": "13800000000", "province": "北京市", "city": "北京市"},
            "lines": [{"sku": "A", "qty": 3, "unit_price": 100, "warehouse": "WH-BJ"}]}
    status, answer = await env.call("POST", "/orders", body)
    assert (status, answer) == (409, {"error": "out of stock: A@WH-BJ"})
    assert (await env.call("GET", "/orders?member=M1"))[1]["items"].__len__() == 1
    assert env.stock() == (2, 8, 0)
    # the first order's retry is still that order, whatever the stock
    status, again = await env.call("POST", "/orders", {**body, "external_id": "E1",
                                                        "lines": [{**body["lines"][0], "qty": 8}]})
    assert status == 200 and again["created"] is False


async def test_a_second_different_payment_for_a_paid_order_is_recorded_and_refunded_once(env):
    created = await env.create("E-TWICE")
    no, payable = created["order_no"], created["payable"]
    assert (await env.pay(no, "P-1", payable))[1]["status"] == "PAID"
    status, body = await env.pay(no, "P-2", payable)
    assert status == 409 and "try again" in body["error"], body  # in flight: recorded once it rests
    async with anyio.create_task_group() as tg:
        await tg.start(env.app.pipeline.run)
        for _ in range(200):
            status, body = await env.pay(no, "P-2", payable)
            if status == 200:
                break
            await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert body["refunded"] is True and body["duplicate"] is False, body
    openapi.PaymentResult.model_validate(body)
    again = (await env.pay(no, "P-2", payable))[1]
    assert again["refunded"] is True and again["duplicate"] is True  # a repeat: the same refund, once
    assert env.refunds() == {f"{no}:refund:P-2": payable}
    view = (await env.call("GET", f"/orders/{no}"))[1]
    assert view["order"]["results"]["payment_id"] == "P-1" and view["order"]["amounts"]["paid"] == payable
    assert [p["payment_id"] for p in view["order"]["results"]["late_payments"]] == ["P-2"]
