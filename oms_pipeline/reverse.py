"""The reverse flow: cancel, return, rejection, exchange, reissue and pull-back (DESIGN R-5, seed 001 逆向).

A reverse request becomes a reverse order of its own (`ReverseRecord`, linked to
the original by order number, unique per (order, request id), so a retried
request is the same reverse order). It never works an order at the same time
as the forward pipeline: a cancel first asks the pipeline to `pause` the order,
which stops it at its next stage boundary (or takes it to rest by
compare-and-set when it was parked, waiting for payment or for a person, or
dispatched). Then, by where the order is (seed 001's cancel flow):

* not dispatched: the cancel rules are checked (`reverse.no_cancel_after`);
  a whole cancel ends the order (CANCEL_REQUESTED -> CANCELLED) and gives back
  money and stock; a partial cancel makes the order smaller and lets it go on.
* dispatched, not out: WMS is asked to intercept; intercepted -> cancelled as
  above; too late -> the cancel becomes a return.
* out (shipped, delivered): a return. The goods come back (a pickup is booked
  when asked for); WMS reports them received; then the reversed lines' money
  and stock go back and the order ends RETURNED -> REFUNDED (or CANCELLED for
  orders that carried no money), or goes back to DELIVERED after a partial return.

Every state change, its reverse order and what it owes other systems (refunds,
points and coupons, restock, pickup, the answer to the requester) are written
in ONE compare-and-set checkpoint: the commands go out through the outbox
(oms_pipeline/commands.py), each keyed so it has its effect once.

Requests are worked one at a time per order in this process; across daemon
instances the store's compare-and-set decides (a loser re-reads and retries).
A request that cannot finish now (WMS unreachable, the order busy) stays open
and is retried every `reverse.retry_interval`, and after a restart.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, NamedTuple

import anyio
import msgspec

from . import order as order_codec
from . import routing, states
from .commands import command
from .config import Settings
from .keyed_lock import KeyedLock
from .order import Order
from .outcome import PermanentError, TransientError
from .pipeline import Job, Pipeline, move
from .ports import store as st
from .ports.store import Checkpoint, Command, Event, ReverseRecord, StoredOrder
from .schemas import ReportIn, ReverseIn
from .settlement import Reversal, cancel_everything, open_units, shrink

log = logging.getLogger("oms.reverse")

REQUESTED = "requested"
AWAITING_MERCHANT = "awaiting_merchant"
ARBITRATION = "arbitration"  # a merchant refused a return: customer service decides
WAITING_GOODS = "waiting_goods"
INTERCEPTING = "intercepting"  # the warehouse was asked to stop a dispatched order; its answer settles it
DONE = "done"
REFUSED = "refused"
OUT = (states.SHIPPED, states.DELIVERED)  # the goods have left the warehouse
AFTER_SALES = (states.INTERCEPTING, states.RETURN_REQUESTED, states.REJECTED, states.RETURNED, states.REFUNDED,
               states.CANCELLED, states.CANCEL_REQUESTED)
PAUSE_WAIT = 30.0  # seconds a request waits for the order to reach a stage boundary
PRIVILEGED = ("customer_service", "risk", "arbitration", "timeout", "stock_out")  # not bound by cancel rules


class ReverseDoc(msgspec.Struct, kw_only=True):
    kind: str
    source: str
    reason: str = ""
    lines: dict[str, int] = {}  # line number -> units; empty: the whole order
    pickup: bool = False
    mode: str = "new_order"
    result: str = ""
    refund: int = 0  # cents given back through the payment channel
    new_order_no: str = ""
    approved: bool = False
    notes: list[str] = []


class Answer(NamedTuple):
    status: int  # HTTP-like
    body: dict[str, Any]


_encode = msgspec.json.Encoder().encode
_decode_doc = msgspec.json.Decoder(ReverseDoc).decode


def reverse_no(order_no: str, request_id: str) -> str:
    """Stable per (order, request id): a retried request names the same reverse order."""
    return f"R{order_no}-{hashlib.blake2b(request_id.encode(), digest_size=4).hexdigest()}"


def view(record: ReverseRecord) -> dict[str, Any]:
    doc = _decode_doc(record.doc)
    return {"reverse_no": record.reverse_no, "order_no": record.order_no, "request_id": record.request_key,
            "kind": record.kind, "state": record.state, "source": doc.source, "reason": doc.reason,
            "lines": dict(doc.lines), "result": doc.result, "refund": doc.refund,
            "new_order_no": doc.new_order_no or None, "notes": doc.notes,
            "created_at": record.created_at, "updated_at": record.updated_at}


class Busy(Exception):
    """The order changed under us (another instance, a payment): try again."""


class Reverse:
    def __init__(self, pipeline: Pipeline, settings: Settings, intake: Any) -> None:
        self.pipeline = pipeline
        self.store = pipeline.store
        self.clock = pipeline.clock
        self.settings = settings.reverse
        self.intake = intake
        self._locks = KeyedLock()
        self._one_at_a_time = self._locks.hold
        self._waits = anyio.Event()  # set when a request had to wait

    # -- requests ---------------------------------------------------------------

    async def request(self, order_no: str, req: ReverseIn) -> Answer:
        stored = await self.store.get(order_no)
        if stored is None:
            return Answer(404, {"error": f"no order {order_no}"})
        bad = _bad_lines(order_codec.decode(stored.doc), req)
        if bad:
            return Answer(422, {"error": "invalid reverse request", "errors": [{"path": "lines", "reason": bad}]})
        now = self.clock.now()
        doc = ReverseDoc(kind=req.kind, source=req.source, reason=req.reason or f"{req.kind} by {req.source}",
                         lines={str(x.line_no): x.qty for x in req.lines or ()}, pickup=req.pickup, mode=req.mode)
        number, created = await self.store.reverse_create(ReverseRecord(
            reverse_no(order_no, req.request_id), order_no, req.request_id, req.kind, REQUESTED, now, now,
            _encode(doc)))
        record = await self.store.reverse_get(number)
        if not created and record.kind != req.kind:
            return Answer(409, {"error": f"request {req.request_id} of order {order_no} is a {record.kind}, "
                                         f"not a {req.kind}"})
        record = await self.process(number)
        return Answer(200 if record.state in st.REVERSE_CLOSED else 202, {**view(record), "duplicate": not created})

    async def decide(self, number: str, decision: str, by: str, note: str) -> Answer:
        """A merchant's decision on a return waiting for it, or customer service's on arbitration."""
        record = await self.store.reverse_get(number)
        if record is None:
            return Answer(404, {"error": f"no reverse order {number}"})
        expected = AWAITING_MERCHANT if by == "merchant" else ARBITRATION
        if record.state != expected:
            return Answer(409, {"error": f"reverse order {number} is {record.state}, not waiting for the {by}"})
        async with self._one_at_a_time(record.order_no):
            record = await self.store.reverse_get(number)
            if record.state != expected:
                return Answer(409, {"error": f"reverse order {number} changed meanwhile; try again"})
            stored, order, doc = await self._load(record)
            doc.notes.append(f"{by}: {decision}{' (' + note + ')' if note else ''}")
            if decision == "approve":
                doc.approved = True
                await self._save(record, doc, REQUESTED, stored, order)
            elif by == "merchant":
                await self._save(record, doc, ARBITRATION, stored, order)
            else:
                doc.result = "refused on arbitration"
                await self._save(record, doc, REFUSED, stored, order, answer=True)
        return Answer(200, view(await self.process(number)))

    async def warehouse_report(self, order_no: str, event: str, report_id: str) -> None:
        """A report the (simulated) warehouse sends back, e.g. the answer to an interception."""
        answer = await self.report(ReportIn(order_no=order_no, event=event, report_id=report_id))
        if answer.status >= 400:
            log.info("warehouse report not applied", extra={"event": "report_not_applied", "order_no": order_no,
                                                           "reason": answer.body.get("error", "")})

    async def report(self, rep: ReportIn) -> Answer:
        """A status report from WMS or TMS: outbound, delivered, rejected at the door, return received."""
        async with self._one_at_a_time(rep.order_no):
            stored = await self.store.get(rep.order_no)
            if stored is None:
                return Answer(404, {"error": f"no order {rep.order_no}"})
            if rep.event == "return_received":
                return await self._goods_back(stored, rep.report_id)
            if rep.event in ("intercepted", "intercept_failed"):
                return await self._intercept_answer(stored, rep.event == "intercepted")
            target = {"outbound": states.SHIPPED, "delivered": states.DELIVERED, "rejected": states.REJECTED}[rep.event]
            order = order_codec.decode(stored.doc)
            if order.status == target or target in order.timestamps:
                return Answer(200, {"order_no": rep.order_no, "status": order.status, "duplicate": True})
            if order.status in AFTER_SALES:  # the reverse flow has it: the report changes nothing
                return Answer(200, {"order_no": rep.order_no, "status": order.status, "duplicate": False,
                                    "noted": True})
            if target not in states.legal_targets(order, order.status) or stored.state != st.DONE:
                return Answer(409, {"error": f"order {rep.order_no} is {order.status} ({stored.state}): "
                                             f"a report '{rep.event}' does not apply"})
            reverse = ()
            if target == states.REJECTED:  # the consignee refused the parcel: it comes back
                reverse = (self._new_record(rep.order_no, f"tms-{rep.report_id}", "reject", "tms",
                                            "rejected at delivery", WAITING_GOODS),)
            if not await self._write(stored, order, [target], st.DONE, "report", rep.event, reverse=reverse):
                return Answer(409, {"error": f"order {rep.order_no} changed meanwhile; try again"})
            return Answer(200, {"order_no": rep.order_no, "status": target, "duplicate": False})

    # -- working a reverse order ------------------------------------------------------

    async def process(self, number: str) -> ReverseRecord:
        """Take a reverse order as far as it can go now; returns it as it is then."""
        record = await self.store.reverse_get(number)
        async with self._one_at_a_time(record.order_no):
            record = await self.store.reverse_get(number)
            if record.state != REQUESTED:
                return record
            try:
                await self._work(record)
            except (TransientError, Busy, TimeoutError, st.StoreUnavailable) as exc:
                self._waits.set()  # `run` tries again after retry_interval
                log.info("reverse request waits", extra={"event": "reverse_waits", "reverse_no": number,
                                                         "order_no": record.order_no, "reason": str(exc)})
            return await self.store.reverse_get(number)

    async def _work(self, record: ReverseRecord) -> None:
        doc = _decode_doc(record.doc)
        kind = "cancel" if doc.kind == "pullback" and doc.mode == "cancel" else doc.kind
        if kind == "cancel":
            await self._cancel(record, doc)
        elif kind in ("return", "exchange", "reject"):
            await self._return(record, doc)
        else:
            await self._new_order(record, doc)

    async def _cancel(self, record: ReverseRecord, doc: ReverseDoc) -> None:
        stored, order, _ = await self._load(record)
        if stored.state == st.CANCELLED:
            doc.result = "already cancelled"
            return await self._save(record, doc, DONE, stored, order, answer=True)
        if stored.state == st.SPLIT:
            return await self._cancel_children(record, doc, stored, order)
        if order.status in OUT or order.status in (states.RETURN_REQUESTED, states.REJECTED):
            doc.notes.append(f"the goods are out ({order.status}): the cancel becomes a return")
            return await self._return(record, doc)
        refusal = self._refusal(stored, order, doc)
        if refusal:
            doc.result = refusal
            return await self._save(record, doc, REFUSED, stored, order, answer=True)
        with anyio.fail_after(PAUSE_WAIT):
            stored = await self.pipeline.pause(record.order_no)
        if stored.state != st.PAUSED:
            raise Busy(f"order {record.order_no} is {stored.state} now")
        order = order_codec.decode(stored.doc)
        if order.results.get("paused_from") == st.DONE:
            return await self._intercept(record, doc, stored, order)
        units = _units(doc)
        if units and open_units(order) != {n: u for n, u in units.items() if u}:
            return await self._cancel_part(record, doc, stored, order, units)
        await self._cancel_whole(record, doc, stored, order)

    async def _cancel_whole(self, record: ReverseRecord, doc: ReverseDoc, stored: StoredOrder, order: Order,
                            statuses: tuple[str, ...] = ()) -> None:
        before = _given(order)
        commands = cancel_everything(order, doc.reason, record.reverse_no)
        doc.refund += _given(order) - before
        doc.result = "cancelled"
        to = [*statuses, states.CANCELLED] if statuses or order.status in (states.WAIT_PAY, states.INTERCEPTING) \
            else [states.CANCEL_REQUESTED, states.CANCELLED]
        reverse = self._updated(record, doc, DONE)
        if not await self._write(stored, order, to, st.CANCELLED, "cancelled", doc.reason, commands,
                                 (reverse,), answer=record):
            raise Busy(f"order {record.order_no} changed meanwhile")
        job = Job(order, self.pipeline.route_of(order), stored.stage, 0, self.clock.now())
        self.pipeline._end(job, routing.CANCELLED, doc.reason)

    async def _cancel_part(self, record: ReverseRecord, doc: ReverseDoc, stored: StoredOrder, order: Order,
                           units: dict[int, int]) -> None:
        if order.results.get("paused_from") == st.WAIT_PAY:
            doc.result = "an unpaid order is cancelled whole (or paid first)"
            ok = await self.pipeline.unpause(record.order_no, "partial cancel refused",
                                             reverse=(self._updated(record, doc, REFUSED),),
                                             commands=(self._answer(record, order, REFUSED),))
            if not ok:
                raise Busy(f"order {record.order_no} changed meanwhile")
            return
        commands: list[Command] = []

        def smaller(o: Order) -> None:
            found, money = shrink(o, units, record.reverse_no, doc.reason)
            commands.extend(found)
            doc.refund += money

        doc.result = "lines cancelled; the rest goes on"
        if not await self.pipeline.unpause(record.order_no, f"partial cancel: {doc.reason}", smaller,
                                           commands=lambda: (*commands, self._answer(record, order, DONE)),
                                           reverse=lambda: (self._updated(record, doc, DONE),)):
            raise Busy(f"order {record.order_no} changed meanwhile")

    async def _intercept(self, record: ReverseRecord, doc: ReverseDoc, stored: StoredOrder, order: Order) -> None:
        """Dispatched, perhaps not out yet: ask the warehouse to stop it (seed 001 拦截). The request
        goes out through the outbox with the state change; the warehouse answers with a report
        (`intercepted` or `intercept_failed`), which `_intercept_answer` settles."""
        if any(line.supplier for line in order.lines):  # a supplier ships it: nothing to intercept
            doc.notes.append("drop-shipped: no interception; the cancel becomes a return")
            if not await self._write(stored, order, [states.INTERCEPTING, states.RETURN_REQUESTED], st.DONE,
                                     "intercept_failed", doc.reason, self._pickup(record, doc, order),
                                     (self._updated(record, doc, WAITING_GOODS),)):
                raise Busy(f"order {record.order_no} changed meanwhile")
            return
        # The key comes back as the report's report_id (64 characters at most); the reverse
        # number already names the order.
        ask = command("wms.intercept", f"{record.reverse_no}:intercept", order_no=order.order_no)
        if not await self._write(stored, order, [states.INTERCEPTING], st.DONE, "intercepting", doc.reason, [ask],
                                 (self._updated(record, doc, INTERCEPTING),)):
            raise Busy(f"order {record.order_no} changed meanwhile")

    async def _intercept_answer(self, stored: StoredOrder, stopped: bool) -> Answer:
        waiting = [r for r in await self.store.reverse_of(stored.order_no) if r.state == INTERCEPTING]
        if not waiting:
            return Answer(409, {"error": f"order {stored.order_no} has no interception under way"})
        record, order, doc = waiting[0], order_codec.decode(stored.doc), _decode_doc(waiting[0].doc)
        if stopped:
            doc.notes.append("intercepted by the warehouse")
            await self._cancel_whole(record, doc, stored, order, ())
        else:
            doc.notes.append("too late to intercept: the goods are out; the cancel becomes a return")
            if not await self._write(stored, order, [states.RETURN_REQUESTED], st.DONE, "intercept_failed",
                                     doc.reason, self._pickup(record, doc, order),
                                     (self._updated(record, doc, WAITING_GOODS),)):
                return Answer(409, {"error": f"order {stored.order_no} changed meanwhile; try again"})
        return Answer(200, {**view(await self.store.reverse_get(record.reverse_no)), "status": order.status})

    async def _cancel_children(self, record: ReverseRecord, doc: ReverseDoc, stored: StoredOrder,
                               order: Order) -> None:
        """A split parent is cancelled through its children, each its own reverse order."""
        results = []
        for child in await self.store.children(record.order_no):
            child_req = ReverseIn(request_id=f"{record.request_key}.{child.order_no[-3:].strip('-')}",
                                  kind="cancel", source=doc.source, reason=doc.reason)
            answer = await self.request(child.order_no, child_req)
            results.append(f"{child.order_no}: {answer.body.get('state')} {answer.body.get('result', '')}".strip())
        doc.result = "cancelled per child order"
        doc.notes.extend(results)
        await self._save(record, doc, DONE, stored, order, answer=True)

    async def _return(self, record: ReverseRecord, doc: ReverseDoc) -> None:
        stored, order, _ = await self._load(record)
        if order.status not in (*OUT, states.RETURN_REQUESTED, states.REJECTED):
            doc.result = f"nothing has shipped yet ({order.status}): cancel instead"
            return await self._save(record, doc, REFUSED, stored, order, answer=True)
        if stored.state != st.DONE:
            raise Busy(f"order {record.order_no} is {stored.state}")
        if self.settings.return_approval == "merchant" and not doc.approved and doc.source != "customer_service":
            return await self._save(record, doc, AWAITING_MERCHANT, stored, order)
        commands = self._pickup(record, doc, order)
        if doc.kind == "exchange" and not doc.new_order_no:
            doc.new_order_no = await self._create_order(record, doc, order, "exchange")
        to = [] if order.status in (states.RETURN_REQUESTED, states.REJECTED) else [states.RETURN_REQUESTED]
        if not await self._write(stored, order, to, st.DONE, "return_requested", doc.reason, commands,
                                 (self._updated(record, doc, WAITING_GOODS),)):
            raise Busy(f"order {record.order_no} changed meanwhile")

    async def _goods_back(self, stored: StoredOrder, report_id: str) -> Answer:
        """WMS received returned goods: the oldest reverse order waiting for them is settled."""
        waiting = [r for r in await self.store.reverse_of(stored.order_no) if r.state == WAITING_GOODS]
        if not waiting:
            return Answer(409, {"error": f"order {stored.order_no} has no return waiting for goods"})
        record, others = waiting[0], waiting[1:]
        doc = _decode_doc(record.doc)
        order = order_codec.decode(stored.doc)
        reversal = Reversal(order, record.reverse_no, freight=self.settings.refund_freight_on_return,
                            reason=doc.reason)
        reversal.lines(_units(doc) or open_units(order))
        if doc.kind == "exchange":  # the customer gets goods, not money: only the stock comes back
            reversal.commands = [c for c in reversal.commands if c.topic.startswith("inventory.")]
        else:
            doc.refund += reversal.money
        doc.result = "goods received" + ("" if doc.kind == "exchange" else f", {doc.refund} refunded")
        doc.notes.append(f"received (report {report_id})")
        to = self._after_return(order, bool(others), doc.kind == "exchange")
        if not await self._write(stored, order, to, st.DONE, "returned", doc.reason, reversal.commands,
                                 (self._updated(record, doc, DONE),), answer=record):
            return Answer(409, {"error": f"order {stored.order_no} changed meanwhile; try again"})
        return Answer(200, {**view(await self.store.reverse_get(record.reverse_no)), "status": order.status})

    @staticmethod
    def _after_return(order: Order, more_waiting: bool, exchange: bool) -> list[str]:
        if more_waiting:
            return []
        if open_units(order) and order.status == states.RETURN_REQUESTED or exchange:
            return [states.DELIVERED] if order.status == states.RETURN_REQUESTED else []
        to = [] if order.status == states.RETURNED else [states.RETURNED]
        ends = states.legal_targets(order, states.RETURNED)
        end = states.REFUNDED if states.REFUNDED in ends and (order.amounts.paid or states.CANCELLED not in ends) \
            else states.CANCELLED
        return [*to, end]

    async def _new_order(self, record: ReverseRecord, doc: ReverseDoc) -> None:
        """Reissue (a new shipment, no payment) or pull-back (a new order, or one waiting for stock)."""
        stored, order, _ = await self._load(record)
        if doc.kind == "reissue" and order.status not in (*OUT, states.COMPLETED, states.RETURN_REQUESTED):
            doc.result = f"nothing has shipped yet ({order.status}): no reissue"
            return await self._save(record, doc, REFUSED, stored, order, answer=True)
        kind = "reissue" if doc.kind == "reissue" else "pullback"
        try:
            doc.new_order_no = await self._create_order(record, doc, order, kind)
        except PermanentError as exc:
            doc.result = str(exc)
            return await self._save(record, doc, REFUSED, stored, order, answer=True)
        doc.result = f"new {kind} order {doc.new_order_no}"
        await self._save(record, doc, DONE, stored, order, answer=True)

    async def _create_order(self, record: ReverseRecord, doc: ReverseDoc, order: Order, kind: str) -> str:
        units = _units(doc) or {line.line_no: line.qty for line in order.lines}
        lines = [{"sku": line.sku, "qty": units[line.line_no], "unit_price": 0, "warehouse": line.warehouse,
                  "zone": line.zone, "supplier": line.supplier, "virtual": line.virtual}
                 for line in order.lines if units.get(line.line_no) and line.gift_of is None]
        request = {"source": "service", "external_id": record.reverse_no, "kind": kind,
                   "member_id": order.member_id, "consignee": msgspec.to_builtins(order.consignee),
                   "lines": lines, "payment_method": "none", "presale": doc.mode == "wait_stock"}
        # No remark naming the original: a remark sends an order to manual review at `audit`. The
        # link is the new order's (source, external id) = ("service", reverse order number).
        created = (await self.intake.create([self.intake.request(request)]))[0]
        if created.refused:
            raise PermanentError(f"the new {kind} order was refused: {created.refused}")
        return created.order_no or await self.store.find_external("service", record.reverse_no)

    # -- rules and pieces ---------------------------------------------------------

    def _refusal(self, stored: StoredOrder, order: Order, doc: ReverseDoc) -> str:
        """Why a cancel is refused here (seed 004: per-state conditions), "" if it is not."""
        if doc.source in PRIVILEGED:
            return ""
        names = {order.kind, *self.pipeline.flag_names(order.flags)}
        route = self.pipeline.route_of(order)
        position = route.stages.index(stored.stage) if stored.stage in route.stages else len(route.stages)
        for name, stage in self.settings.no_cancel_after.items():
            if name in names and stage in route.stages and position > route.stages.index(stage):
                return f"a {name} order cannot be cancelled once past {stage}"
        return ""

    def _pickup(self, record: ReverseRecord, doc: ReverseDoc, order: Order) -> list[Command]:
        if not doc.pickup:
            return []
        return [command("tms.pickup", f"{order.order_no}:{record.reverse_no}:pickup", order_no=order.order_no,
                        city=order.consignee.city)]

    @staticmethod
    def _answer(record: ReverseRecord, order: Order, state: str) -> Command:
        return command("notify.requester", f"{record.reverse_no}:answer:{state}", order_no=record.order_no,
                       reverse_no=record.reverse_no, member_id=order.member_id, result=state)

    def _new_record(self, order_no: str, request_id: str, kind: str, source: str, reason: str,
                    state: str) -> ReverseRecord:
        now = self.clock.now()
        doc = ReverseDoc(kind=kind, source=source, reason=reason)
        return ReverseRecord(reverse_no(order_no, request_id), order_no, request_id, kind, state, now, now,
                             _encode(doc))

    def _updated(self, record: ReverseRecord, doc: ReverseDoc, state: str) -> ReverseRecord:
        return record._replace(state=state, updated_at=self.clock.now(), doc=_encode(doc))

    async def _load(self, record: ReverseRecord) -> tuple[StoredOrder, Order, ReverseDoc]:
        stored = await self.store.get(record.order_no)
        return stored, order_codec.decode(stored.doc), _decode_doc(record.doc)

    async def _save(self, record: ReverseRecord, doc: ReverseDoc, state: str, stored: StoredOrder, order: Order,
                    answer: bool = False) -> None:
        """The reverse order changes; the order itself does not (a history row says why)."""
        commands = [self._answer(record, order, state)] if answer else []
        if stored.state == st.PAUSED:  # it was paused for nothing: back to work
            if not await self.pipeline.unpause(record.order_no, f"{doc.kind}: {doc.result}",
                                               commands=commands, reverse=(self._updated(record, doc, state),)):
                raise Busy(f"order {record.order_no} changed meanwhile")
            return
        if not await self._write(stored, order, [], stored.state, doc.kind, doc.result or state, commands,
                                 (self._updated(record, doc, state),)):
            raise Busy(f"order {record.order_no} changed meanwhile")

    async def _write(self, stored: StoredOrder, order: Order, statuses: list[str], state: str, outcome: str,
                     reason: str, commands: list[Command] | tuple = (), reverse: tuple[ReverseRecord, ...] = (),
                     answer: ReverseRecord | None = None) -> bool:
        """One compare-and-set checkpoint: the order's new status and state, the reverse orders and
        the commands, all or nothing."""
        now = self.clock.now()
        events: list[Event] = []
        for status in statuses:
            move(order, status, now, events)
        if state != st.PAUSED:
            order.results.pop("paused_from", None)
        if answer is not None:
            commands = [*commands, self._answer(answer, order, DONE)]
        stage = routing.CANCELLED if state == st.CANCELLED else stored.stage
        record = Checkpoint(order.order_no, "reverse", outcome, reason, now, state, stage, order.status,
                            stored.attempts, None, order_codec.encode(order), (), tuple(events), tuple(commands),
                            tuple(reverse))
        return await self.store.checkpoint_if(record, stored.state)

    # -- the service: open requests after a restart, and those that had to wait ----------

    async def run(self) -> None:
        """At start, every open request; later, those that had to wait, every retry_interval.
        With none waiting no clock timer is set (a virtual clock stepping to its next timer
        would otherwise never come to rest)."""
        waiting = await self._resume_safely()
        while True:
            if not waiting:
                self._waits = anyio.Event()
                await self._waits.wait()
            await self.clock.sleep_until(self.clock.now() + self.settings.retry_interval)
            waiting = await self._resume_safely()

    async def _resume_safely(self) -> int:
        try:
            return await self.resume_open()
        except st.StoreUnavailable:
            return 1  # the store is away: look again after retry_interval

    async def resume_open(self) -> int:
        """Work every reverse order still in `requested`; give paused orders nobody works back.
        Returns how many are still waiting."""
        waiting, after = 0, ""
        while page := await self.store.reverse_open(500, after):
            for record in page:
                if record.state == REQUESTED:
                    waiting += (await self.process(record.reverse_no)).state == REQUESTED
            after = page[-1].reverse_no
        after = ""
        while paused := await self.store.in_state(st.PAUSED, 500, after):
            for stored in paused:
                if not any(r.state == REQUESTED for r in await self.store.reverse_of(stored.order_no)) \
                        and stored.order_no not in self._locks:
                    await self.pipeline.unpause(stored.order_no, "no reverse request holds it")
            after = paused[-1].order_no
        return waiting


def _units(doc: ReverseDoc) -> dict[int, int]:
    return {int(no): qty for no, qty in doc.lines.items()}


def _given(order: Order) -> int:
    given = (order.results.get("reverse") or {}).get("given", {})
    return given.get("cash", 0) + given.get("non_cash", 0)


def _bad_lines(order: Order, req: ReverseIn) -> str:
    by_no = {line.line_no: line for line in order.lines}
    for line in req.lines or ():
        if line.line_no not in by_no:
            return f"order {order.order_no} has no line {line.line_no}"
        if line.qty > by_no[line.line_no].qty:
            return f"line {line.line_no} has {by_no[line.line_no].qty} units, not {line.qty}"
    return ""
