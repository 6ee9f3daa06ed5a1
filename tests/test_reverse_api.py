"""Cancel, returns and WMS/TMS reports over real HTTP against a running daemon, and `oms cancel`.

Every answer is validated against the shape the OpenAPI document promises.
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time

import pytest
from pydantic import BaseModel

from oms_pipeline import openapi
from tests.support.daemon import Daemon, write_config

pytestmark = pytest.mark.slow
BAD = itertools.count(1)

ORDER = {"source": "app", "kind": "toc", "member_id": "M-REV",
         "consignee": {"name": "张三", "phone": "13812345678", "province": "北京市", "city": "北京市",
                       "district": "朝阳区", "detail": "建国路 1 号"},
         "lines": [{"sku": "SKU-000001", "qty": 2, "unit_price": 1990, "warehouse": "WH-BJ"},
                   {"sku": "SKU-000002", "qty": 1, "unit_price": 990, "warehouse": "WH-BJ"}]}


def shaped(model: type[BaseModel], body) -> dict:
    model.model_validate(body)
    return body


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reverse-api")
    cfg, port = write_config(tmp)
    d = Daemon(cfg, port).start()
    yield d
    d.stop()


def paid_order(d: Daemon, ext: str) -> str:
    status, body = d.post("/orders", {**ORDER, "external_id": ext})
    assert status == 201, body
    no = body["order_no"]
    status, body = d.post("/payments", {"order_no": no, "payment_id": f"P-{ext}", "amount": body["payable"]})
    assert status == 200, body
    return no


def wait_state(d: Daemon, no: str, state: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = d.get(f"/orders/{no}")
        if body["state"] == state:
            return body
        assert time.monotonic() < deadline, body["state"]
        time.sleep(0.05)


def wait_reverse(d: Daemon, rno: str, state: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status, body = d.get(f"/reverse/{rno}")
        if body["state"] == state:
            return shaped(openapi.ReverseView, body)
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_a_cancel_is_idempotent_and_listed_with_the_order(daemon):
    no = paid_order(daemon, "REV-1")
    wait_state(daemon, no, "done")
    status, first = daemon.post(f"/orders/{no}/cancel", {"request_id": "c-1", "reason": "changed my mind"})
    # dispatched: the warehouse is asked to intercept it, and answers through a report
    assert status == 202 and shaped(openapi.ReverseView, first)["state"] == "intercepting"
    assert not first["duplicate"]
    done = wait_reverse(daemon, first["reverse_no"], "done")
    assert done["refund"] == 2 * 1990 + 990 and "intercepted by the warehouse" in done["notes"]
    status, again = daemon.post(f"/orders/{no}/cancel", {"request_id": "c-1", "reason": "changed my mind"})
    assert status == 200 and again["duplicate"] and again["reverse_no"] == first["reverse_no"]
    status, page = daemon.get(f"/orders/{no}/reverse")
    assert status == 200 and [r["reverse_no"] for r in shaped(openapi.ReversePage, page)["items"]] == \
        [first["reverse_no"]]
    status, one = daemon.get(f"/reverse/{first['reverse_no']}")
    assert status == 200 and one["state"] == "done"
    assert wait_state(daemon, no, "cancelled")["status"] == "CANCELLED"


def test_after_outbound_a_return_waits_for_the_goods_reported_by_the_warehouse(daemon):
    no = paid_order(daemon, "REV-2")
    wait_state(daemon, no, "done")
    status, report = daemon.post("/reports", {"order_no": no, "event": "outbound", "report_id": "o-1"})
    assert status == 200 and shaped(openapi.ReportResult, report)["status"] == "SHIPPED"
    status, again = daemon.post("/reports", {"order_no": no, "event": "outbound", "report_id": "o-1"})
    assert status == 200 and again["duplicate"]
    status, ret = daemon.post(f"/orders/{no}/returns", {"request_id": "r-1", "lines": [{"line_no": 2, "qty": 1}],
                                                        "pickup": True})
    assert status == 202 and shaped(openapi.ReverseView, ret)["state"] == "waiting_goods"
    status, back = daemon.post("/reports", {"order_no": no, "event": "return_received", "report_id": "b-1"})
    assert status == 200 and back["state"] == "done" and back["refund"] == 990
    status, order = daemon.get(f"/orders/{no}")
    assert order["status"] == "DELIVERED"  # a partial return: the rest stays with the customer


@pytest.mark.parametrize("path, body, where", [
    ("cancel", {"reason": "no request id"}, "request_id"),
    ("cancel", {"request_id": "x", "kind": "return"}, "kind"),
    ("cancel", {"request_id": "x", "lines": [{"line_no": 1, "qty": -1}]}, "lines.0.qty"),
    ("cancel", {"request_id": "x", "lines": [{"line_no": 9, "qty": 1}]}, "lines"),
    ("cancel", {"request_id": "x", "lines": [{"line_no": 1, "qty": 5}]}, "lines"),
    ("cancel", {"request_id": "x", "source": "martians"}, "source"),
    ("returns", {"request_id": "x", "kind": "cancel"}, "kind"),
    ("returns", {"request_id": "x", "kind": "pullback", "mode": "later"}, "mode"),
    ("returns", {"request_id": "x", "unknown": 1}, "unknown"),
])
def test_bad_reverse_requests_name_the_field_and_change_nothing(daemon, path, body, where):
    no = paid_order(daemon, f"REV-BAD-{next(BAD)}")
    before = wait_state(daemon, no, "done")
    status, answer = daemon.post(f"/orders/{no}/{path}", body)
    assert status == 422, answer
    assert where in [e["path"] for e in answer["errors"]], answer
    status, after = daemon.get(f"/orders/{no}")
    assert after["status"] == before["status"] and after["state"] == before["state"]
    assert daemon.get(f"/orders/{no}/reverse")[1]["items"] == []


def test_reverse_requests_for_unknown_orders_are_404(daemon):
    assert daemon.post("/orders/123456789012345678/cancel", {"request_id": "x"})[0] == 404
    assert daemon.get("/reverse/R123-x")[0] == 404
    assert daemon.post("/reports", {"order_no": "123456789012345678", "event": "delivered",
                                    "report_id": "d"})[0] == 404


def test_oms_cancel_on_the_command_line(daemon):
    no = paid_order(daemon, "REV-CLI")
    wait_state(daemon, no, "done")
    env = {**os.environ, "OMS_URL": f"http://127.0.0.1:{daemon.port}"}
    done = subprocess.run([sys.executable, "-m", "oms_pipeline.cli", "cancel", no, "--reason", "duplicate order",
                           "--lines", "2:1"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{no}: cancel" in done.stdout and "intercepting" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "oms_pipeline.cli", "cancel", "123456789012345678"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 1 and "HTTP 404" in bad.stderr
