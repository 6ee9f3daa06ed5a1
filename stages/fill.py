"""Stage 4 `fill`: expand virtual bundles, fill tax rates (seed 001 订单填充).

"虚拟组套的填充、商品中心获取销项税等信息填充". A bundle line (line.bundle) is a
priced package of component goods. It is replaced by component lines:

* components come from the request (order.results["bundles"][str(line_no)],
  [{"sku", "qty", "weight"?}]) when it carried them, else from the product
  port's bundle_components(sku) as (sku, qty per bundle, weight);
* the bundle line's goods (qty x unit price) are spread over the components by
  weight to the cent (largest remainder). A component whose share does not
  divide by its unit count becomes two lines, at p and p + 1 cents, so
  qty x unit_price still adds up exactly: the order's goods never change;
* component lines take new line numbers after the highest one (other lines
  keep theirs: gift lines and results refer to them), bundle_of = the bundle's
  line number, and the bundle's warehouse, zone, supplier, dates and flags.

Then every line gets its tax rate from the product port. The expansion runs
once: results["fill"]["done"] makes a replay only refresh the tax rates.
"""
from __future__ import annotations

from typing import Any, Iterable

from oms_pipeline import flags
from oms_pipeline.order import Line, Order
from oms_pipeline.outcome import NEXT, Outcome, PermanentError
from oms_pipeline.stage import StageContext, StageSpec
from stages.allocate import largest_remainder  # the same to-the-cent rule allocate uses

__all__ = ["SPEC", "expand", "handle", "largest_remainder"]

# Amounts `allocate` may already have put on a line: spread with the goods.
ALLOCATED = ("discount", "coupon", "points", "freight", "payable")
# Flags that depend on which skus the order holds; components may turn them on.
SKU_FLAGS = ("bulky", "cross_border")

Component = tuple[str, int, int]  # (sku, qty per bundle, weight)


def _component(raw: Any, where: str) -> Component:
    if isinstance(raw, dict):
        sku, qty = raw.get("sku"), raw.get("qty", 1)
        weight = raw.get("weight", qty)  # no weight given: every unit weighs the same
    elif isinstance(raw, (list, tuple)) and len(raw) in (2, 3):
        sku, qty = raw[0], raw[1]
        weight = raw[2] if len(raw) == 3 else qty
    else:
        raise PermanentError(f"{where}: a component must be {{sku, qty, weight}}, got {raw!r}")
    if not isinstance(sku, str) or not sku:
        raise PermanentError(f"{where}: component sku must be a non-empty string, got {sku!r}")
    if not isinstance(qty, int) or isinstance(qty, bool) or qty < 1:
        raise PermanentError(f"{where}: component {sku} qty must be a positive integer, got {qty!r}")
    if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
        raise PermanentError(f"{where}: component {sku} weight must be an integer >= 0, got {weight!r}")
    return sku, qty, weight


async def _components(order: Order, line: Line, ctx: StageContext) -> list[Component]:
    where = f"bundle line {line.line_no} ({line.sku})"
    raw = order.results.get("bundles", {}).get(str(line.line_no))
    if not raw:  # the request did not carry them: ask the product centre
        raw = await ctx.ports.product.bundle_components(line.sku)
    components = [_component(item, where) for item in raw]
    if not components:
        raise PermanentError(f"{where}: the product centre knows no components")
    if sum(weight for _, _, weight in components) <= 0:
        raise PermanentError(f"{where}: component weights add up to 0")
    return components


def _priced(sku: str, units: int, share: int) -> list[tuple[str, int, int]]:
    """(sku, qty, unit price) lines worth exactly `share` cents for `units` units."""
    base, extra = divmod(share, units)
    return [(sku, qty, price) for qty, price in ((units - extra, base), (extra, base + 1)) if qty > 0]


def _spread_allocated(bundle: Line, lines: list[Line]) -> None:
    """Carry amounts already allocated to the bundle over to its components, to the cent."""
    weights = [line.goods for line in lines]
    if sum(weights) <= 0:
        weights = [line.qty for line in lines]
    for field in ALLOCATED:
        amount = getattr(bundle, field)
        if amount:
            for line, share in zip(lines, largest_remainder(amount, weights)):
                setattr(line, field, share)
    if bundle.payable and bundle.payable == _line_payable(bundle):
        for line in lines:  # keep each line's own sum exact, not only the total
            line.payable = _line_payable(line)


def _line_payable(line: Line) -> int:
    return line.goods - line.discount - line.coupon - line.points + line.freight


def expand(bundle: Line, components: list[Component], first_no: int) -> list[Line]:
    """The component lines replacing `bundle`, numbered from `first_no`; goods conserved exactly."""
    if bundle.qty < 1 or bundle.unit_price < 0:
        raise PermanentError(f"bundle line {bundle.line_no} ({bundle.sku}): qty {bundle.qty}, "
                             f"unit price {bundle.unit_price} cannot be expanded")
    shares = largest_remainder(bundle.goods, [weight for _, _, weight in components])
    priced = [part for (sku, per, _), share in zip(components, shares)
              for part in _priced(sku, bundle.qty * per, share)]
    lines = [Line(line_no=first_no + i, sku=sku, qty=qty, unit_price=price, warehouse=bundle.warehouse,
                  zone=bundle.zone, supplier=bundle.supplier, virtual=bundle.virtual,
                  bundle_of=bundle.line_no, gift_of=bundle.gift_of, delivery_date=bundle.delivery_date)
             for i, (sku, qty, price) in enumerate(priced)]
    _spread_allocated(bundle, lines)
    if sum(line.goods for line in lines) != bundle.goods:  # cannot happen; never let money drift
        raise PermanentError(f"bundle line {bundle.line_no}: components are worth "
                             f"{sum(line.goods for line in lines)}, the bundle {bundle.goods}")
    return lines


async def _expand_bundles(order: Order, ctx: StageContext) -> dict[str, list[int]]:
    """Replace bundle lines by their components (all or nothing); {bundle line no: component line nos}."""
    goods_before = order.goods
    next_no = max((line.line_no for line in order.lines), default=0) + 1
    lines: list[Line] = []
    expanded: dict[str, list[int]] = {}
    for line in order.lines:
        if not line.bundle:
            lines.append(line)
            continue
        parts = expand(line, await _components(order, line, ctx), next_no)
        next_no += len(parts)
        lines.extend(parts)
        expanded[str(line.line_no)] = [part.line_no for part in parts]
    goods_after = sum(line.goods for line in lines)
    if goods_after != goods_before:
        raise PermanentError(f"goods would change from {goods_before} to {goods_after}")
    order.lines = lines  # only now: a failed lookup above leaves the order untouched
    if expanded:
        _refresh_sku_flags(order)
    return expanded


def _refresh_sku_flags(order: Order) -> None:
    derived = flags.derive(order)
    for name in SKU_FLAGS:
        if flags.has(derived, name) and not flags.has(order.flags, name):
            order.flags = flags.set_flag(order.flags, name, flags.value(derived, name))


async def _fill_tax(lines: Iterable[Line], ctx: StageContext) -> None:
    rates: dict[str, int] = {}
    for line in lines:
        if line.sku not in rates:
            rates[line.sku] = await ctx.ports.product.tax_rate_bp(line.sku)
        line.tax_rate_bp = rates[line.sku]


async def handle(order: Order, ctx: StageContext) -> Outcome:
    done = order.results.get("fill")
    if not (isinstance(done, dict) and done.get("done")):
        expanded = await _expand_bundles(order, ctx)
        order.results["fill"] = {"done": True, "bundles": expanded}
    await _fill_tax(order.lines, ctx)
    return NEXT


SPEC = StageSpec(
    "fill", "io", handle,
    description="expand virtual bundles into priced component lines (to the cent); "
                "tax rate per sku from the product centre",
    defaults={},
)
