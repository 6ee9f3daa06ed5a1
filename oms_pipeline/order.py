"""The order document that flows through the pipeline.

Money is integer cents everywhere. The structs are msgspec Structs: one C
call encodes or decodes (and type-checks) a whole order, which is what every
checkpoint and every process-pool hop does.

The structs are not tracked by the cycle collector (`gc=False`): an order's
document is a tree of values that never points back at itself, and with
thousands of orders in flight every collection would otherwise walk them all.

The encoded document leaves out the fields of an order, a line and the
amounts that are at their default (`omit_defaults`): ~30% fewer bytes,
and the store writes the document at every checkpoint (PostgreSQL's time per
checkpoint row grows ~4.6 us a KB, bench/RESULTS.md). Decoding fills them in
again; `document()` gives the whole order, every field present, for readers
of JSON (the HTTP API).
"""
from __future__ import annotations

from typing import Any

import msgspec

# Seed 001's five WMS temperature zones (常温、高温冷藏、低温冷藏、高温冷冻、低温冷冻).
ZONES = ("ambient", "chilled_high", "chilled_low", "frozen_high", "frozen_low")

# Order kinds by source. The kind decides payment and the route through the stages.
KINDS = (
    "toc",          # ToC: app, web, mini-program, gift exchange
    "tob",          # ToB sales plan
    "third_party",  # third-party platform order (paid on the platform)
    "reissue",      # 补发: new shipment, no payment
    "exchange",     # 换发: the new-order half of an exchange
    "pullback",     # 拉回生成新订单
)
SOURCES = ("app", "web", "mini", "gift_exchange", "sales_plan", "platform", "service")
PAYMENT_METHODS = ("online", "cod", "none", "mixed")


class Address(msgspec.Struct, kw_only=True, gc=False):  # whole: it goes to the WMS and suppliers as it is
    name: str
    phone: str
    province: str
    city: str
    district: str = ""
    detail: str = ""
    pickup_point: str | None = None  # O2O self-pickup instead of delivery


class Line(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    line_no: int
    sku: str
    qty: int
    unit_price: int  # cents
    warehouse: str = ""
    zone: str = "ambient"
    supplier: str = ""  # non-empty: drop-shipped by this supplier
    virtual: bool = False
    bundle: bool = False  # a virtual bundle, expanded by `fill`
    bundle_of: int | None = None  # component of this bundle line
    gift_of: int | None = None  # gift attached to this main line
    delivery_date: str | None = None
    tax_rate_bp: int = 0  # basis points, from the product port
    # Filled by `allocate`: this line's share of the order-level amounts.
    discount: int = 0
    coupon: int = 0
    points: int = 0
    freight: int = 0
    payable: int = 0

    @property
    def goods(self) -> int:
        return self.qty * self.unit_price


class Amounts(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    discount: int = 0
    coupon: int = 0
    points: int = 0  # points redeemed, valued in cents
    freight: int = 0
    payable: int = 0  # goods - discount - coupon - points + freight
    paid: int = 0
    non_cash: int = 0  # balance, cards, coupons paid before the cashier
    cash: int = 0


class Order(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    order_no: str
    source: str
    external_id: str
    kind: str
    member_id: str
    consignee: Address
    lines: list[Line]
    amounts: Amounts
    payment_method: str = "online"
    flags: str = ""
    status: str = "CREATED"
    parent_no: str | None = None
    children: list[str] = []
    remark: str = ""
    invoice_title: str | None = None
    delivery_promise: str = "standard"  # standard | next_day | scheduled
    presale: bool = False  # goods ship when stock arrives; set from the request at intake
    created_at: float = 0.0
    pay_deadline: float | None = None  # after it an unpaid order is cancelled; handed to the cashier
    timestamps: dict[str, float] = {}  # state reached -> epoch seconds
    results: dict[str, Any] = {}  # what each stage produced (waybill no, voucher id, ...)

    @property
    def goods(self) -> int:
        return sum(line.goods for line in self.lines)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Order)


def encode(order: Order) -> bytes:
    return _encoder.encode(order)


def decode(data: bytes) -> Order:
    return _decoder.decode(data)


def document(order: Order) -> dict[str, Any]:
    """The order as JSON-ready builtins with every field, defaults included."""
    doc = msgspec.structs.asdict(order)
    doc["consignee"] = msgspec.structs.asdict(order.consignee)
    doc["lines"] = [msgspec.structs.asdict(line) for line in order.lines]
    doc["amounts"] = msgspec.structs.asdict(order.amounts)
    return msgspec.to_builtins(doc)
