"""Payment notifications from the payment centre (DESIGN R-4, seed 001's boundaries).

One code path for `POST /payments` and the `payments` intake queue:

* the payment already booked (same payment_id): a no-op, answered as a duplicate;
* a payment the order can no longer take (cancelled, or its deadline passed by
  the server's clock even if the timeout has not fired yet): recorded on the
  order and refunded in full; the order stays cancelled;
* a second, different payment for an order already paid: recorded and refunded
  in full; the order goes on as it was;
* an amount other than the payable: recorded, the order goes to the exception
  centre (a person decides; a replay accepts it);
* otherwise the order is paid and released into fulfilment.

Refunds of recorded payments are keyed "ORDERNO:refund:PAYMENT_ID": a repeated
notification books the refund again with the same key, so it happens once even
if the first attempt failed after the payment was recorded.
"""
from __future__ import annotations

from typing import Any

from . import states
from .answers import Answer, problem
from .keyed_lock import KeyedLock
from .order import Order, decode
from .outcome import TransientError
from .pipeline import Pipeline
from .ports import store as st
from .schemas import PaymentIn


class Payments:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        # Notifications (and exception-centre replays) for one order run one after another: a second
        # copy of a payment arriving while the first is being booked finds it booked (a duplicate).
        self.busy = KeyedLock()

    async def notify(self, pay: PaymentIn) -> Answer:
        async with self.busy.hold(pay.order_no):
            return await self._notify(pay)

    async def _notify(self, pay: PaymentIn) -> Answer:
        pipeline = self.pipeline
        stored = await pipeline.store.get(pay.order_no)
        if stored is None:
            return problem(404, f"no order {pay.order_no}")
        order = decode(stored.doc)
        if order.results.get("payment_id") == pay.payment_id:
            return Answer(200, {"order_no": pay.order_no, "duplicate": True, "status": stored.status})
        recorded = next((p for p in order.results.get("late_payments", ()) if p["payment_id"] == pay.payment_id), None)
        if recorded is not None:  # recorded before: make sure its refund is booked (the key makes it once)
            return await self._refund(pay.order_no, recorded, stored.status, duplicate=True)
        if stored.state == st.WAIT_PAY and order.pay_deadline is not None \
                and pipeline.clock.now() > order.pay_deadline:
            await pipeline.expire_payment(pay.order_no)  # the deadline passed: cancel it now, not at the timer
            stored = await pipeline.store.get(pay.order_no)
        if stored.state == st.CANCELLED:
            return await self._refunded(pay, stored, "after cancellation")
        if stored.state != st.WAIT_PAY:
            if order.results.get("payment_id") and stored.state != st.MANUAL:  # (in review: a person decides)
                return await self._refunded(pay, stored, "for an order paid already")
            return problem(409, f"order {pay.order_no} is not waiting for payment (state {stored.state})")
        return await self._book(pay, order)

    async def _book(self, pay: PaymentIn, order: Order) -> Answer:
        def booked(o: Order) -> None:
            o.amounts.paid = pay.amount
            o.amounts.non_cash, o.amounts.cash = pay.non_cash, pay.amount - pay.non_cash
            o.results["payment_id"] = pay.payment_id

        payable = order.amounts.payable
        if pay.amount != payable:
            reason = f"paid {pay.amount}, payable {payable}"
            if not await self.pipeline.hold(pay.order_no, f"{reason} (payment {pay.payment_id} via {pay.channel})",
                                            booked):
                return problem(409, f"order {pay.order_no} changed meanwhile; try again")
            return Answer(200, {"order_no": pay.order_no, "duplicate": False, "status": states.MANUAL_REVIEW,
                                "reason": reason})
        if not await self.pipeline.release(pay.order_no, f"paid {pay.amount} via {pay.channel}", booked):
            return problem(409, f"order {pay.order_no} changed meanwhile; try again")
        return Answer(200, {"order_no": pay.order_no, "duplicate": False, "status": "PAID"})

    async def _refunded(self, pay: PaymentIn, stored: Any, why: str) -> Answer:
        """Money the order cannot take: on its record first (results["late_payments"] and a history
        row "late_payment"), then refunded in full. Never revives or changes the order."""
        entry = {"payment_id": pay.payment_id, "amount": pay.amount, "non_cash": pay.non_cash,
                 "cash": pay.amount - pay.non_cash, "channel": pay.channel, "at": self.pipeline.clock.now(),
                 "why": why}

        def record(o: Order) -> None:
            o.results.setdefault("late_payments", []).append(entry)

        reason = f"payment {pay.payment_id} of {pay.amount} {why}: refunded"
        if not await self.pipeline.note(pay.order_no, stored.state, "late_payment", reason, record):
            return problem(409, f"order {pay.order_no} changed meanwhile; try again")
        return await self._refund(pay.order_no, entry, stored.status, duplicate=False)

    async def _refund(self, order_no: str, payment: dict[str, Any], status: str, duplicate: bool) -> Answer:
        refund_id = None
        if payment["amount"] > 0:
            try:
                refund_id = await self.pipeline.ports.finance.refund(
                    f"{order_no}:refund:{payment['payment_id']}", order_no, payment["amount"],
                    f"payment {payment.get('why', 'after cancellation')}")
            except TransientError as exc:
                # Recorded, not yet refunded: the payment centre notifies again and we retry (same key).
                return problem(503, f"payment {payment['payment_id']} recorded, its refund failed for now "
                                    f"({exc}); notify again")
        return Answer(200, {"order_no": order_no, "duplicate": duplicate, "status": status, "refunded": True,
                            "refund_id": refund_id})
