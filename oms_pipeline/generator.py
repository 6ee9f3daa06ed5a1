"""A seeded generator of order requests, and the request -> Order conversion.

`generate` yields what upstream systems post to intake (JSON-able dicts, no
order numbers: those are assigned at intake), with a realistic, deterministic
mix of kinds, payment methods, zones, warehouses and special cases. The same
seed gives the same requests, so tests, demos and benchmark runs replay.
Gift lines are never generated: the `gifts` stage adds them.
"""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import msgspec

from . import flags
from .order import Address, Amounts, Line, Order

WAREHOUSES = ("WH-BJ", "WH-SH", "WH-GZ", "WH-CD")

# Province -> (cities, nearest warehouse). Each city gets two districts below.
PROVINCES: dict[str, tuple[tuple[str, ...], str]] = {
    "北京市": (("北京市",), "WH-BJ"),
    "天津市": (("天津市",), "WH-BJ"),
    "河北省": (("石家庄市", "唐山市", "保定市"), "WH-BJ"),
    "山东省": (("济南市", "青岛市", "烟台市"), "WH-BJ"),
    "上海市": (("上海市",), "WH-SH"),
    "江苏省": (("南京市", "苏州市", "无锡市"), "WH-SH"),
    "浙江省": (("杭州市", "宁波市", "温州市"), "WH-SH"),
    "广东省": (("广州市", "深圳市", "东莞市"), "WH-GZ"),
    "福建省": (("福州市", "厦门市"), "WH-GZ"),
    "四川省": (("成都市", "绵阳市"), "WH-CD"),
    "重庆市": (("重庆市",), "WH-CD"),
}
DISTRICTS = ("中心区", "新区")
STREETS = ("人民路", "建设路", "解放路", "中山路", "和平街", "科技大道")
SURNAMES = ("王", "李", "张", "刘", "陈", "杨", "赵", "黄", "周", "吴")
GIVEN_NAMES = ("伟", "芳", "娜", "敏", "静", "磊", "洋", "艳", "军", "杰", "婷", "强")
COMPANIES = ("北京星河科技有限公司", "上海云帆贸易有限公司", "广州南粤食品有限公司",
             "成都天府餐饮管理有限公司", "杭州西湖文化传媒有限公司")
REMARKS = ("请尽快发货", "周末送货", "放门卫室", "不要辣", "送货前请电话联系", "包装结实一点")
SUPPLIERS = ("SUP-01", "SUP-02", "SUP-03", "SUP-04")
GIFT_CARDS = ((10000, "GC-0100"), (20000, "GC-0200"), (50000, "GC-0500"))

# Overall targets (fractions of all orders, or of lines for drop-ship).
KIND_WEIGHTS = {"toc": 80, "third_party": 8, "tob": 4, "reissue": 3, "exchange": 3, "pullback": 2}
TOC_SOURCES = ("app", "app", "app", "web", "mini", "mini", "gift_exchange")
P_VIRTUAL_ONLY, P_COD, P_PICKUP, P_PRESALE = 0.03, 0.05, 0.05, 0.03
P_REMARK, P_INVOICE, P_DROP_SHIP_LINE, P_BUNDLE_LINE = 0.03, 0.20, 0.05, 0.05
TOC_SHARE = KIND_WEIGHTS["toc"] / sum(KIND_WEIGHTS.values())
TOB_SHARE = KIND_WEIGHTS["tob"] / sum(KIND_WEIGHTS.values())
# Only ToC physical orders can be COD, picked up or presale; scale so the overall rate holds.
TOC_PHYSICAL_SHARE = TOC_SHARE - P_VIRTUAL_ONLY
ZONE_WEIGHTS = {"ambient": 70, "chilled_high": 10, "chilled_low": 8, "frozen_high": 6,
                "frozen_low": 6}


def _catalogue() -> list[dict[str, Any]]:
    # Fixed for every seed (its own RNG), so a SKU always means the same product.
    rng = random.Random(20240601)
    zones, weights = list(ZONE_WEIGHTS), list(ZONE_WEIGHTS.values())
    products = []
    for i in range(600):
        prefix = "BLK-" if i % 40 == 7 else "CB-" if i % 30 == 11 else "SKU-"
        price = int(10 ** rng.uniform(2.3, 5.0))  # ~2 to 1000 yuan, log-uniform
        if i % 50 == 3:
            price = rng.randrange(300_000, 1_200_000)  # phones, laptops: valuable
        zone = "ambient" if prefix != "SKU-" else rng.choices(zones, weights)[0]
        products.append({"sku": f"{prefix}{i:06d}", "unit_price": price, "zone": zone})
    return products


CATALOGUE = _catalogue()


# Delivery dates are business dates (China, UTC+8), the way effective_time and gifts read them.
BUSINESS_TZ = timezone(timedelta(hours=8))


def _iso_date(ts: float) -> str:
    return datetime.fromtimestamp(ts, BUSINESS_TZ).date().isoformat()


class _Draw:
    """The random choices for one order, kept in one place so the mix is readable."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def kind(self) -> str:
        return self.rng.choices(list(KIND_WEIGHTS), list(KIND_WEIGHTS.values()))[0]

    def source(self, kind: str) -> str:
        if kind == "toc":
            return self.rng.choice(TOC_SOURCES)
        return {"tob": "sales_plan", "third_party": "platform"}.get(kind, "service")

    def consignee(self, pickup: bool) -> tuple[dict[str, Any], str]:
        rng = self.rng
        province = rng.choice(list(PROVINCES))
        cities, warehouse = PROVINCES[province]
        city = rng.choice(cities)
        address = {
            "name": rng.choice(SURNAMES) + "".join(rng.choices(GIVEN_NAMES, k=rng.randint(1, 2))),
            "phone": f"1{rng.choice('35789')}{rng.randrange(10**9):09d}",
            "province": province, "city": city, "district": city[:-1] + rng.choice(DISTRICTS),
            "detail": f"{rng.choice(STREETS)}{rng.randint(1, 999)}号",
            "pickup_point": f"PP-{warehouse[3:]}-{rng.randint(1, 40):02d}" if pickup else None,
        }
        return address, warehouse


def _physical_line(d: _Draw, kind: str, home: str) -> dict[str, Any]:
    rng = d.rng
    product = rng.choice(CATALOGUE)
    qty = rng.randint(10, 200) if kind == "tob" else rng.choices((1, 2, 3, 5), (70, 18, 8, 4))[0]
    line = {"sku": product["sku"], "qty": qty, "unit_price": product["unit_price"],
            "warehouse": home if d.chance(0.85) else rng.choice(WAREHOUSES),
            "zone": product["zone"], "supplier": "", "virtual": False, "bundle": False}
    if d.chance(P_DROP_SHIP_LINE):  # the supplier ships it from origin (产地直发)
        line.update(supplier=rng.choice(SUPPLIERS), warehouse="")
    elif product["sku"].startswith("SKU-") and d.chance(P_BUNDLE_LINE):
        _make_bundle(d, line)
    return line


def _make_bundle(d: _Draw, line: dict[str, Any]) -> None:
    # A virtual bundle: one priced line, expanded into components by `fill`.
    parts = d.rng.sample(CATALOGUE, d.rng.randint(2, 3))
    line.update(sku="BDL-" + line["sku"][4:], bundle=True, zone="ambient",
                components=[{"sku": p["sku"], "qty": d.rng.randint(1, 2)} for p in parts])


def _gift_card_lines(d: _Draw) -> list[dict[str, Any]]:
    price, sku = d.rng.choice(GIFT_CARDS)
    return [{"sku": sku, "qty": d.rng.randint(1, 3), "unit_price": price, "warehouse": "",
             "zone": "ambient", "supplier": "", "virtual": True, "bundle": False}]


def _amounts(d: _Draw, kind: str, goods: int, ships: bool) -> dict[str, int]:
    rng = d.rng
    if kind in ("reissue", "exchange", "pullback"):
        # Service orders re-ship goods at list price, fully discounted: nothing to pay.
        return {"discount": goods, "coupon": 0, "points": 0, "freight": 0}
    discount = goods * rng.randint(5, 20) // 100 if d.chance(0.3) else 0
    coupon = rng.choice((500, 1000, 2000, 5000)) if kind == "toc" and d.chance(0.2) else 0
    points = rng.randrange(100, 2000) if kind == "toc" and d.chance(0.1) else 0
    freight = rng.choice((600, 800, 1200)) if ships and goods < 9900 else 0
    # Deductions apply to the goods, never to the freight: the shop front caps
    # the coupon and the points at what the goods leave after the discount.
    coupon = min(coupon, goods - discount)
    points = min(points, goods - discount - coupon)
    return {"discount": discount, "coupon": coupon, "points": points, "freight": freight}


def _dated_lines(d: _Draw, lines: list[dict[str, Any]], placed_at: float,
                 days: tuple[int, int]) -> None:
    for line in lines:
        line["delivery_date"] = _iso_date(placed_at + 86400 * d.rng.randint(*days))


def _payment_method(d: _Draw, kind: str, virtual: bool) -> str:
    if kind != "toc":
        return "none"  # ToB and platform orders settle on account; service orders are free
    if not virtual and d.chance(P_COD / TOC_PHYSICAL_SHARE):
        return "cod"
    return "mixed" if d.chance(0.1) else "online"


def _invoice_title(d: _Draw, kind: str) -> str | None:
    if kind == "tob":
        return d.rng.choice(COMPANIES)  # companies always want the VAT invoice
    if d.chance((P_INVOICE - TOB_SHARE) / (1 - TOB_SHARE)):
        return "个人" if d.chance(0.6) else d.rng.choice(COMPANIES)
    return None


def _request(d: _Draw, seed: int, i: int, placed_at: float) -> dict[str, Any]:
    rng = d.rng
    kind = d.kind()
    virtual = kind == "toc" and d.chance(P_VIRTUAL_ONLY / TOC_SHARE)
    pickup = kind == "toc" and not virtual and d.chance(P_PICKUP / TOC_PHYSICAL_SHARE)
    consignee, home = d.consignee(pickup)
    lines = _gift_card_lines(d) if virtual else [
        _physical_line(d, kind, home) for _ in range(rng.choices(range(1, 7), (40, 25, 15, 10, 6, 4))[0])]
    presale = kind == "toc" and not virtual and d.chance(P_PRESALE / TOC_PHYSICAL_SHARE)
    promise = "standard" if virtual else rng.choices(("standard", "next_day", "scheduled"), (80, 15, 5))[0]
    if presale or promise == "scheduled":
        _dated_lines(d, lines, placed_at, (10, 30) if presale else (2, 6))
    goods = sum(line["qty"] * line["unit_price"] for line in lines)
    source = d.source(kind)
    return {
        "source": source, "external_id": f"{source}-{seed}-{i:08d}", "kind": kind,
        "member_id": f"{'B' if kind == 'tob' else 'M'}{rng.randrange(200_000):08d}",
        "consignee": consignee, "lines": lines,
        "amounts": _amounts(d, kind, goods, ships=not (virtual or pickup)),
        "payment_method": _payment_method(d, kind, virtual),
        "remark": rng.choice(REMARKS) if d.chance(P_REMARK) else "",
        "invoice_title": _invoice_title(d, kind), "delivery_promise": promise,
        "presale": presale, "placed_at": round(placed_at, 3),
    }


def generate(n: int, seed: int, *, start_at: float = 1_700_000_000.0) -> Iterator[dict[str, Any]]:
    """n order requests; the same seed yields the same requests, in order."""
    d = _Draw(random.Random(seed))
    placed_at = start_at
    for i in range(n):
        yield _request(d, seed, i, placed_at)
        placed_at += d.rng.expovariate(2.0)  # ~2 orders a second, Poisson arrivals


def settle_amounts(goods: int, discount: int, coupon: int, points: int, freight: int) -> Amounts:
    """Order amounts with payable = goods - discount - coupon - points + freight >= 0.

    Over-deduction shrinks the discount first (it is ours to give), then the
    coupon, then points, so the customer never gets more off than was due.
    """
    excess = max(0, discount + coupon + points - goods - freight)
    reduced = []
    for amount in (discount, coupon, points):
        cut = min(amount, excess)
        reduced.append(amount - cut)
        excess -= cut
    discount, coupon, points = reduced
    return Amounts(discount=discount, coupon=coupon, points=points, freight=freight,
                   payable=goods - discount - coupon - points + freight)


def _lines(request: dict[str, Any]) -> list[Line]:
    # A request line's keys that are no Line field (components, ...) are left out by convert.
    return [msgspec.convert({**raw, "line_no": no}, Line) for no, raw in enumerate(request["lines"], start=1)]


def _bundles(request: dict[str, Any]) -> dict[str, Any]:
    # Components travel with the order until `fill` expands the bundle lines.
    found = {str(no): raw["components"] for no, raw in enumerate(request["lines"], start=1)
             if raw.get("bundle") and raw.get("components")}
    return {"bundles": found} if found else {}


def to_order(request: dict[str, Any], order_no: str, now: float) -> Order:
    """The Order intake creates from a request: amounts settled, flags derived."""
    lines = _lines(request)
    req_amounts = request.get("amounts", {})
    amounts = settle_amounts(sum(line.goods for line in lines),
                             *(int(req_amounts.get(k, 0)) for k in ("discount", "coupon", "points", "freight")))
    order = Order(
        order_no=order_no, source=request["source"], external_id=request["external_id"],
        kind=request["kind"], member_id=request["member_id"],
        consignee=msgspec.convert(request["consignee"], Address), lines=lines, amounts=amounts,
        payment_method=request.get("payment_method", "online"), remark=request.get("remark", ""),
        invoice_title=request.get("invoice_title"),
        delivery_promise=request.get("delivery_promise", "standard"),
        presale=bool(request.get("presale", False)), status="CREATED", created_at=now,
        results=_bundles(request),
    )
    order.flags = flags.derive(order)
    return order
