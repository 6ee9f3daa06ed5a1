"""Order flags (orderMark / SendPay, seed 004 "订单标识位").

A fixed-width string, one character per position: '0' means off, any other
character is the flag's value. Downstream systems (WMS sorting, carrier
choice, finance) read positions, so a position's meaning never changes once
published: new flags take a reserved position, old ones are never reused.
`FLAGS` is the single table that documents every position.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .order import Order

# Room to grow without widening the column downstream systems store.
WIDTH = 32
OFF = "0"

# Order goods total (cents) from which an order is "valuable" (贵品): secure
# packing, signature on delivery, insured carriage.
VALUABLE_GOODS = 500_000

# Until the product port carries item attributes, the SKU namespace marks them:
# BLK- large items (独立成箱 / 大件), CB- bonded cross-border goods.
BULKY_SKU_PREFIXES = ("BLK-",)
CROSS_BORDER_SKU_PREFIXES = ("CB-",)

_COLD = {"chilled_high": "1", "chilled_low": "1", "frozen_high": "2", "frozen_low": "2"}
_PROMISE = {"next_day": "1", "scheduled": "2"}


class FlagSpec(NamedTuple):
    position: int  # 1-based, as downstream specs count them
    name: str
    meaning: str
    values: dict[str, str]  # character -> what it means ('0' is always "off")


_ON = {"1": "yes"}

FLAGS: tuple[FlagSpec, ...] = (
    FlagSpec(1, "presale", "presale order: goods ship after stock arrives (预售)", _ON),
    FlagSpec(2, "cod", "cash on delivery: payment collected at delivery (货到付款)", _ON),
    FlagSpec(3, "virtual", "every line is virtual: virtual outbound, no warehouse (虚拟出库)", _ON),
    FlagSpec(4, "gift", "has gift lines attached to main lines (赠品)", _ON),
    FlagSpec(5, "o2o_pickup", "O2O self-pickup at a pickup point instead of delivery (自提)", _ON),
    FlagSpec(6, "bulky", "has bulky items that ship in their own box (大件 / 独立成箱)", _ON),
    FlagSpec(7, "valuable", f"goods total >= {VALUABLE_GOODS} cents (贵品)", _ON),
    FlagSpec(8, "reissue", "reissue order: re-ship without payment (补发)", _ON),
    FlagSpec(9, "exchange", "new-goods half of an exchange (换发)", _ON),
    FlagSpec(10, "cross_border", "has cross-border goods: customs declaration (跨境)", _ON),
    FlagSpec(11, "drop_ship", "has lines shipped by a supplier (产地直发 / 代发)", _ON),
    FlagSpec(12, "invoice", "customer asked for an invoice (开票)", _ON),
    FlagSpec(13, "pullback", "new order created by a pull-back (拉回生成新订单)", _ON),
    FlagSpec(14, "mixed_payment", "paid partly with balance/cards and partly online (组合支付)", _ON),
    FlagSpec(15, "third_party", "third-party platform order, settled periodically (第三方平台)", _ON),
    FlagSpec(16, "remark", "buyer left a remark: audit sends it to manual review (备注)", _ON),
    FlagSpec(17, "cold_chain", "has temperature-controlled lines (冷链)",
             {"1": "chilled", "2": "frozen (wins over chilled)"}),
    FlagSpec(18, "promise", "delivery promise other than standard (时效)",
             {"1": "next day", "2": "scheduled date"}),
)
# Positions 19..32 are reserved.

_BY_NAME = {spec.name: spec for spec in FLAGS}
_INDEX = {spec.name: spec.position - 1 for spec in FLAGS}


def _spec(name: str) -> FlagSpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown order flag {name!r}; known flags: {', '.join(_BY_NAME)}") from None


def _normalised(flags: str) -> str:
    # An empty or shorter string (not yet derived, or written before positions
    # were added) reads as all-off for the missing positions.
    if len(flags) > WIDTH:
        raise ValueError(f"order flags are {WIDTH} characters, got {len(flags)}: {flags!r}")
    return flags.ljust(WIDTH, OFF)


def blank() -> str:
    return OFF * WIDTH


def set_flag(flags: str, name: str, value: str = "1") -> str:
    """Return `flags` with `name` set to `value` ('0' turns it off)."""
    spec = _spec(name)
    if value != OFF and value not in spec.values:
        raise ValueError(f"flag {name!r} takes {sorted(spec.values)} or {OFF!r}, got {value!r}")
    flags = _normalised(flags)
    i = spec.position - 1
    return flags[:i] + value + flags[i + 1:]


def value(flags: str, name: str) -> str:
    i = _INDEX.get(name)
    if i is None:
        _spec(name)  # raises, naming the known flags
    # The stages read flags of every order at every stage: a full-width string is read as it is.
    return flags[i] if len(flags) == WIDTH else _normalised(flags)[i]


def has(flags: str, name: str) -> bool:
    return value(flags, name) != OFF


def describe(flags: str) -> dict[str, str]:
    """Name -> value of the flags that are set, in position order."""
    flags = _normalised(flags)
    return {s.name: flags[s.position - 1] for s in FLAGS if flags[s.position - 1] != OFF}


def names(flags: str) -> frozenset[str]:
    """The set flags' names: what the routing table matches on."""
    return frozenset(describe(flags))


def _derived_values(order: Order) -> dict[str, str | bool]:
    # The line facts in one pass over the lines (derive runs at intake and for every split child).
    lines = order.lines
    virtual, gift, bulky, cross_border, drop_ship, cold, goods = bool(lines), False, False, False, False, OFF, 0
    for line in lines:
        virtual = virtual and line.virtual
        gift = gift or line.gift_of is not None
        bulky = bulky or line.sku.startswith(BULKY_SKU_PREFIXES)
        cross_border = cross_border or line.sku.startswith(CROSS_BORDER_SKU_PREFIXES)
        drop_ship = drop_ship or bool(line.supplier)
        cold = max(cold, _COLD.get(line.zone, OFF))  # frozen needs the colder truck: it wins over chilled
        goods += line.qty * line.unit_price
    return {
        "presale": order.presale,
        "cod": order.payment_method == "cod",
        "virtual": virtual,
        "gift": gift,
        "o2o_pickup": bool(order.consignee.pickup_point),
        "bulky": bulky,
        "valuable": goods >= VALUABLE_GOODS,
        "reissue": order.kind == "reissue",
        "exchange": order.kind == "exchange",
        "cross_border": cross_border,
        "drop_ship": drop_ship,
        "invoice": bool(order.invoice_title),
        "pullback": order.kind == "pullback",
        "mixed_payment": order.payment_method == "mixed",
        "third_party": order.kind == "third_party",
        "remark": bool(order.remark.strip()),
        "cold_chain": cold,
        "promise": _PROMISE.get(order.delivery_promise, OFF),
    }


# derive() writes _derived_values() in order: FLAGS holds positions 1..N in order, and so does
# that dict (tests/test_flags.py checks both).
_RESERVED = OFF * (WIDTH - len(FLAGS))


def derive(order: Order) -> str:
    """The flag string for an order at intake, computed from its fields only."""
    return "".join([("1" if v else OFF) if v.__class__ is bool else v
                    for v in _derived_values(order).values()]) + _RESERVED


def markdown_table() -> str:
    """The flag table for the README: position, name, meaning, values."""
    rows = ["| Pos | Name | Meaning | Values (0 = off) |", "|---:|---|---|---|"]
    for s in FLAGS:
        values = ", ".join(f"`{c}` {m}" for c, m in s.values.items())
        rows.append(f"| {s.position} | `{s.name}` | {s.meaning} | {values} |")
    rows.append(f"| {len(FLAGS) + 1}-{WIDTH} | | reserved | |")
    return "\n".join(rows)
