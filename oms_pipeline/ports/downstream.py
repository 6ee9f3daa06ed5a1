"""The downstream systems the fulfilment stages and the reverse flow command (DESIGN R-2).

Every method with an effect takes the idempotency key (`StageContext.key(order)`,
"ORDERNO:stage") first. A second call with the same key has no new effect and
returns the first call's result, so a stage replayed after a crash never
double-books. Reads take no key. Failures worth retrying raise
`TransientError`; requests that can never succeed raise `PermanentError`.
Money is integer cents.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

CHANNELS = ("sms", "wechat", "mini_program", "app_push")


class Occupation(msgspec.Struct, frozen=True, kw_only=True):
    """ERP's answer to an occupation: the lines it could not occupy.

    A short line is not occupied at all; its qty is the qty asked for. The
    answer is final for its key: asking again with the same key gives it again.
    """

    occupation_id: str
    short: list[tuple[str, str, int]] = []  # (sku, warehouse, qty)


class StockLevel(msgspec.Struct, frozen=True):
    sellable: int
    reserved: int
    sold: int


class Reservation(msgspec.Struct, frozen=True):
    """An open reservation: reserved, neither confirmed nor released yet (for the reconciler)."""

    key: str
    sku: str
    warehouse: str
    qty: int
    created_at: float  # epoch seconds of the reserve call that made it


class Notification(Protocol):
    async def send(self, key: str, channel: str, recipient: str, template: str,
                   params: dict[str, Any]) -> str:
        """Send one message on `channel` (one of CHANNELS); returns the message id."""


class Finance(Protocol):
    async def push_voucher(self, key: str, order_no: str, amount_cents: int, method: str) -> str:
        """Book the payment voucher of an order; returns the voucher id."""

    async def refund(self, key: str, order_no: str, amount_cents: int, reason: str) -> str:
        """Book a refund; returns the refund id."""

    async def credit_note(self, key: str, order_no: str, amount_cents: int, reason: str) -> str:
        """Credit an order settled on account (ToB, third-party platform) in the next settlement;
        returns the credit note id."""


class Product(Protocol):
    async def tax_rate_bp(self, sku: str) -> int:
        """The sku's VAT rate in basis points (1300 = 13%)."""

    async def bundle_components(self, sku: str) -> list[tuple[str, int, int]]:
        """(component sku, qty per bundle, price-spreading weight) of a virtual bundle."""


class Risk(Protocol):
    async def fraud_score(self, order_no: str, member_id: str, phone: str, amount_cents: int) -> int:
        """0 (clean) to 100 (known cheat)."""


class Purchasing(Protocol):
    async def push_presale(self, key: str, order_no: str, lines: list[tuple[str, int]]) -> str:
        """Tell purchasing to source presale (sku, qty) lines; returns the request id."""


class Tms(Protocol):
    async def request_waybill(self, key: str, order_no: str, warehouse: str, zone: str) -> str:
        """A carrier waybill number, unique and stable per key."""

    async def pickup(self, key: str, order_no: str, city: str) -> str:
        """Book a carrier to collect a return from the consignee; returns the pickup id."""


class Accounts(Protocol):
    """The member's own accounts: points, coupons (and stored balance) given back by the reverse flow."""

    async def credit(self, key: str, member_id: str, account: str, amount: int, order_no: str) -> str:
        """Give `amount` back to the member's `account` ("points", "coupon" or "balance");
        points and coupons are valued in cents. Returns the credit id."""


class Erp(Protocol):
    async def occupy(self, key: str, order_no: str, lines: list[tuple[str, str, int]]) -> Occupation:
        """Occupy (sku, warehouse, qty) lines of ERP stock."""


class Wms(Protocol):
    async def dispatch(self, key: str, order_no: str, payload: dict[str, Any]) -> str:
        """Hand an order to the warehouse; returns the WMS task id."""

    async def intercept(self, key: str, order_no: str) -> bool:
        """Stop a dispatched order; False when it was never dispatched or is already out."""

    async def report(self, order_no: str, event: str, report_id: str) -> None:
        """The warehouse's status report back to the OMS (outbound, intercepted, intercept_failed,
        return_received...): a real WMS publishes it to the reports intake queue."""


class Supplier(Protocol):
    async def dispatch(self, key: str, order_no: str, supplier: str, payload: dict[str, Any]) -> str:
        """Hand a drop-shipped order to its supplier; returns the supplier's task id."""


class Invoice(Protocol):
    async def request(self, key: str, order_no: str, title: str, amount_cents: int) -> str:
        """Request an electronic invoice; returns the invoice request id."""


class Inventory(Protocol):
    """Sellable stock per (sku, warehouse): reserve at intake, confirm or release later.

    The reservation is named by its key; `confirm` and `release` take that key.
    """

    async def reserve(self, key: str, sku: str, warehouse: str, qty: int) -> bool:
        """Move qty from sellable to reserved; False (and nothing moved) when short."""

    async def confirm(self, key: str) -> None:
        """Move the reservation to sold."""

    async def release(self, key: str) -> None:
        """Give the reservation back to sellable. Releasing a key never reserved
        makes a later `reserve` with that key refuse, so a cancel that overtakes
        its own reservation leaves no stock behind."""

    async def stock(self, sku: str, warehouse: str) -> StockLevel:
        """The current levels (a read)."""

    # Two small additions for the OMS's try/confirm/cancel (oms_pipeline/stock.py):

    async def restock(self, key: str, sku: str, warehouse: str, qty: int) -> None:
        """Move qty from sold back to sellable: a sale confirmed for an order that was then
        cancelled before anything left the warehouse (a release of a sold reservation is
        refused: that would be a return). Keyed like every effect: once per key."""

    async def open_reservations(self, created_before: float, limit: int = 500,
                                after: str = "") -> list[Reservation]:
        """Reservations still open (neither confirmed nor released) made at or before
        `created_before`, by key, the first `limit` after key `after` (a read: the
        reconciler pages through them to expire the ones nobody settled)."""


@dataclass(frozen=True, slots=True)
class Ports:
    notification: Notification
    finance: Finance
    product: Product
    risk: Risk
    purchasing: Purchasing
    tms: Tms
    erp: Erp
    wms: Wms
    supplier: Supplier
    invoice: Invoice
    inventory: Inventory
    accounts: Accounts
