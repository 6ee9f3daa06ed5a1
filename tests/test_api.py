"""The HTTP API over real HTTP against a running daemon (run_pipeline.py in a subprocess).

Every answer body checked here is also validated against the shape the OpenAPI
document promises for it (oms_pipeline/openapi.py), so the document and the
daemon cannot drift apart unnoticed.
"""
from __future__ import annotations

import http.client
import itertools
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from oms_pipeline import api, openapi, states
from oms_pipeline.order import Address, Amounts, Line, Order
from tests.support.daemon import ROOT, Daemon, write_config

pytestmark = pytest.mark.slow

MAX_LINES = 5
MAX_BODY = 65536
TOKEN = "s3cret-token-for-tests"
_ids = itertools.count(1)


# -- helpers --------------------------------------------------------------------------------

class Answer:
    def __init__(self, status: int, headers: http.client.HTTPMessage, raw: bytes) -> None:
        self.status, self.headers, self.raw = status, headers, raw
        try:
            self.body: Any = json.loads(raw) if raw else None
        except ValueError:
            self.body = raw.decode(errors="replace")

    def __repr__(self) -> str:
        return f"<{self.status} {self.raw[:400]!r}>"


def call(port: int, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> Answer:
    """One request on its own connection (threads may call this at once)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return Answer(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def shaped(model: type[BaseModel], answer: Answer) -> Any:
    """The answer's body, after checking it has exactly the documented shape."""
    model.model_validate(answer.body)
    return answer.body


def order_request(member: str = "M1", **over: Any) -> dict[str, Any]:
    """The README's example order (ToC, paid online) with a fresh external id."""
    body = {
        "source": "app", "external_id": f"T-{next(_ids)}-{time.monotonic_ns()}", "kind": "toc", "member_id": member,
        "consignee": {"name": "张三", "phone": "13812345678", "province": "北京市", "city": "北京市",
                      "district": "朝阳区", "detail": "建国路 1 号"},
        "lines": [{"sku": "SKU-000001", "qty": 2, "unit_price": 1990, "warehouse": "WH-BJ"}],
        "amounts": {"freight": 600},
    }
    body.update(over)
    return body


def tob_request(member: str) -> dict[str, Any]:
    """A ToB sales-plan order: settled on account, no payment, passes audit."""
    return order_request(member, kind="tob", source="sales_plan", payment_method="none")


def with_config(path: Path, port: int, http_extra: str = "", extra: str = "") -> None:
    text = path.read_text().replace(f"[http]\nport = {port}\n", f"[http]\nport = {port}\n{http_extra}")
    path.write_text(text + extra)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    cfg, port = write_config(tmp)
    with_config(cfg, port, f"max_body_bytes = {MAX_BODY}\n", f"[intake]\nmax_lines = {MAX_LINES}\n")
    d = Daemon(cfg, port).start()
    yield d
    d.stop()


@pytest.fixture
def port(daemon) -> int:
    return daemon.port


def wait_for(predicate, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout}s")


# -- create ---------------------------------------------------------------------------------

def test_create_online_toc_answers_201_with_number_status_payable_and_pay_deadline(port):
    before = time.time()
    answer = call(port, "POST", "/orders", order_request())
    assert answer.status == 201, answer
    body = shaped(openapi.Created, answer)
    assert len(body["order_no"]) == 30 and body["order_no"].isdigit()
    assert body["created"] is True and body["status"] == states.WAIT_PAY
    assert body["payable"] == 2 * 1990 + 600
    assert before + 600 - 5 <= body["pay_deadline"] <= time.time() + 600 + 5  # payment.timeout, 10 min


def test_create_tob_answers_201_without_a_pay_deadline(port):
    answer = call(port, "POST", "/orders", tob_request("B-NODEADLINE"))
    assert answer.status == 201, answer
    body = shaped(openapi.Created, answer)
    assert body["status"] == states.IN_FULFILMENT and body["pay_deadline"] is None


def test_a_repeated_create_answers_200_with_the_same_order(port):
    request = order_request()
    first = call(port, "POST", "/orders", request)
    again = call(port, "POST", "/orders", request)
    assert (first.status, again.status) == (201, 200), (first, again)
    view = shaped(openapi.OrderView, again)
    assert view["order_no"] == first.body["order_no"] and view["created"] is False
    assert view["payable"] == first.body["payable"] and view["pay_deadline"] == first.body["pay_deadline"]


def test_50_concurrent_identical_creates_make_exactly_one_order(port):
    member = f"M-RACE-{time.monotonic_ns()}"
    request = order_request(member)
    start = threading.Barrier(50)

    def create(_: int) -> Answer:
        start.wait()
        return call(port, "POST", "/orders", request)

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(create, range(50)))
    codes = sorted(a.status for a in answers)
    assert codes == [200] * 49 + [201], answers
    assert len({a.body["order_no"] for a in answers}) == 1
    listed = shaped(openapi.OrderPage, call(port, "GET", f"/orders?member={member}"))
    assert [item["order_no"] for item in listed["items"]] == [answers[0].body["order_no"]]


# -- validation -----------------------------------------------------------------------------

def _mutate(**changes: Any):
    """A valid order with `changes` applied: dotted path -> new value (DROP deletes)."""
    def build() -> dict[str, Any]:
        body = order_request("M-INVALID")
        for path, value in changes.items():
            *parents, leaf = path.split("__")
            target: Any = body
            for key in parents:
                target = target[int(key)] if isinstance(target, list) else target[key]
            if value is DROP:
                del target[leaf]
            else:
                target[leaf] = value
        return body
    return build


DROP = object()
LINE = {"sku": "SKU-000002", "qty": 1, "unit_price": 100}

INVALID = {
    "malformed-json": (b'{"source": "app", "lines": [', [("$", "not valid JSON")]),
    "not-an-object": (b'["an", "array"]', [("$", "valid dictionary")]),
    "empty-body": (b"", [("$", "not valid JSON")]),
    "string-qty": (_mutate(lines__0__qty="2"), [("lines.0.qty", "valid integer")]),
    "float-price": (_mutate(lines__0__unit_price=19.9), [("lines.0.unit_price", "valid integer")]),
    "negative-qty": (_mutate(lines__0__qty=-1), [("lines.0.qty", "greater than or equal to 1")]),
    "negative-freight": (_mutate(amounts__freight=-600), [("amounts.freight", "greater than or equal to 0")]),
    "unknown-kind": (_mutate(kind="b2x"), [("kind", "Input should be 'toc'")]),
    "unknown-zone": (_mutate(lines__0__zone="lava"), [("lines.0.zone", "Input should be 'ambient'")]),
    "unknown-source": (_mutate(source="fax"), [("source", "Input should be 'app'")]),
    "unknown-field": (_mutate(colour="red"), [("colour", "Extra inputs are not permitted")]),
    "unknown-nested-field": (_mutate(consignee__floor=3), [("consignee.floor", "Extra inputs are not permitted")]),
    "missing-required": (_mutate(member_id=DROP), [("member_id", "Field required")]),
    "missing-nested": (_mutate(consignee__phone=DROP), [("consignee.phone", "Field required")]),
    "too-many-lines": (_mutate(lines=[LINE] * (MAX_LINES + 1)), [("lines", f"more than {MAX_LINES} lines")]),
    "empty-lines": (_mutate(lines=[]), [("lines", "at least 1 item")]),
    "discount-above-goods": (_mutate(amounts={"discount": 3000, "coupon": 1000}),
                             [("amounts", "exceed the goods total")]),
    "external-id-with-hash": (_mutate(external_id="A-1#2"), [("external_id", "should match pattern")]),
    "several-at-once": (_mutate(kind="b2x", lines__0__qty="2", colour="red"),
                        [("kind", "Input should be"), ("lines.0.qty", "valid integer"),
                         ("colour", "Extra inputs")]),
}


@pytest.mark.parametrize("case", list(INVALID), ids=list(INVALID))
def test_every_class_of_invalid_order_is_422_naming_each_field_and_reason(port, case):
    body, expected = INVALID[case]
    raw = body if isinstance(body, bytes) else json.dumps(body()).encode()
    answer = call(port, "POST", "/orders", raw=raw)
    assert answer.status == 422, answer
    errors = shaped(openapi.ValidationProblem, answer)["errors"]
    for path, reason in expected:
        assert any(e["path"] == path and reason in e["reason"] for e in errors), (path, reason, errors)
    assert len(errors) == len(expected), errors


PAYMENT = {"order_no": "100000000000000001", "payment_id": "P-1", "amount": 100}
INVALID_PAYMENTS = {
    "float-amount": ({**PAYMENT, "amount": 1.5}, "amount"),
    "string-amount": ({**PAYMENT, "amount": "100"}, "amount"),
    "negative-amount": ({**PAYMENT, "amount": -1}, "amount"),
    "short-order-no": ({**PAYMENT, "order_no": "123"}, "order_no"),
    "payment-id-with-hash": ({**PAYMENT, "payment_id": "P#1"}, "payment_id"),
    "missing-payment-id": ({k: v for k, v in PAYMENT.items() if k != "payment_id"}, "payment_id"),
    "unknown-field": ({**PAYMENT, "currency": "CNY"}, "currency"),
}


@pytest.mark.parametrize("case", list(INVALID_PAYMENTS), ids=list(INVALID_PAYMENTS))
def test_invalid_payments_are_422_naming_the_field(port, case):
    body, path = INVALID_PAYMENTS[case]
    answer = call(port, "POST", "/payments", body)
    assert answer.status == 422, answer
    assert [e["path"] for e in shaped(openapi.ValidationProblem, answer)["errors"]] == [path]


def test_invalid_orders_create_nothing(port):
    for case in ("string-qty", "too-many-lines", "discount-above-goods"):
        assert call(port, "POST", "/orders", INVALID[case][0]()).status == 422
    assert call(port, "GET", "/orders?member=M-INVALID").body["items"] == []


def test_a_body_over_max_body_bytes_is_413(port):
    big = order_request(remark="x" * 400)
    big["padding"] = "y" * (MAX_BODY + 1)
    answer = call(port, "POST", "/orders", big)
    assert answer.status == 413, answer
    assert str(MAX_BODY) in shaped(openapi.Problem, answer)["error"]
    assert call(port, "POST", "/payments", raw=b" " * (MAX_BODY + 1)).status == 413
    assert call(port, "GET", "/healthz").status == 200


# -- listing --------------------------------------------------------------------------------

def test_25_orders_page_10_10_5_with_next_cursor_null_at_the_end(port):
    member = f"M-PAGE-{time.monotonic_ns()}"
    created = sorted(call(port, "POST", "/orders", tob_request(member)).body["order_no"] for _ in range(25))
    pages, cursor = [], ""
    while True:
        page = shaped(openapi.OrderPage, call(port, "GET", f"/orders?member={member}&limit=10&cursor={cursor}"))
        pages.append(page)
        if page["next_cursor"] is None:
            break
        cursor = page["next_cursor"]
        assert cursor == page["items"][-1]["order_no"]
    assert [len(p["items"]) for p in pages] == [10, 10, 5]
    assert [i["order_no"] for p in pages for i in p["items"]] == created  # each once, in number order
    assert all(i["member_id"] == member for p in pages for i in p["items"])


def test_list_filters_by_member_status_tab_and_state(port):
    member = f"M-FILTER-{time.monotonic_ns()}"
    unpaid = [call(port, "POST", "/orders", order_request(member)).body["order_no"] for _ in range(3)]
    plain = [call(port, "POST", "/orders", tob_request(member)).body["order_no"] for _ in range(2)]

    def listed(query: str) -> list[str]:
        answer = call(port, "GET", f"/orders?member={member}&{query}")
        assert answer.status == 200, answer
        return [i["order_no"] for i in shaped(openapi.OrderPage, answer)["items"]]

    assert listed("") == sorted(unpaid + plain)
    assert listed("status=WAIT_PAY") == sorted(unpaid)
    assert listed("tab=to_pay") == sorted(unpaid)
    assert listed("state=wait_pay") == sorted(unpaid)
    assert listed("tab=to_pay&status=IN_FULFILMENT") == []  # a status that never shows in that tab
    assert listed("tab=to_receive") == []
    # The ToB orders need no payment: they show under "to ship" whatever their stage.
    assert set(listed("tab=to_ship")) == set(plain)
    assert set(listed("status=" + ",".join(states.statuses_for_tab("to_ship")) + "&tab=to_ship")) == set(plain)
    items = call(port, "GET", f"/orders?member={member}&tab=to_pay").body["items"]
    assert {(i["tab"], i["status"], i["state"]) for i in items} == {("to_pay", "WAIT_PAY", "wait_pay")}


def oms(port: int, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oms_pipeline.cli", "--url", f"http://127.0.0.1:{port}", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)


def test_oms_orders_list_filters_by_member_status_and_tab(port):
    member = f"M-CLI-{time.monotonic_ns()}"
    unpaid = call(port, "POST", "/orders", order_request(member)).body["order_no"]
    plain = call(port, "POST", "/orders", tob_request(member)).body["order_no"]

    def listed(*args: str) -> list[str]:
        done = oms(port, "orders", "list", "--member", member, *args)
        assert done.returncode == 0, done
        return [line.split()[0] for line in done.stdout.splitlines() if line != "(none)"]

    assert listed() == sorted([unpaid, plain])  # another filter given: no default state
    assert listed("--tab", "to_pay") == [unpaid]
    assert listed("--status", "WAIT_PAY,PAID") == [unpaid]
    assert listed("--tab", "to_ship") == [plain]
    assert listed("--state", "wait_pay") == [unpaid]
    assert listed("--tab", "to_receive") == []
    bad = oms(port, "orders", "list", "--tab", "nope")
    assert bad.returncode == 1 and "tab: unknown tab 'nope'" in bad.stderr, bad


def test_with_no_filter_every_order_is_listed_not_only_queued_ones(port):
    no = call(port, "POST", "/orders", order_request()).body["order_no"]  # waits for payment: not queued
    seen, cursor = set(), ""
    while cursor is not None:
        page = call(port, "GET", f"/orders?limit=500&cursor={cursor}").body
        seen.update(i["order_no"] for i in page["items"])
        cursor = page["next_cursor"]
    assert no in seen
    assert call(port, "GET", "/orders?state=queued&member=nobody").body == {"items": [], "next_cursor": None}


@pytest.mark.parametrize("query, path", [
    ("tab=to_nowhere", "tab"), ("status=PAYING", "status"), ("status=PAID,nope", "status"),
    ("state=sleeping", "state"), ("limit=0", "limit"), ("limit=501", "limit"), ("limit=ten", "limit"),
    ("colour=red", "colour"), ("tab=to_pay&status=SHIPPED&limit=0", "limit"),
])
def test_unknown_list_filters_are_422_naming_the_parameter(port, query, path):
    answer = call(port, "GET", f"/orders?{query}")
    assert answer.status == 422, answer
    assert [e["path"] for e in shaped(openapi.ValidationProblem, answer)["errors"]] == [path]


# -- payments -------------------------------------------------------------------------------

def test_payment_moves_the_order_on_and_a_repeat_is_a_no_op(port):
    created = call(port, "POST", "/orders", order_request()).body
    no, amount = created["order_no"], created["payable"]
    paid = call(port, "POST", "/payments", {"order_no": no, "payment_id": f"pay-{no}", "amount": amount})
    assert paid.status == 200, paid
    assert shaped(openapi.PaymentResult, paid) == {"order_no": no, "duplicate": False, "status": "PAID"}
    view = wait_for(lambda: (v := call(port, "GET", f"/orders/{no}").body)["state"] != "wait_pay" and v,
                    what="order leaves wait_pay")
    shaped(openapi.OrderView, call(port, "GET", f"/orders/{no}"))
    moves = [(e["from_status"], e["to_status"]) for e in view["events"]]
    assert moves[:3] == [("CREATED", "WAIT_PAY"), ("WAIT_PAY", "PAID"), ("PAID", "IN_FULFILMENT")]
    assert view["order"]["amounts"]["paid"] == amount and view["order"]["results"]["payment_id"] == f"pay-{no}"
    again = call(port, "POST", "/payments", {"order_no": no, "payment_id": f"pay-{no}", "amount": amount})
    assert again.status == 200 and again.body["duplicate"] is True, again
    other = call(port, "POST", "/payments", {"order_no": no, "payment_id": f"other-{no}", "amount": amount})
    assert other.status == 409, other  # a second, different payment: not waiting any more
    events = call(port, "GET", f"/orders/{no}").body["events"]
    assert sum(e["to_status"] == "PAID" for e in events) == 1


def test_a_payment_of_a_different_amount_is_recorded_and_goes_to_manual_review(port):
    created = call(port, "POST", "/orders", order_request()).body
    no, payable = created["order_no"], created["payable"]
    answer = call(port, "POST", "/payments", {"order_no": no, "payment_id": "P-WRONG", "amount": payable + 1})
    assert answer.status == 200, answer
    assert shaped(openapi.PaymentResult, answer)["reason"] == f"paid {payable + 1}, payable {payable}"
    view = call(port, "GET", f"/orders/{no}").body
    assert (view["state"], view["status"], view["order"]["amounts"]["paid"]) == ("manual", "MANUAL_REVIEW",
                                                                                 payable + 1)
    assert no in [i["order_no"] for i in call(port, "GET", "/exceptions").body["items"]]


def test_can_pay_answers_with_the_deadline(port):
    created = call(port, "POST", "/orders", order_request()).body
    answer = call(port, "GET", f"/orders/{created['order_no']}/can-pay")
    assert answer.status == 200, answer
    assert shaped(openapi.CanPay, answer) == {"order_no": created["order_no"], "can_pay": True,
                                              "reason": "waiting for payment", "pay_deadline": created["pay_deadline"]}


def test_a_payment_for_an_unknown_order_is_404(port):
    answer = call(port, "POST", "/payments", {"order_no": "999999999999999999", "payment_id": "P-X", "amount": 1})
    assert answer.status == 404, answer
    shaped(openapi.Problem, answer)
    assert call(port, "GET", "/orders/999999999999999999").status == 404


def test_concurrent_copies_of_one_payment_book_it_once(port):
    created = call(port, "POST", "/orders", order_request()).body
    no, amount = created["order_no"], created["payable"]
    body = {"order_no": no, "payment_id": f"pay-{no}", "amount": amount}
    start = threading.Barrier(20)

    def pay(_: int) -> Answer:
        start.wait()
        return call(port, "POST", "/payments", body)

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(pay, range(20)))
    assert all(a.status == 200 for a in answers), answers
    assert sorted(a.body["duplicate"] for a in answers) == [False] + [True] * 19
    events = call(port, "GET", f"/orders/{no}").body["events"]
    assert sum(e["to_status"] == "PAID" for e in events) == 1, events


# -- request id, loopback, openapi ----------------------------------------------------------

def test_x_request_id_is_echoed_on_every_kind_of_answer_or_made_up(port):
    for method, path, body in (("POST", "/orders", order_request()), ("POST", "/orders", {"kind": "x"}),
                               ("GET", "/orders/123", None), ("GET", "/nowhere", None), ("GET", "/healthz", None)):
        rid = f"rid-{next(_ids)}"
        answer = call(port, method, path, body, headers={"X-Request-Id": rid})
        assert answer.headers["X-Request-Id"] == rid, (method, path, answer)
    made_up = call(port, "GET", "/stats").headers["X-Request-Id"]
    assert made_up and made_up != call(port, "GET", "/stats").headers["X-Request-Id"]


def test_bound_to_loopback_no_token_is_needed(port):
    assert call(port, "GET", "/stats").status == 200
    shaped(openapi.Stats, call(port, "GET", "/stats"))
    shaped(openapi.ExceptionPage, call(port, "GET", "/exceptions"))
    shaped(openapi.Health, call(port, "GET", "/healthz"))
    shaped(openapi.Health, call(port, "GET", "/readyz"))
    assert "tob" in call(port, "GET", "/routes?kind=tob").raw.decode()


def test_the_served_openapi_document_equals_docs_openapi_json(port):
    answer = call(port, "GET", "/openapi.json")
    assert answer.status == 200
    on_file = json.loads((ROOT / "docs" / "openapi.json").read_text())
    assert answer.body == on_file, "regenerate: .venv/bin/python -m oms_pipeline.openapi > docs/openapi.json"


def test_the_openapi_document_is_valid_and_covers_every_route():
    from openapi_spec_validator import validate
    doc = openapi.document()
    validate(doc)
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == {(method, path) for method, path, _ in api.ROUTES}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            assert ("401" in codes) == (path not in api.OPEN_PATHS), (method, path)
            if "requestBody" in op:
                assert {"413", "422"} <= codes, (method, path)
            assert all("X-Request-Id" in r["headers"] for r in op["responses"].values())


def test_statuses_for_tab_agrees_with_tab():
    """Every order `tab` puts in a tab has one of that tab's statuses, and each listed status occurs."""
    def order(status: str, paid: int, reviewed: bool, kind: str, method: str) -> Order:
        return Order(order_no="1" * 18, source="app", external_id="e", kind=kind, member_id="M", status=status,
                     payment_method=method, consignee=Address(name="n", phone="13800000000", province="p", city="c"),
                     lines=[Line(line_no=1, sku="S", qty=1, unit_price=100)], amounts=Amounts(payable=100, paid=paid),
                     results={"reviewed": True} if reviewed else {})
    seen: set[tuple[str, str]] = set()
    for status in states.STATES:
        for paid, reviewed, (kind, method) in itertools.product((0, 100), (False, True),
                                                                (("toc", "online"), ("toc", "cod"), ("tob", "none"))):
            tab = states.tab(order(status, paid, reviewed, kind, method))
            assert status in states.statuses_for_tab(tab), (status, tab)
            seen.add((status, tab))
    assert seen == {(s, t) for t in states.TABS for s in states.statuses_for_tab(t)}
    with pytest.raises(KeyError):
        states.statuses_for_tab("nope")


# -- a daemon bound beyond loopback ---------------------------------------------------------

@pytest.fixture(scope="module")
def exposed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exposed")
    cfg, port = write_config(tmp)
    with_config(cfg, port, f'host = "0.0.0.0"\ntoken = "{TOKEN}"\n')
    d = Daemon(cfg, port).start()
    yield d
    d.stop()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}], ids=["none", "wrong", "no-scheme", "basic"])
def test_beyond_loopback_requests_without_the_right_token_are_401(exposed, headers):
    for method, path, body in (("GET", "/stats", None), ("POST", "/orders", order_request()),
                               ("GET", "/orders", None), ("GET", "/openapi.json", None)):
        answer = call(exposed.port, method, path, body, headers={**headers, "X-Request-Id": "rid-401"})
        assert answer.status == 401, (path, answer)
        shaped(openapi.Problem, answer)
        assert answer.headers["X-Request-Id"] == "rid-401"


def test_beyond_loopback_the_token_lets_requests_through_and_probes_need_none(exposed):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    created = call(exposed.port, "POST", "/orders", order_request(), headers=auth)
    assert created.status == 201, created
    assert call(exposed.port, "GET", f"/orders/{created.body['order_no']}", headers=auth).status == 200
    assert call(exposed.port, "GET", "/stats", headers=auth).status == 200
    assert call(exposed.port, "GET", "/healthz").status == 200
    assert call(exposed.port, "GET", "/readyz").status == 200
    # The CLI passes the token too.
    done = subprocess.run([sys.executable, "-m", "oms_pipeline.cli", "--url", f"http://127.0.0.1:{exposed.port}",
                           "--token", TOKEN, "orders", "list", "--state", "wait_pay"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 0 and created.body["order_no"] in done.stdout, done


def test_beyond_loopback_without_a_token_the_daemon_refuses_to_start_exit_2(tmp_path):
    cfg, port = write_config(tmp_path)
    with_config(cfg, port, 'host = "0.0.0.0"\n')
    done = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert done.returncode == 2, done
    assert "http.token" in done.stderr and str(cfg) in done.stderr, done.stderr
    check = subprocess.run([sys.executable, "-m", "oms_pipeline.cli", "check-config", str(cfg)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert check.returncode == 2 and "http.token" in check.stderr, check



@pytest.mark.anyio
async def test_copies_of_one_payment_in_the_same_loop_turn_book_it_once(tmp_path):
    """The race above, made certain: copies handled in the same turn of the event loop all read
    the order before the first one's checkpoint commits. Without the per-order serialisation in
    Api.pay each of them booked the payment (10 PAID events, 10 answers "duplicate": false)."""
    import asyncio

    import anyio

    from oms_pipeline import app as app_module
    from oms_pipeline import config, schemas

    settings = config.from_mapping({"store": {"url": f"sqlite:///{tmp_path / 'oms.sqlite3'}"}, "metrics": {"port": 0},
                                    "routing": {"file": str(ROOT / "config" / "routes.toml")}})
    app = await app_module.build(settings)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(app.pipeline.run)
            request = schemas.OrderIn.model_validate(order_request()).model_dump(mode="json", exclude_none=True)
            created = (await app.intake.create([request]))[0]
            pay = schemas.PaymentIn(order_no=created.order_no, payment_id="P-ONCE", amount=created.payable)
            server = api.Api(app)
            answers = [json.loads(r.body) for r in await asyncio.gather(*[server.pay(pay) for _ in range(10)])]
            assert sorted(a["duplicate"] for a in answers) == [False] + [True] * 9, answers
            events = await app.pipeline.store.events(created.order_no)
            assert [e.to_status for e in events].count("PAID") == 1, events
            assert len(app.payments.busy) == 0  # nothing left behind
            tg.cancel_scope.cancel()
    finally:
        await app.aclose()
