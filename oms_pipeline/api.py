"""The daemon's HTTP API (aiohttp, in the daemon's own event loop).

Every answer is JSON and carries the request id (X-Request-Id, taken from the
request or made up). Bad input is a 4xx naming each field and reason; it
never changes an order and never takes the daemon down.
"""
from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from . import logs, reverse, schemas, states
from .order import KINDS, decode, document
from .pipeline import ShuttingDown
from .ports import store as st
from .stock import StockUnavailable

log = logging.getLogger("oms.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_PAGE = 500
RUNTIME_STATES = (st.QUEUED, st.PARKED, st.WAIT_PAY, st.DONE, st.CANCELLED, st.MANUAL, st.SPLIT, st.PAUSED)
LIST_PARAMS = ("member", "status", "tab", "state", "limit", "cursor")
# Every route: (method, path, Api method). The OpenAPI document (openapi.py) covers exactly these.
ROUTES = (
    ("POST", "/orders", "create_order"),
    ("GET", "/orders", "list_orders"),
    ("GET", "/orders/{no}", "get_order"),
    ("GET", "/orders/{no}/can-pay", "can_pay"),
    ("POST", "/orders/{no}/cancel", "cancel"),
    ("POST", "/orders/{no}/returns", "returns"),
    ("GET", "/orders/{no}/reverse", "reverse_of"),
    ("GET", "/reverse/{rno}", "reverse_one"),
    ("POST", "/reverse/{rno}/decision", "decision"),
    ("POST", "/reports", "report"),
    ("POST", "/payments", "payment"),
    ("GET", "/exceptions", "exceptions"),
    ("POST", "/exceptions/{no}/replay", "replay"),
    ("GET", "/stats", "stats"),
    ("GET", "/routes", "routes_text"),
    ("GET", "/healthz", "healthz"),
    ("GET", "/readyz", "readyz"),
    ("GET", "/openapi.json", "openapi"),
)
OPEN_PATHS = ("/healthz", "/readyz")  # no token needed: probes


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body, default=str), status=status, content_type="application/json")


def problem(status: int, reason: str, **extra: Any) -> web.Response:
    return json_response({"error": reason, **extra}, status)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id", "")[:64] or secrets.token_hex(8)
    token = logs.request_id.set(rid)
    started = time.perf_counter()
    try:
        response = await _guarded(request, handler)
        response.headers["X-Request-Id"] = rid
        log.debug("request", extra={"event": "http", "method": request.method, "path": request.path,
                                    "status": response.status,
                                    "ms": round((time.perf_counter() - started) * 1000, 2)})
    finally:
        logs.request_id.reset(token)
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:  # (the exception does not keep the limit: the request does)
        return problem(413, f"body larger than {request.client_max_size} bytes")
    except web.HTTPException as exc:
        return problem(exc.status, exc.reason)
    except (ShuttingDown, StockUnavailable, st.StoreUnavailable) as exc:
        return problem(503, str(exc))
    except Exception:  # noqa: BLE001 - logged with the request id; the daemon keeps serving
        log.exception("request failed", extra={"event": "http_error", "path": request.path})
        return problem(500, "internal error; see the log for this request id")


def auth(token: str) -> Callable:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return problem(401, "missing or wrong bearer token")
        return await handler(request)
    return check


async def body_json(request: web.Request) -> Any:
    return schemas.decode_json(await request.read())


BadInput = schemas.Invalid  # the broker intake rejects with the same errors (dead-letter reason)
validate = schemas.validate


class Api:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.pipeline = app.pipeline
        self.ready = False
        # A replay from the exception centre and a payment for the same order: one after the other.
        self._one_at_a_time = app.payments.busy.hold
        self._openapi: bytes | None = None

    def routes(self) -> list[web.RouteDef]:
        return [web.route(method, path, getattr(self, name)) for method, path, name in ROUTES]

    def web_app(self) -> web.Application:
        settings = self.app.settings.http
        middlewares = [request_context, bad_input]
        if not is_loopback(settings.host):
            if not settings.token:
                raise ValueError("http.token is required when http.host is not a loopback address")
            middlewares.append(auth(settings.token))
        web_app = web.Application(client_max_size=settings.max_body_bytes, middlewares=middlewares)
        web_app.add_routes(self.routes())
        return web_app

    async def create_order(self, request: web.Request) -> web.Response:
        # The same two calls as the broker's intake queue (oms_pipeline/intake_queues.py).
        order = self.app.intake.request_body(await request.read())
        created = (await self.app.intake.create([order]))[0]
        if created.refused:
            return problem(409, created.refused)  # e.g. "out of stock: SKU@WH"; no order was created
        if not created.created:
            return json_response(await self._view(created.order_no), 200)
        return json_response({"order_no": created.order_no, "created": True, "status": created.status,
                              "payable": created.payable, "pay_deadline": created.pay_deadline}, 201)

    async def get_order(self, request: web.Request) -> web.Response:
        view = await self._view(request.match_info["no"], history=True)
        return json_response(view) if view else problem(404, f"no order {request.match_info['no']}")

    async def _view(self, order_no: str, history: bool = False) -> dict[str, Any] | None:
        stored = await self.pipeline.store.get(order_no)
        if stored is None:
            return None
        view = {"order_no": order_no, "created": False, "state": stored.state, "stage": stored.stage,
                "status": stored.status, "attempts": stored.attempts, "wake_at": stored.wake_at,
                "order": document(decode(stored.doc))}
        view["pay_deadline"] = view["order"].get("pay_deadline")
        view["payable"] = view["order"]["amounts"]["payable"]
        if history:
            view["history"] = [h._asdict() for h in await self.pipeline.store.history(order_no)]
            view["events"] = [e._asdict() for e in await self.pipeline.store.events(order_no)]
        return view

    async def list_orders(self, request: web.Request) -> web.Response:
        """Orders matching every filter given (none: all orders), by order number; `cursor` is the
        last order number of the previous page and `next_cursor` is null on the last page."""
        query = request.query
        errors = [{"path": key, "reason": f"unknown query parameter; known: {', '.join(LIST_PARAMS)}"}
                  for key in query if key not in LIST_PARAMS]
        state = query.get("state", "")
        if state and state not in RUNTIME_STATES:
            errors.append({"path": "state", "reason": f"unknown state {state!r}; known: {', '.join(RUNTIME_STATES)}"})
        statuses: tuple[str, ...] = ()
        if query.get("status"):
            statuses = tuple(query["status"].split(","))
            bad = [s for s in statuses if s not in states.STATES]
            if bad:
                errors.append({"path": "status", "reason": f"unknown status {bad[0]!r}; known: "
                                                           f"{', '.join(states.STATES)}"})
        tab = query.get("tab", "")
        if tab and tab not in states.TABS:
            errors.append({"path": "tab", "reason": f"unknown tab {tab!r}; known: {', '.join(states.TABS)}"})
        elif tab:
            in_tab = states.statuses_for_tab(tab)
            statuses = tuple(s for s in statuses if s in in_tab) if statuses else in_tab
        try:
            limit = _limit(request)
        except BadInput as exc:
            errors += exc.errors
        if errors:
            raise BadInput(errors)
        if tab and not statuses:  # only statuses that never show in this tab: nothing matches
            return json_response({"items": [], "next_cursor": None})
        items = await self._search(query.get("member", ""), statuses, tab, state, limit, query.get("cursor", ""))
        more = len(items) > limit
        return json_response({"items": items[:limit], "next_cursor": items[limit - 1]["order_no"] if more else None})

    async def _search(self, member: str, statuses: tuple[str, ...], tab: str, state: str, limit: int,
                      after: str) -> list[dict[str, Any]]:
        """Up to limit + 1 items (one more tells whether there is a next page). A tab is a set of
        statuses narrowed by the order itself (`states.tab`), so rows may be skipped here."""
        items: list[dict[str, Any]] = []
        chunk = limit + 1 if not tab else max(limit + 1, 200)
        while True:
            rows = await self.pipeline.store.search(member=member, statuses=statuses, state=state,
                                                    limit=chunk, after=after)
            for r in rows:
                order = decode(r.doc)
                order_tab = states.tab(order)
                if tab and order_tab != tab:
                    continue
                items.append({"order_no": r.order_no, "status": r.status, "state": r.state, "stage": r.stage,
                              "member_id": order.member_id, "tab": order_tab, "updated_at": r.updated_at})
                if len(items) > limit:
                    return items
            if len(rows) < chunk:
                return items
            after = rows[-1].order_no

    async def payment(self, request: web.Request) -> web.Response:
        return await self.pay(validate(schemas.PaymentIn, await body_json(request)))

    async def pay(self, pay: schemas.PaymentIn) -> web.Response:
        answer = await self.app.payments.notify(pay)
        return json_response(answer.body, answer.status)

    async def can_pay(self, request: web.Request) -> web.Response:
        """The cashier asks before taking money (seed 001): the real time decides, not only
        whether the timeout has been processed yet."""
        no = request.match_info["no"]
        stored = await self.pipeline.store.get(no)
        if stored is None:
            return problem(404, f"no order {no}")
        order = decode(stored.doc)
        deadline = order.pay_deadline
        if not states.needs_prepayment(order):
            answer = (False, "this order is not paid at a cashier")
        elif stored.state == st.CANCELLED:
            answer = (False, "the order is cancelled")
        elif stored.state != st.WAIT_PAY:
            answer = (False, "a payment was received already")
        elif deadline is not None and self.pipeline.clock.now() > deadline:
            answer = (False, "the pay deadline has passed")
        else:
            answer = (True, "waiting for payment")
        return json_response({"order_no": no, "can_pay": answer[0], "reason": answer[1], "pay_deadline": deadline})

    # -- the reverse flow (oms_pipeline/reverse.py) -----------------------------------

    async def cancel(self, request: web.Request) -> web.Response:
        body = await body_json(request)
        if isinstance(body, dict) and body.get("kind", "cancel") != "cancel":
            raise BadInput([{"path": "kind", "reason": "POST /orders/{no}/cancel takes cancels only "
                                                      "(returns and the rest: POST /orders/{no}/returns)"}])
        return await self._reverse(request.match_info["no"], validate(schemas.ReverseIn, body))

    async def returns(self, request: web.Request) -> web.Response:
        body = await body_json(request)
        if isinstance(body, dict):
            body = {"kind": "return", **body}
            if body["kind"] == "cancel":
                raise BadInput([{"path": "kind", "reason": "a cancel goes to POST /orders/{no}/cancel"}])
        return await self._reverse(request.match_info["no"], validate(schemas.ReverseIn, body))

    async def _reverse(self, order_no: str, req: schemas.ReverseIn) -> web.Response:
        answer = await self.app.reverse.request(order_no, req)
        return json_response(answer.body, answer.status)

    async def reverse_of(self, request: web.Request) -> web.Response:
        no = request.match_info["no"]
        if await self.pipeline.store.get(no) is None:
            return problem(404, f"no order {no}")
        return json_response({"items": [reverse.view(r) for r in await self.pipeline.store.reverse_of(no)]})

    async def reverse_one(self, request: web.Request) -> web.Response:
        found = await self.pipeline.store.reverse_get(request.match_info["rno"])
        if found is None:
            return problem(404, f"no reverse order {request.match_info['rno']}")
        return json_response(reverse.view(found))

    async def decision(self, request: web.Request) -> web.Response:
        d = validate(schemas.DecisionIn, await body_json(request))
        answer = await self.app.reverse.decide(request.match_info["rno"], d.decision, d.by, d.note)
        return json_response(answer.body, answer.status)

    async def report(self, request: web.Request) -> web.Response:
        answer = await self.app.reverse.report(validate(schemas.ReportIn, await body_json(request)))
        return json_response(answer.body, answer.status)

    async def exceptions(self, request: web.Request) -> web.Response:
        rows = await self.pipeline.store.in_state(st.MANUAL, _limit(request), request.query.get("cursor", ""))
        items = []
        for r in rows:
            last = (await self.pipeline.store.history(r.order_no))[-1:]
            items.append({"order_no": r.order_no, "stage": r.stage, "status": r.status,
                          "reason": last[0].reason if last else "", "at": r.updated_at})
        return json_response({"items": items})

    async def replay(self, request: web.Request) -> web.Response:
        no = request.match_info["no"]
        async with self._one_at_a_time(no):
            replayed = await self.pipeline.release(no, "replayed from the exception centre")
        if replayed:
            return json_response({"order_no": no, "replayed": True})
        return problem(409, f"order {no} is not in the exception centre")

    async def stats(self, request: web.Request) -> web.Response:
        p = self.pipeline
        stages = {w.name: {"queue": len(w.queue), "bound": w.queue.maxsize, "pool": w.pool, "busy": w.busy,
                           "processed": w.stats.processed} for w in p.workers.values()}
        return json_response({"orders": await p.store.counts(), "finished": p.finished,
                              "in_flight": len(p.in_flight), "timers_pending": p.timers.pending,
                              "intake": p.intake_count, "stages": stages})

    async def routes_text(self, request: web.Request) -> web.Response:
        kind = request.query.get("kind")
        if kind is not None and kind not in KINDS:
            raise BadInput([{"path": "kind", "reason": f"unknown order kind {kind!r}; known: {', '.join(KINDS)}"}])
        return web.Response(text=self.pipeline.table.describe(kind) + "\n")

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            from . import openapi
            self._openapi = orjson.dumps(openapi.document())
        return web.Response(body=self._openapi, content_type="application/json")

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if not self.ready:
            return problem(503, "not ready")
        health = getattr(self.app, "health", None)  # probes cached for a second (oms_pipeline/health.py)
        down = await health.unreachable() if health is not None else []
        if down:
            return problem(503, f"not ready: {', '.join(down)} unreachable", unreachable=down)
        return json_response({"status": "ready"})


@web.middleware
async def bad_input(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except BadInput as exc:
        return json_response({"error": "invalid request", "errors": exc.errors}, 422)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= MAX_PAGE):
        raise BadInput([{"path": "limit", "reason": f"must be a whole number from 1 to {MAX_PAGE}"}])
    return int(raw)
