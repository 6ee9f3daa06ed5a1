"""Downstream commands that travel through the outbox (DESIGN R-5).

A state change that owes something to another system (money back, stock
back, a pickup, an answer to whoever asked) writes a `Command` in the same
transaction as the checkpoint. The relay (oms_pipeline/relay.py) delivers each
at least once, and `apply` carries it out against the downstream ports, keyed,
so a second delivery has no second effect. On the production broker the same
`apply` runs in the consumer of the published commands.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

import orjson

from .outcome import PermanentError
from .ports.downstream import Ports
from .ports.store import Command

Handler = Callable[[Ports, str, dict[str, Any]], Awaitable[None]]


def command(topic: str, key: str, **payload: Any) -> Command:
    if topic not in HANDLERS:
        raise ValueError(f"unknown command topic {topic!r}; known: {', '.join(TOPICS)}")
    return Command(topic, key, orjson.dumps(payload))


async def _refund(ports: Ports, key: str, p: dict[str, Any]) -> None:
    await ports.finance.refund(key, p["order_no"], p["amount"], f"{p['reason']} ({p['method']})")


async def _credit_note(ports: Ports, key: str, p: dict[str, Any]) -> None:
    await ports.finance.credit_note(key, p["order_no"], p["amount"], p["reason"])


async def _credit(ports: Ports, key: str, p: dict[str, Any]) -> None:
    await ports.accounts.credit(key, p["member_id"], p["account"], p["amount"], p["order_no"])


async def _release(ports: Ports, key: str, p: dict[str, Any]) -> None:
    """An unpaid order's reservation goes back to sellable (the reservation's own key)."""
    await ports.inventory.release(p["reservation"])


async def _restock(ports: Ports, key: str, p: dict[str, Any]) -> None:
    """Sold units come back to sellable. The sale is confirmed first (a no-op when it was; a
    sale whose confirm was lost otherwise); a reservation already released sold nothing."""
    try:
        await ports.inventory.confirm(p["reservation"])
    except PermanentError:
        return
    await ports.inventory.restock(key, p["sku"], p["warehouse"], p["qty"])


async def _pickup(ports: Ports, key: str, p: dict[str, Any]) -> None:
    await ports.tms.pickup(key, p["order_no"], p["city"])


async def _intercept(ports: Ports, key: str, p: dict[str, Any]) -> None:
    """Ask the warehouse to stop a dispatched order; it answers with a status report."""
    stopped = await ports.wms.intercept(key, p["order_no"])
    await ports.wms.report(p["order_no"], "intercepted" if stopped else "intercept_failed", key)


async def _answer(ports: Ports, key: str, p: dict[str, Any]) -> None:
    await ports.notification.send(key, "app_push", p["member_id"], f"reverse_{p['result']}",
                                  {"order_no": p["order_no"], "reverse_no": p["reverse_no"]})


HANDLERS: dict[str, Handler] = {
    "fms.refund": _refund,             # money back through the payment channel (cash or stored value)
    "fms.credit_note": _credit_note,   # an order settled on account: credited in the next settlement
    "account.credit": _credit,         # points and balance back to the member's account
    "promo.unbind": _credit,           # a coupon back to the member (account "coupon")
    "inventory.release": _release,
    "inventory.restock": _restock,
    "tms.pickup": _pickup,
    "wms.intercept": _intercept,       # stop a dispatched order if it has not left yet
    "notify.requester": _answer,       # the answer to whoever asked for the reverse
}
TOPICS = tuple(HANDLERS)


async def apply(ports: Ports, topic: str, key: str, payload: dict[str, Any]) -> None:
    """Carry out one command; raises KeyError for a topic this build does not know."""
    handler = HANDLERS.get(topic)
    if handler is None:
        raise KeyError(f"unknown command topic {topic!r}")
    await handler(ports, key, payload)
