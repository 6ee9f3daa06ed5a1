"""What the API accepts, validated by pydantic: every error comes back with its field path.

Money is integer cents (strict: no floats, no numeric strings). Unknown fields
are errors, so a misspelt field never silently drops data.
"""
from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError, model_validator

from .order import KINDS, PAYMENT_METHODS, SOURCES, ZONES

Cents = Annotated[StrictInt, Field(ge=0, le=10_000_000_000)]
Text = Annotated[str, Field(max_length=256)]
# No "#": a split child is named PARENT_EXTERNAL_ID#n, which no request may claim.
Code = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:/-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AddressIn(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    phone: Annotated[str, Field(pattern=r"^\+?[0-9]{6,20}$")]
    province: Annotated[str, Field(min_length=1, max_length=64)]
    city: Annotated[str, Field(min_length=1, max_length=64)]
    district: Text = ""
    detail: Text = ""
    pickup_point: Annotated[str, Field(max_length=64)] | None = None


class ComponentIn(_Strict):
    sku: Code
    qty: Annotated[StrictInt, Field(ge=1, le=1000)]
    weight: Annotated[StrictInt, Field(ge=0)] | None = None


class LineIn(_Strict):
    sku: Code
    qty: Annotated[StrictInt, Field(ge=1, le=100_000)]
    unit_price: Cents
    warehouse: Annotated[str, Field(max_length=32)] = ""
    zone: Literal[ZONES] = "ambient"  # type: ignore[valid-type]
    supplier: Annotated[str, Field(max_length=64)] = ""
    virtual: StrictBool = False
    bundle: StrictBool = False
    components: list[ComponentIn] | None = None
    delivery_date: date | None = None


class AmountsIn(_Strict):
    discount: Cents = 0
    coupon: Cents = 0
    points: Cents = 0
    freight: Cents = 0


class OrderIn(_Strict):
    source: Literal[SOURCES]  # type: ignore[valid-type]
    external_id: Code
    kind: Literal[KINDS]  # type: ignore[valid-type]
    member_id: Code
    consignee: AddressIn
    lines: Annotated[list[LineIn], Field(min_length=1)]
    amounts: AmountsIn = AmountsIn()
    payment_method: Literal[PAYMENT_METHODS] = "online"  # type: ignore[valid-type]
    remark: Annotated[str, Field(max_length=500)] = ""
    invoice_title: Annotated[str, Field(max_length=128)] | None = None
    delivery_promise: Literal["standard", "next_day", "scheduled"] = "standard"
    presale: StrictBool = False
    placed_at: float | None = None

    @model_validator(mode="after")
    def _coherent(self) -> "OrderIn":
        for i, line in enumerate(self.lines):
            if line.components and not line.bundle:
                raise ValueError(f"lines.{i}.components: only a bundle line has components")
        goods = sum(line.qty * line.unit_price for line in self.lines)
        a = self.amounts
        if a.discount + a.coupon + a.points > goods:
            raise ValueError("amounts: discount + coupon + points exceed the goods total (freight is not discounted)")
        if self.delivery_promise == "scheduled" and not any(line.delivery_date for line in self.lines):
            raise ValueError("delivery_promise: scheduled needs a delivery_date on a line")
        return self


class PaymentIn(_Strict):
    order_no: Annotated[str, Field(pattern=r"^[0-9]{18}$")]
    payment_id: Code
    amount: Cents  # the whole payment: its non-cash part plus its cash part
    channel: Annotated[str, Field(max_length=32)] = "unknown"
    # Of `amount`, what balance, cards or coupons paid (a mixed payment, 组合支付); the rest is cash.
    non_cash: Cents = 0

    @model_validator(mode="after")
    def _parts(self) -> "PaymentIn":
        if self.non_cash > self.amount:
            raise ValueError("non_cash: more than the amount")
        return self


def errors(exc: ValidationError) -> list[dict[str, Any]]:
    """Each problem as {path, reason}: the body a 422 answer carries."""
    out = []
    for err in exc.errors(include_url=False):
        path = ".".join(str(p) for p in err["loc"])
        reason = err["msg"].removeprefix("Value error, ")
        if ": " in reason and not path:  # a model-level rule names its own field
            path, reason = reason.split(": ", 1)
        out.append({"path": path or "$", "reason": reason})
    return out


REVERSE_KINDS = ("cancel", "return", "reject", "exchange", "reissue", "pullback")
REVERSE_SOURCES = ("buyer", "seller", "wms", "tms", "risk", "customer_service", "timeout", "stock_out",
                   "arbitration")
REPORT_EVENTS = ("outbound", "delivered", "rejected", "return_received", "intercepted", "intercept_failed")


class ReverseLineIn(_Strict):
    line_no: Annotated[StrictInt, Field(ge=1)]
    qty: Annotated[StrictInt, Field(ge=1, le=100_000)]


class ReverseIn(_Strict):
    """A reverse request: cancel, sales return, rejection, exchange, reissue or pull-back."""

    request_id: Code  # the requester's id: a retried request is the same reverse order
    kind: Literal[REVERSE_KINDS] = "cancel"  # type: ignore[valid-type]
    source: Literal[REVERSE_SOURCES] = "buyer"  # type: ignore[valid-type]
    reason: Text = ""
    lines: list[ReverseLineIn] | None = None  # none: the whole order
    pickup: StrictBool = False  # a return collected by the carrier
    mode: Literal["new_order", "wait_stock", "cancel"] = "new_order"  # pull-back: what becomes of it

    @model_validator(mode="after")
    def _lines(self) -> "ReverseIn":
        numbers = [line.line_no for line in self.lines or ()]
        if len(numbers) != len(set(numbers)):
            raise ValueError("lines: a line number appears twice")
        if self.lines is not None and not self.lines:
            raise ValueError("lines: empty (leave it out for the whole order)")
        return self


class ReportIn(_Strict):
    """A status report from the warehouse or the carrier."""

    order_no: Annotated[str, Field(pattern=r"^[0-9]{18}(-[0-9]{1,3})?$")]
    event: Literal[REPORT_EVENTS]  # type: ignore[valid-type]
    report_id: Code


class DecisionIn(_Strict):
    """A merchant's (or, on arbitration, customer service's) decision on a return."""

    decision: Literal["approve", "refuse"]
    by: Literal["merchant", "customer_service"] = "merchant"
    note: Text = ""


class Invalid(Exception):
    """Input that will never be accepted as it is; `errors` lists each {path, reason}."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors)
        self.errors = errors

    def __str__(self) -> str:
        return "; ".join(f"{e['path']}: {e['reason']}" for e in self.errors)


def validate(model: type, data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Invalid(errors(exc)) from None
