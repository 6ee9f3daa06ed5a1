"""Sellable stock of orders: reserved at intake, confirmed when paid, given back on cancel (DESIGN R-4).

Seed 001 ("如何保证下单时多系统数据强一致") deducted stock inside the order
service's local transaction: when the process died after the deduction and
before the commit, the stock stayed deducted for an order that never existed
(undersell). Here the deduction is a reservation with a key and an expiry,
try / confirm / cancel against the inventory port:

* try: `reserve(order)` at intake, BEFORE the order is committed: one
  reservation per (sku, warehouse) of its stock-holding lines, keyed
  "ORDERNO:reserve:SKU@WH", all or nothing. One line short and every
  reservation made for the order is released and the order is refused
  ("out of stock: SKU@WH"); it is never created. A committed order therefore
  always has its stock: no oversell.
* confirm (reserved -> sold): when the order first enters fulfilment, i.e. when
  it is paid (the pipeline's `on_start` hook) or right after intake for orders
  that need no payment (`Intake.create`).
* cancel: a cancelled order gives its stock back, by commands written in the
  outbox with the cancel's own checkpoint (oms_pipeline/settlement.py): never
  started (a payment timeout) -> its reservations are released; started ->
  the units are restocked (sold -> sellable), per line, keyed so each comes
  back once, also after a crash between the cancel and the restock. A split
  child gives back what its own lines hold of the parent's reservations
  (`split` copies those records into the child).
* expiry: a reservation still open `stock.reservation_ttl` after it was made is
  settled by the reconciler (`run`, started with the pipeline, every
  `stock.reconcile_interval`) against the store: no such order (the crash
  between reserve and commit, or a duplicate whose release failed) or a
  cancelled one -> release; an order that has started -> confirm; an order
  still waiting for payment or for a person -> kept (its deadline or that
  person decides). So stock is undersold only transiently, bounded by the TTL.

Which lines hold stock: physical lines with a warehouse. Virtual lines (gift
cards, e-vouchers) have no warehouse stock: they ship by virtual outbound.
Drop-shipped lines are shipped by their supplier from the supplier's own stock,
which our inventory does not count. A line naming no warehouse has no stock
location (it cannot ship either: `waybill` refuses it). A bundle line holds its
own SKU (the bundle's sellable count); gift lines are only added after payment
(`gifts`) and hold none.

What the order remembers: `results["stock"] = {"lines": {line_no: [sku,
warehouse, qty]}}`, written before the commit, so each cancel (also a split
child's, through its parent) knows what it holds.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import anyio

from . import order as order_codec
from . import states
from .config import Settings
from .order import Order
from .outcome import PermanentError, TransientError
from .ports import store as st

log = logging.getLogger("oms.stock")

PAGE = 500  # open reservations the reconciler reads at a time


class StockUnavailable(Exception):
    """The inventory could not be asked (a transient failure): nothing is reserved, try again."""


def reservation_key(order_no: str, sku: str, warehouse: str) -> str:
    return f"{order_no}:reserve:{sku}@{warehouse}"


def order_of(key: str) -> str:
    """The order number a reservation key belongs to."""
    return key.split(":reserve:", 1)[0]


def holds_stock(line: Any) -> bool:
    """Physical, shipped from one of our warehouses (see the module docstring for why)."""
    return not line.virtual and not line.supplier and bool(line.warehouse)


def wanted(order: Order) -> dict[tuple[str, str], int]:
    """Units per (sku, warehouse) the order's lines hold; several lines of one place add up."""
    out: Counter[tuple[str, str]] = Counter()
    for line in order.lines:
        if holds_stock(line):
            out[(line.sku, line.warehouse)] += line.qty
    return dict(sorted(out.items()))


def recorded(order: Order) -> dict[tuple[str, str], int]:
    """Units per (sku, warehouse) recorded at intake."""
    out: Counter[tuple[str, str]] = Counter()
    for sku, warehouse, qty in (order.results.get("stock") or {}).get("lines", {}).values():
        out[(sku, warehouse)] += qty
    return dict(sorted(out.items()))


class Stock:
    def __init__(self, inventory: Any, store: Any, clock: Any, settings: Settings) -> None:
        self.inventory = inventory
        self.store = store
        self.clock = clock
        self.ttl = settings.stock.ttl(settings.payment)
        self.interval = settings.stock.reconcile_interval
        self.counts: Counter[str] = Counter()  # what was done, for tests and logs
        self._reserved = anyio.Event()
        self._lock = anyio.Lock()  # reconciler passes, one at a time

    # -- intake ---------------------------------------------------------------

    async def reserve(self, order: Order) -> str:
        """Reserve every stock-holding line of a new order, all or nothing; records what it
        holds in `order.results["stock"]`. Returns "" when reserved, else why not
        ("out of stock: SKU@WH"), with nothing left reserved. Raises StockUnavailable
        (nothing left reserved either) when the inventory cannot be asked."""
        held: list[str] = []
        try:
            for (sku, warehouse), qty in wanted(order).items():
                key = reservation_key(order.order_no, sku, warehouse)
                if not await self.inventory.reserve(key, sku, warehouse, qty):
                    await self._release_keys(held)
                    self.counts["refused"] += 1
                    return f"out of stock: {sku}@{warehouse}"
                held.append(key)
        except (TransientError, PermanentError) as exc:
            await self._release_keys(held)
            raise StockUnavailable(f"inventory: {exc}") from None
        lines = {str(line.line_no): [line.sku, line.warehouse, line.qty] for line in order.lines if holds_stock(line)}
        if lines:
            order.results["stock"] = {"lines": lines}
            self.counts["reserved"] += len(held)
            self._reserved.set()
        return ""

    async def release(self, order: Order) -> None:
        """Give back an order's reservations at once (a duplicate create, a refused intake).
        Failures are left to the reconciler: the order number is in no store."""
        await self._release_keys([reservation_key(order.order_no, sku, wh) for sku, wh in wanted(order)])

    async def _release_keys(self, keys: list[str]) -> None:
        for key in keys:
            try:
                await self.inventory.release(key)
                self.counts["released"] += 1
            except Exception as exc:  # noqa: BLE001 - the reconciler releases it after the TTL
                log.warning("release failed; the reconciler will", extra={"event": "stock_release_failed",
                                                                            "key": key, "reason": str(exc)})

    async def confirm(self, order: Order) -> None:
        """The order is paid (or needs no payment): its reservations become sales. Never
        raises: a failure is logged and the reconciler confirms after the TTL."""
        for (sku, warehouse) in recorded(order):
            key = reservation_key(order.order_no, sku, warehouse)
            try:
                await self.inventory.confirm(key)
                self.counts["confirmed"] += 1
            except Exception as exc:  # noqa: BLE001
                log.warning("confirm failed; the reconciler will", extra={
                    "event": "stock_confirm_failed", "order_no": order.order_no, "key": key, "reason": str(exc)})

    # -- the reconciler -------------------------------------------------------

    async def reconcile(self) -> Counter[str]:
        """Settle every reservation open longer than the TTL against the store (one pass)."""
        done: Counter[str] = Counter()
        before = self.clock.now() - self.ttl
        after = ""
        async with self._lock:
            while True:
                page = await self.inventory.open_reservations(before, PAGE, after)
                for r in page:
                    done[await self._settle(r.key)] += 1
                if len(page) < PAGE:
                    break
                after = page[-1].key
        if done:
            self.counts.update({f"expired_{k}": n for k, n in done.items()})
            log.info("reservations settled", extra={"event": "stock_reconciled", **done})
        return done

    async def _settle(self, key: str) -> str:
        stored = await self.store.get(order_of(key))
        if stored is None or stored.state == st.CANCELLED:
            await self.inventory.release(key)
            return "released"
        if stored.state in (st.WAIT_PAY, st.MANUAL) and \
                states.IN_FULFILMENT not in order_codec.decode(stored.doc).timestamps:
            return "kept"  # its pay deadline, or a person, decides
        await self.inventory.confirm(key)
        return "confirmed"

    async def _any_open(self) -> bool:
        return bool(await self.inventory.open_reservations(float("inf"), 1))

    # -- the service ----------------------------------------------------------

    async def run(self) -> None:
        """Reconcile periodically."""
        while True:
            self._reserved = anyio.Event()
            try:
                await self.reconcile()
                anything_open = await self._any_open()
            except Exception:  # noqa: BLE001 - e.g. the inventory is down: try again next time
                log.exception("reconciler pass failed", extra={"event": "stock_reconcile_failed"})
                anything_open = True
            if anything_open:
                await self.clock.sleep_until(self.clock.now() + self.interval)
            else:
                # Nothing can expire until something is reserved: no clock timer meanwhile (a
                # virtual clock stepping to its next timer would otherwise never come to rest).
                with anyio.move_on_after(self.interval):
                    await self._reserved.wait()
