"""What the API accepts, validated by pydantic: every error comes back with its field path.

Money is integer cents (strict: no floats, no numeric strings). Unknown fields
are errors, so a misspelt field never silently drops data.
"""
from __future__ import annotations

import types
from datetime import date
from typing import Annotated, Any, Callable, Literal, Union, get_args, get_origin

import annotated_types
import msgspec
import orjson
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, ValidationError, model_validator
from pydantic.fields import FieldInfo

from .order import KINDS, PAYMENT_METHODS, SOURCES, ZONES
from .order_no import CHILD_PATTERN, PATTERN

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
        problem = incoherence(self)
        if problem:
            raise ValueError(problem)
        return self


def incoherence(order: Any) -> str:
    """What makes an order request incoherent across its fields ("path: reason"), or "". Takes
    an `OrderIn` or its fast-path struct (`FastSchema`): both have the same attributes."""
    for i, line in enumerate(order.lines):
        if line.components and not line.bundle:
            return f"lines.{i}.components: only a bundle line has components"
    goods = sum(line.qty * line.unit_price for line in order.lines)
    a = order.amounts
    if a.discount + a.coupon + a.points > goods:
        return "amounts: discount + coupon + points exceed the goods total (freight is not discounted)"
    if order.delivery_promise == "scheduled" and not any(line.delivery_date for line in order.lines):
        return "delivery_promise: scheduled needs a delivery_date on a line"
    return ""


class PaymentIn(_Strict):
    order_no: Annotated[str, Field(pattern=f"^{PATTERN}$")]
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

    order_no: Annotated[str, Field(pattern=f"^{CHILD_PATTERN}$")]
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


def decode_json(body: bytes) -> Any:
    """A request body as Python values; what is not JSON is Invalid, with the parser's reason."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Invalid([{"path": "$", "reason": f"not valid JSON: {exc}"}]) from None


def validate(model: type, data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise Invalid(errors(exc)) from None


class FastSchema:
    """A model's schema as msgspec structs, derived from the pydantic model (its one source):
    `parse(body)` decodes and checks a request body in one C call, in about half the time of JSON
    decoding then pydantic (bench/RESULTS.md). It answers only for bodies it accepts (None for any other); the caller then
    asks pydantic, which lists every error (msgspec stops at the first) and stays the authority
    on what is valid: a body msgspec refuses but pydantic's lax parsing takes (a float as a numeric
    string, say) is still accepted. The derivation covers the field types and constraints these
    schemas use and refuses others, so a new kind of field cannot be skipped unchecked;
    tests/test_fast_schema.py holds the two to the same verdicts and the same output."""

    def __init__(self, model: type[BaseModel], check: Callable[[Any], str] | None = None) -> None:
        self._structs: dict[type, tuple[type, _Plan]] = {}
        struct, self._plan = self._struct(model)
        self._decoder = msgspec.json.Decoder(struct)
        self._check = check

    def parse(self, body: bytes) -> dict[str, Any] | None:
        """The request as pydantic's `model_dump(mode="json", exclude_none=True)` gives it, or None."""
        try:
            value = self._decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError):
            return None
        if self._check is not None and self._check(value):
            return None
        out = msgspec.to_builtins(value)
        _drop_none(out, self._plan)
        return out

    def _struct(self, model: type[BaseModel]) -> tuple[type, "_Plan"]:
        found = self._structs.get(model)
        if found is None:
            fields, optional, nested = [], [], []
            for name, info in model.model_fields.items():
                kind, admits_none, sub = self._type(info.annotation, info.metadata)
                if admits_none:
                    optional.append(name)
                if sub is not None:
                    nested.append((name, *sub))
                if info.is_required():
                    fields.append((name, kind))
                elif isinstance(info.default, BaseModel):
                    fields.append((name, kind, msgspec.field(default_factory=self._struct(type(info.default))[0])))
                else:
                    fields.append((name, kind, info.default))
            struct = msgspec.defstruct(f"Fast{model.__name__}", fields, kw_only=True, frozen=True,
                                       forbid_unknown_fields=True)
            found = self._structs[model] = (struct, (tuple(optional), tuple(nested)))
        return found

    def _type(self, annotation: Any, metadata: list[Any]) -> tuple[Any, bool, tuple["_Plan", bool] | None]:
        """The msgspec type; whether it admits None; the plan of the model it holds (and whether
        in a list), if it holds one."""
        origin, args = get_origin(annotation), get_args(annotation)
        if origin is Annotated:
            extra = [m for a in args[1:] for m in (a.metadata if isinstance(a, FieldInfo) else [a])]
            return self._type(args[0], [*metadata, *extra])
        if origin in (Union, types.UnionType):
            if metadata:
                raise TypeError(f"constraints on a union: {annotation}")
            members = [self._type(a, []) for a in args]
            subs = [sub for _, _, sub in members if sub is not None]
            if len(subs) > 1:
                raise TypeError(f"no fast-path type for a union of several models: {annotation}")
            return (Union[tuple(kind for kind, _, _ in members)],  # noqa: UP007 - built at run time
                    any(none for _, none, _ in members), subs[0] if subs else None)
        sub = None
        if origin is Literal:
            kind = annotation
        elif origin is list:
            item, item_none, item_sub = self._type(args[0], [])
            if item_none or (item_sub is not None and item_sub[1]):
                raise TypeError(f"no fast-path type for {annotation}")
            kind, sub = list[item], (item_sub[0], True) if item_sub else None  # type: ignore[valid-type]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            kind, plan = self._struct(annotation)
            sub = (plan, False)
        elif annotation in (str, int, bool, float, date, type(None)):
            kind = annotation  # msgspec is strict: no numeric strings, no bools as ints
        else:
            raise TypeError(f"no fast-path type for {annotation}")
        meta = self._meta(metadata)
        return (Annotated[kind, msgspec.Meta(**meta)] if meta else kind), annotation is type(None), sub

    @staticmethod
    def _meta(metadata: list[Any]) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        for m in metadata:
            if isinstance(m, Strict):
                continue  # what msgspec does anyway
            if isinstance(m, annotated_types.Ge):
                meta["ge"] = m.ge
            elif isinstance(m, annotated_types.Le):
                meta["le"] = m.le
            elif isinstance(m, annotated_types.MinLen):
                meta["min_length"] = m.min_length
            elif isinstance(m, annotated_types.MaxLen):
                meta["max_length"] = m.max_length
            elif getattr(m, "pattern", None) is not None and set(vars(m)) == {"pattern"}:
                # pydantic's engine anchors `$` at the very end; Python's `re` (msgspec's) also
                # before a final newline: `\Z` is the end in both senses.
                meta["pattern"] = m.pattern[:-1] + r"\Z" if m.pattern.endswith("$") else m.pattern
            else:
                raise TypeError(f"no fast-path constraint for {m!r}")
        return meta


# A model's fields that may hold None, and (field, plan, in a list) for the models it holds.
_Plan = tuple[tuple[str, ...], tuple[tuple[str, Any, bool], ...]]


def _drop_none(doc: dict[str, Any], plan: _Plan) -> None:
    """Leave out the None values, as pydantic's `exclude_none` does: only where the plan says a
    field may be None, so a typical order takes a dozen dict operations, not a walk of it all."""
    optional, nested = plan
    for name in optional:
        if doc[name] is None:
            del doc[name]
    for name, sub, many in nested:
        value = doc.get(name)
        if value is None:
            continue
        if many:
            for item in value:
                _drop_none(item, sub)
        else:
            _drop_none(value, sub)


ORDER_FAST = FastSchema(OrderIn, incoherence)
