"""The OpenAPI 3.1 document of the daemon's HTTP API, served at `GET /openapi.json`.

Request bodies come from the pydantic models the API validates with
(`schemas.py`), the stored order document from its msgspec struct
(`order.py`), and every answer's JSON shape from the models below; the paths
are exactly the routes `api.ROUTES` serves (`document()` refuses to build
otherwise). A copy lives in the repository:

    .venv/bin/python -m oms_pipeline.openapi > docs/openapi.json

and a test checks that the served document equals that file.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from . import api, schemas, states
from .order import KINDS, Order
from .order_no import PATTERN

REF = "#/components/schemas/{model}"
Status = Literal[states.STATES]  # type: ignore[valid-type]
State = Literal[api.RUNTIME_STATES]  # type: ignore[valid-type]
Tab = Literal[states.TABS]  # type: ignore[valid-type]
OrderDoc = dict[str, Any]  # documented as the msgspec Order struct (see _components)


# -- answers (each model is exactly one answer's JSON; tests validate real answers with them) -----

class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Problem(_Answer):
    """Any refusal other than invalid input: what is wrong, in one line."""

    error: str


class FieldError(_Answer):
    path: str = Field(description='dotted field path ("lines.0.qty"), a query parameter, or "$" for the whole body')
    reason: str


class ValidationProblem(_Answer):
    """Invalid input: every field that is wrong, each with its reason."""

    error: Literal["invalid request"]
    errors: list[FieldError] = Field(min_length=1)


class Created(_Answer):
    """A new order."""

    order_no: str = Field(pattern=f"^{PATTERN}$")
    created: Literal[True]
    status: Status
    payable: int = Field(description="cents to pay (goods - discount - coupon - points + freight)")
    pay_deadline: float | None = Field(description="epoch seconds; the cashier's deadline for orders that wait "
                                                   "for payment, null for the others")


class HistoryEntry(_Answer):
    order_no: str
    stage: str
    outcome: str
    reason: str
    at: float


class StatusEvent(_Answer):
    order_no: str
    from_status: str
    to_status: Status
    at: float


class OrderView(_Answer):
    """An order: its runtime state and stage, its business status and its document. `GET
    /orders/{no}` adds the stage history and the status events; a repeated create does not."""

    order_no: str
    created: Literal[False]
    state: State
    stage: str = Field(description="the stage it waits for or runs, or the end it reached (@done, ...)")
    status: Status
    attempts: int
    wake_at: float | None
    order: OrderDoc
    pay_deadline: float | None
    payable: int
    history: list[HistoryEntry] | None = None
    events: list[StatusEvent] | None = None


class OrderItem(_Answer):
    order_no: str
    status: Status
    state: State
    stage: str
    member_id: str
    tab: Tab = Field(description="the customer's tab (to pay, to ship, to receive, to review, after-sales, closed)")
    updated_at: float


class OrderPage(_Answer):
    items: list[OrderItem]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last page")


class PaymentResult(_Answer):
    order_no: str
    duplicate: bool = Field(description="true: this payment_id was booked before; nothing changed")
    status: Status
    refunded: bool | None = Field(None, description="present (true) when the order could not take the payment "
                                                    "(cancelled before it arrived, or paid already by another): "
                                                    "it is recorded and refunded in full")
    refund_id: str | None = Field(None, description="the finance refund, when refunded (null for an amount of 0)")
    reason: str | None = Field(None, description="present when the payment went to manual review: "
                                                 "\"paid X, payable Y\"")


class CanPay(_Answer):
    """Whether the cashier may take a payment for the order now."""

    order_no: str
    can_pay: bool
    reason: str = Field(description="why (not): waiting for payment, the pay deadline has passed, cancelled, ...")
    pay_deadline: float | None = Field(description="epoch seconds; no payment is taken after it (server clock)")


class ExceptionItem(_Answer):
    order_no: str
    stage: str = Field(description="the stage a replay runs again")
    status: Status
    reason: str
    at: float


class ExceptionPage(_Answer):
    items: list[ExceptionItem]


class Replayed(_Answer):
    order_no: str
    replayed: Literal[True]


class StageStats(_Answer):
    queue: int
    bound: int
    pool: int
    busy: int
    processed: dict[str, int] = Field(description="orders finished by this stage, by outcome")


class Stats(_Answer):
    orders: dict[str, int] = Field(description="orders per runtime state")
    finished: dict[str, int] = Field(description="orders this instance brought to an end, by end")
    in_flight: int
    timers_pending: int
    intake: int
    stages: dict[str, StageStats]


class Health(_Answer):
    status: Literal["ok", "ready"]


class NotReady(_Answer):
    """Starting, draining, or a dependency (store, rabbitmq, redis) cannot be reached."""

    error: str
    unreachable: list[str] = []


class ReverseView(_Answer):
    """A reverse order (cancel, return, rejection, exchange, reissue, pull-back) and where it is."""

    reverse_no: str
    order_no: str
    request_id: str
    kind: Literal[schemas.REVERSE_KINDS]  # type: ignore[valid-type]
    state: Literal["requested", "intercepting", "awaiting_merchant", "arbitration", "waiting_goods", "done",
                   "refused"] = Field(
        description="requested: being worked (or waiting to be retried); intercepting: the warehouse was asked "
                    "to stop the dispatched order and its answer is awaited; awaiting_merchant / arbitration: a "
                    "person decides (POST /reverse/{rno}/decision); waiting_goods: the goods are on their way "
                    "back (POST /reports return_received); done or refused: settled")
    source: str
    reason: str
    lines: dict[str, int] = Field(description="line number -> units; empty: the whole order")
    result: str
    refund: int = Field(description="cents given back through the payment channel so far")
    new_order_no: str | None = Field(description="the new order an exchange, reissue or pull-back made")
    notes: list[str]
    created_at: float
    updated_at: float
    duplicate: bool | None = Field(None, description="on a request: true when this request id was sent before")


class ReversePage(_Answer):
    items: list[ReverseView]


class ReportResult(_Answer):
    order_no: str
    status: Status
    duplicate: bool = Field(description="true: the order had this status already; nothing changed")
    noted: bool | None = Field(None, description="true: the order is in the reverse flow; the report changes "
                                                 "nothing")


ANSWERS: tuple[type[BaseModel], ...] = (Problem, ValidationProblem, Created, OrderView, OrderPage, PaymentResult,
                                         CanPay, ExceptionPage, Replayed, Stats, Health, NotReady, ReverseView,
                                         ReversePage, ReportResult)

# -- paths ---------------------------------------------------------------------------------

DESCRIPTION = """\
The order management daemon's HTTP API. Every answer is JSON (except `GET /routes`,
plain text) and carries `X-Request-Id`: the request's own (its first 64 characters) or
one made up; every log line of the request carries it too.

**Authentication**: none while the daemon listens on a loopback address (the
default, 127.0.0.1). Bound beyond loopback it needs `http.token` (it refuses to
start without one), and every request except `/healthz` and `/readyz` must carry
`Authorization: Bearer <token>`; a missing or wrong token is `401`.

**Invalid input** is `422` with every problem as `{path, reason}`; it never
changes an order. A body larger than `http.max_body_bytes` is `413`.
"""

CREATE = """\
Create an order, or get the existing one: intake is idempotent on
`(source, external_id)`, so a repeated request answers `200` with the first
order and never makes a second one.

Beyond the schema: at most `intake.max_lines` lines (default 200);
`amounts.discount + coupon + points` may not exceed the goods total (freight is
not discounted); only a `bundle` line has `components`; `delivery_promise:
scheduled` needs a `delivery_date` on a line; `external_id` may not contain `#`
(reserved for split children). Orders that wait for payment (ToC paid online)
answer with the `pay_deadline` to hand to the cashier.

Stock is reserved for every physical line shipped from a warehouse before the
order is stored, all or nothing: when a line cannot be reserved the answer is
`409` "out of stock: SKU@WH" and no order is created.
"""

LIST = """\
Orders matching every filter given, in order-number order; no filter lists
every order. Page with `cursor` = the last order number of the previous page
(`next_cursor`), which is null on the last page.
"""

PAY = """\
The payment centre's notification; `non_cash` is the part of `amount` paid by
balance, cards or coupons (a mixed payment), the rest is cash. A `payment_id`
already booked is a no-op (`duplicate: true`), whatever the order's state since.

A payment for an order that was cancelled, or whose pay deadline has passed by
the server's clock (a payment exactly at the deadline is taken), is recorded on
the order and refunded in full (`refunded: true`); the order stays cancelled.
A second, different payment for an order paid already is recorded and refunded
in full too (`refunded: true`); the order goes on as it was. A payment whose
amount differs from the payable is recorded and the order goes to the
exception centre (`status: MANUAL_REVIEW`, `reason`).
"""

CAN_PAY = """\
The cashier's question before it takes money: `can_pay` is false once the pay
deadline has passed (by the server's clock, even before the timeout has
cancelled the order), and for cancelled, paid and not prepaid orders.
"""

CANCEL = """\
Cancel an order, whole or some lines (`lines`), for one of the sources (buyer,
seller, WMS, TMS, risk, customer service, timeout, stock-out, arbitration). The
`request_id` makes it idempotent: a repeated request is the same reverse order.

The order's forward progress is paused at its next stage boundary. Not yet
dispatched: cancelled at once (a partial cancel makes the order smaller and it
goes on), money and stock given back. Dispatched: the warehouse is asked to
intercept (`202`, state `intercepting`, settled by its report `intercepted` or
`intercept_failed`); too late (or already shipped) the cancel becomes a return
and waits for the goods (state `waiting_goods`). A buyer's or seller's cancel is
refused (`state: refused`) once an order matching `reverse.no_cancel_after`
(e.g. O2O pickup) has passed the configured stage; an unpaid order is cancelled
whole only.
"""

RETURNS = """\
After-sales requests for an order whose goods have left the warehouse: `return`
(with `pickup` by the carrier), `reject` (refused at the door), `exchange` (a
return plus a new order without payment), `reissue` (a new shipment, no
payment), `pullback` (`mode`: a new order, one waiting for stock, or a cancel).
Returns wait for the goods (`waiting_goods`, then `POST /reports`
return_received), or for the merchant first when `reverse.return_approval` is
`merchant`. A return refunds the allocated amounts of its lines (the promotion
stays with the lines kept; freight by `reverse.refund_freight_on_return`).
"""

REVERSE_ANSWERS = {"200": ("ReverseView", "settled: done or refused (see `result`)"),
                   "202": ("ReverseView", "under way: waiting for goods, a person, or a retry"),
                   "404": ("Problem", "no such order"),
                   "409": ("Problem", "this request_id was used for another kind of request"),
                   "413": ("Problem", "body larger than http.max_body_bytes"),
                   "422": ("ValidationProblem", "invalid request: every field with its reason")}

PATHS: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/orders"): {
        "summary": "Create an order (idempotent on source + external_id)", "description": CREATE,
        "body": "OrderIn",
        "answers": {"201": ("Created", "the order was created"),
                    "200": ("OrderView", "an order with this (source, external_id) exists: that order"),
                    "413": ("Problem", "body larger than http.max_body_bytes"),
                    "409": ("Problem", "out of stock: SKU@WH (no order was created)"),
                    "422": ("ValidationProblem", "invalid request: every field with its reason"),
                    "503": ("Problem", "shutting down, or the inventory cannot be asked: try again later")}},
    ("GET", "/orders"): {
        "summary": "List orders by member, status, customer tab and runtime state", "description": LIST,
        "query": ["member", "status", "tab", "state", "limit", "cursor"],
        "answers": {"200": ("OrderPage", "one page of orders"),
                    "422": ("ValidationProblem", "an unknown parameter, status, tab or state, or a bad limit")}},
    ("GET", "/orders/{no}"): {
        "summary": "One order: state, stage, status, document, stage history and status events",
        "answers": {"200": ("OrderView", "the order with `history` and `events`"),
                    "404": ("Problem", "no such order")}},
    ("GET", "/orders/{no}/can-pay"): {
        "summary": "May the cashier take a payment for this order now", "description": CAN_PAY,
        "answers": {"200": ("CanPay", "yes or no, why, and the pay deadline"),
                    "404": ("Problem", "no such order")}},
    ("POST", "/orders/{no}/cancel"): {
        "summary": "Cancel an order, whole or some lines", "description": CANCEL, "body": "ReverseIn",
        "answers": REVERSE_ANSWERS},
    ("POST", "/orders/{no}/returns"): {
        "summary": "Return, rejection, exchange, reissue or pull-back", "description": RETURNS,
        "body": "ReverseIn", "answers": REVERSE_ANSWERS},
    ("GET", "/orders/{no}/reverse"): {
        "summary": "An order's reverse orders, oldest first",
        "answers": {"200": ("ReversePage", "the reverse orders"), "404": ("Problem", "no such order")}},
    ("GET", "/reverse/{rno}"): {
        "summary": "One reverse order",
        "answers": {"200": ("ReverseView", "the reverse order"), "404": ("Problem", "no such reverse order")}},
    ("POST", "/reverse/{rno}/decision"): {
        "summary": "A merchant's decision on a return (refused: customer-service arbitration decides)",
        "body": "DecisionIn",
        "answers": {"200": ("ReverseView", "the reverse order after the decision"),
                    "404": ("Problem", "no such reverse order"),
                    "409": ("Problem", "the reverse order is not waiting for this decision"),
                    "413": ("Problem", "body larger than http.max_body_bytes"),
                    "422": ("ValidationProblem", "invalid request: every field with its reason")}},
    ("POST", "/reports"): {
        "summary": "A status report from WMS or TMS: outbound, delivered, rejected, return_received, "
                   "intercepted, intercept_failed",
        "body": "ReportIn",
        "answers": {"200": ("ReportResult", "applied (or a duplicate)"),
                    "404": ("Problem", "no such order"),
                    "409": ("Problem", "the report does not apply to the order's status"),
                    "413": ("Problem", "body larger than http.max_body_bytes"),
                    "422": ("ValidationProblem", "invalid request: every field with its reason")}},
    ("POST", "/payments"): {
        "summary": "Payment notification", "description": PAY, "body": "PaymentIn",
        "answers": {"200": ("PaymentResult", ("booked and the order released into fulfilment, a duplicate, "
                                              "refunded (order cancelled), or sent to manual review (amount)")),
                    "404": ("Problem", "no such order"),
                    "409": ("Problem", "the order is in the exception centre (a person decides), or it changed "
                                       "meanwhile (being worked on): try again"),
                    "413": ("Problem", "body larger than http.max_body_bytes"),
                    "422": ("ValidationProblem", "invalid request: every field with its reason"),
                    "503": ("Problem", "a late payment was recorded but its refund failed for now: notify again")}},
    ("GET", "/exceptions"): {
        "summary": "The exception centre: orders waiting for a person, with the reason",
        "query": ["limit", "cursor"],
        "answers": {"200": ("ExceptionPage", "one page of the exception centre"),
                    "422": ("ValidationProblem", "a bad limit")}},
    ("POST", "/exceptions/{no}/replay"): {
        "summary": "Run an exception-centre order's failed stage again",
        "answers": {"200": ("Replayed", "back in its stage's queue"),
                    "409": ("Problem", "the order is not in the exception centre")}},
    ("GET", "/stats"): {
        "summary": "Orders per state; per-stage queues, pools and outcomes",
        "answers": {"200": ("Stats", "the counters")}},
    ("GET", "/routes"): {
        "summary": "The routing table as text: every path through the stages",
        "query": ["kind"],
        "answers": {"200": ("text", "one line per path"),
                    "422": ("ValidationProblem", "an unknown order kind")}},
    ("GET", "/healthz"): {
        "summary": "Liveness", "open": True,
        "answers": {"200": ("Health", "the process serves requests")}},
    ("GET", "/readyz"): {
        "summary": "Readiness", "open": True,
        "answers": {"200": ("Health", "ready for traffic"),
                    "503": ("NotReady", "starting or draining, or a dependency is unreachable: which")}},
    ("GET", "/openapi.json"): {
        "summary": "This document",
        "answers": {"200": ("document", "the OpenAPI 3.1 document")}},
}

QUERY: dict[str, dict[str, Any]] = {
    "member": {"description": "only this member's orders", "schema": {"type": "string"}},
    "status": {"description": "only orders in these business statuses (comma-separated)",
               "schema": {"type": "string"}, "example": "WAIT_PAY,PAID"},
    "tab": {"description": "only orders the customer sees in this tab",
            "schema": {"type": "string", "enum": list(states.TABS)}},
    "state": {"description": "only orders in this runtime state",
              "schema": {"type": "string", "enum": list(api.RUNTIME_STATES)}},
    "limit": {"description": "page size", "schema": {"type": "integer", "minimum": 1, "maximum": api.MAX_PAGE,
                                                     "default": 100}},
    "cursor": {"description": "the last order number of the previous page (its `next_cursor`)",
               "schema": {"type": "string"}},
    "kind": {"description": "only this order kind's paths", "schema": {"type": "string", "enum": list(KINDS)}},
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(model=name)}


def _answer(name: str, description: str) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "headers": {"X-Request-Id": {"$ref": "#/components/headers/RequestId"}}}
    if name == "text":
        out["content"] = {"text/plain": {"schema": {"type": "string"}}}
    elif name == "document":
        out["content"] = {"application/json": {"schema": {"type": "object"}}}
    else:
        out["content"] = {"application/json": {"schema": _ref(name)}}
    return out


def _operation(method: str, path: str, spec: dict[str, Any], handler: str) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": handler, "summary": spec["summary"]}
    if "description" in spec:
        op["description"] = spec["description"]
    params: list[dict[str, Any]] = [{"$ref": "#/components/parameters/RequestId"}]
    if "{no}" in path:
        params.append({"name": "no", "in": "path", "required": True, "description": "the order number",
                       "schema": {"type": "string"}})
    if "{rno}" in path:
        params.append({"name": "rno", "in": "path", "required": True, "description": "the reverse order number",
                       "schema": {"type": "string"}})
    params += [{"name": name, "in": "query", "required": False, **QUERY[name]} for name in spec.get("query", ())]
    op["parameters"] = params
    if "body" in spec:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(spec["body"])}}}
    answers = dict(spec["answers"])
    if spec.get("open"):
        op["security"] = []
    else:
        answers["401"] = ("Problem", "bound beyond loopback: the bearer token is missing or wrong")
    op["responses"] = {code: _answer(*answers[code]) for code in sorted(answers)}
    return op


def _components() -> dict[str, Any]:
    models = [(model, "validation") for model in (schemas.OrderIn, schemas.PaymentIn, schemas.ReverseIn,
                                                  schemas.DecisionIn, schemas.ReportIn)]
    models += [(model, "serialization") for model in ANSWERS]
    _, top = models_json_schema(models, ref_template=REF)
    found = dict(top["$defs"])
    _, documents = msgspec.json.schema_components([Order], ref_template=REF.replace("{model}", "{name}"))
    clash = set(found) & set(documents)
    if clash:
        raise RuntimeError(f"schema names used twice: {sorted(clash)}")
    found.update(documents)
    found["Order"]["description"] = "The stored order document, as the pipeline keeps it (amounts in cents)."
    found["OrderView"]["properties"]["order"] = _ref("Order")
    return dict(sorted(found.items()))


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document; refuses to build unless it covers exactly the routes api.py serves."""
    served = {(method, path): name for method, path, name in api.ROUTES}
    if set(served) != set(PATHS):
        raise RuntimeError(f"openapi.PATHS and api.ROUTES differ: {sorted(set(served) ^ set(PATHS))}")
    paths: dict[str, dict[str, Any]] = {}
    for method, path, name in api.ROUTES:
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, PATHS[(method, path)], name)
    return {
        "openapi": "3.1.0",
        "info": {"title": "oms-pipeline", "version": _version(), "description": DESCRIPTION},
        "paths": paths,
        "components": {
            "schemas": _components(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "http.token; required when bound beyond loopback"}},
            "parameters": {"RequestId": {"name": "X-Request-Id", "in": "header", "required": False,
                                         "description": "echoed in the answer and logged with the request "
                                                        "(first 64 characters); made up when absent",
                                         "schema": {"type": "string"}}},
            "headers": {"RequestId": {"description": "the request's X-Request-Id, or one made up",
                                      "schema": {"type": "string"}}},
        },
        # No token on loopback, the bearer token beyond it.
        "security": [{}, {"bearer": []}],
    }


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("oms-pipeline")
    except PackageNotFoundError:
        return "0.0.0"


def main() -> int:
    sys.stdout.write(json.dumps(document(), indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
