"""What each broker intake queue does with its messages: the same calls as the HTTP API.

* `orders`: the body of `POST /orders`. Decoded, checked by `Intake.request`
  (the API's schema and line limit), then created by `Intake.create`, a whole
  batch of messages in one call. Undecodable or invalid bodies and refused
  orders (out of stock) are dead-lettered with the reason; a known
  (source, external id) is a duplicate, acked with nothing new.
* `payments`: the body of `POST /payments`, to `App.payments.notify`.
* `reverse`: a reverse request (the body of `POST /orders/{no}/cancel` and
  the like) with the order's number in `order_no`, to `App.reverse.request`.
* `reports`: a WMS/TMS status report, to `App.reverse.report`.

A queue is consumed when the app has the module that handles it
(`App.payments`, `App.reverse`: every daemon has both); otherwise it is
declared but not consumed, so what upstream publishes waits in it. Their answers are HTTP-like (status,
body): 2xx is done (a duplicate when the body says so), 5xx and a 409 that
says "try again" are retried, any other 4xx is dead-lettered with its error.
"""
from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

import orjson

from . import schemas
from .intake import Intake
from .order_no import CHILD_PATTERN, SHAPE
from .pipeline import ShuttingDown
from .ports.intake import ACCEPTED, DUPLICATE, INVALID, RETRY, Handler, NotNow, Verdict


def handlers(app: Any) -> dict[str, Handler]:
    """The registration point: a handler per intake queue the app can serve."""
    out = {"orders": orders_handler(app.intake)}
    payments = getattr(app, "payments", None)
    if payments is not None:
        out["payments"] = one_by_one(lambda data: payments.notify(schemas.validate(schemas.PaymentIn, data)))
    reverse = getattr(app, "reverse", None)
    if reverse is not None:
        out["reverse"] = one_by_one(lambda data: _reverse_request(reverse, data))
        out["reports"] = one_by_one(lambda data: reverse.report(schemas.validate(schemas.ReportIn, data)))
    return out


decode = schemas.decode_json


def orders_handler(intake: Intake) -> Handler:
    async def handle(bodies: list[bytes]) -> list[Verdict]:
        verdicts: list[Verdict | None] = [None] * len(bodies)
        valid: list[int] = []
        requests: list[dict[str, Any]] = []
        for i, body in enumerate(bodies):
            try:
                requests.append(intake.request_body(body))
                valid.append(i)
            except schemas.Invalid as exc:
                verdicts[i] = Verdict(INVALID, f"invalid order: {exc}")
        if requests:
            try:
                created = await intake.create(requests)  # anything else it raises is a retry
            except ShuttingDown:
                raise NotNow() from None
            for i, c in zip(valid, created):
                verdicts[i] = Verdict(INVALID, c.refused) if c.refused else \
                    Verdict(ACCEPTED if c.created else DUPLICATE)
        return verdicts  # type: ignore[return-value]
    return handle


def one_by_one(call: Callable[[Any], Awaitable[Any]]) -> Handler:
    """A handler for requests answered one at a time with (status, body): see the module docstring.
    A request that raises is retried on its own; the batch's others keep their verdicts."""
    async def handle(bodies: list[bytes]) -> list[Verdict]:
        verdicts = []
        for body in bodies:
            try:
                verdicts.append(verdict(await call(decode(body))))
            except schemas.Invalid as exc:
                verdicts.append(Verdict(INVALID, f"invalid request: {exc}"))
            except ShuttingDown:
                raise NotNow() from None
            except Exception as exc:  # noqa: BLE001 - retried with backoff, then dead-lettered with this
                verdicts.append(Verdict(RETRY, f"{type(exc).__name__}: {exc}"[:500]))
        return verdicts
    return handle


def verdict(answer: Any) -> Verdict:
    """An HTTP-like answer (`.status`, `.body` as a dict or JSON bytes) as an intake verdict."""
    body = answer.body if isinstance(answer.body, dict) else orjson.loads(answer.body or b"{}")
    error = str(body.get("error", ""))
    if 200 <= answer.status < 300:
        return Verdict(DUPLICATE if body.get("duplicate") else ACCEPTED)
    if answer.status >= 500 or (answer.status == 409 and "try again" in error):
        return Verdict(RETRY, f"{answer.status} {error}")
    return Verdict(INVALID, f"{answer.status} {error} {body.get('errors') or ''}".strip())


async def _reverse_request(reverse: Any, data: Any) -> Any:
    """The body of a reverse request plus the order's number (in the API it is in the path)."""
    if not isinstance(data, dict):
        raise schemas.Invalid([{"path": "$", "reason": "expected an object"}])
    data = dict(data)
    order_no = data.pop("order_no", None)
    if not isinstance(order_no, str) or not re.fullmatch(CHILD_PATTERN, order_no):
        raise schemas.Invalid([{"path": "order_no", "reason": f"an order number is required ({SHAPE})"}])
    return await reverse.request(order_no, schemas.validate(schemas.ReverseIn, data))
