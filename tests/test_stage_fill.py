"""Stage fill: bundles become priced component lines (to the cent), every line gets its tax rate."""
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, strategies as st

from oms_pipeline import flags, generator
from oms_pipeline.adapters.simulated import EffectLog
from oms_pipeline.order import Address, Amounts, Line, Order
from oms_pipeline.outcome import PermanentError, TransientError
from oms_pipeline.stage import StageContext
from tests.support.stages import stage_context
from stages.fill import SPEC, expand, handle, largest_remainder



async def make_ctx(sim: dict[str, Any] | None = None) -> tuple[StageContext, EffectLog]:
    return await stage_context(SPEC, None, sim)


def order(lines: list[Line], bundles: dict[str, Any] | None = None) -> Order:
    o = Order(order_no="O600", source="app", external_id="e6", kind="toc", member_id="M1",
              consignee=Address(name="Li", phone="13812345678", province="北京市", city="北京市"),
              lines=lines, amounts=Amounts(payable=sum(line.goods for line in lines)),
              results={"bundles": bundles} if bundles else {})
    o.flags = flags.derive(o)
    return o


def bundle_line(no: int = 2, sku: str = "BDL-1", qty: int = 2, price: int = 5879, **kw: Any) -> Line:
    return Line(line_no=no, sku=sku, qty=qty, unit_price=price, warehouse="WH-SH", zone="chilled_high",
                bundle=True, **kw)


def plain(no: int = 1) -> Line:
    return Line(line_no=no, sku="SKU-A", qty=1, unit_price=999, warehouse="WH-SH")
REQUEST_COMPONENTS = {"2": [{"sku": "X", "qty": 1}, {"sku": "Y", "qty": 2}, {"sku": "Z", "qty": 1}]}


def view(o: Order) -> list[tuple]:
    return [(line.line_no, line.sku, line.qty, line.unit_price, line.bundle_of) for line in o.lines]


# -- largest remainder ---------------------------------------------------------------

def test_largest_remainder_examples() -> None:
    assert largest_remainder(100, [1, 1, 1]) == [34, 33, 33]
    assert largest_remainder(11758, [1, 2, 1]) == [2940, 5879, 2939]
    assert largest_remainder(10, [0, 3, 7]) == [0, 3, 7]
    assert largest_remainder(0, [5, 5]) == [0, 0]
    with pytest.raises(ValueError):
        largest_remainder(10, [0, 0])
    with pytest.raises(ValueError):
        largest_remainder(-1, [1])


@given(st.integers(0, 10**9), st.lists(st.integers(0, 1000), min_size=1, max_size=8).filter(lambda w: sum(w) > 0))
def test_largest_remainder_is_exact_and_fair(total: int, weights: list[int]) -> None:
    shares = largest_remainder(total, weights)
    assert sum(shares) == total
    for share, w in zip(shares, weights):
        assert abs(share * sum(weights) - total * w) < sum(weights)  # within one cent of the quota


# -- expansion ---------------------------------------------------------------------

@pytest.mark.anyio
async def test_request_components_expand_to_the_cent() -> None:
    ctx, log = await make_ctx()
    o = order([plain(), bundle_line()], REQUEST_COMPONENTS)
    goods = o.goods
    assert (await handle(o, ctx)).kind == "next"
    # 2 bundles x 5879 = 11758 spread 1:2:1 (weight = qty when the request gives none):
    # X 2940 for 2 units, Y 5879 for 4 units (1469 + 3 x 1470), Z 2939 for 2 units (1469 + 1470).
    assert view(o) == [(1, "SKU-A", 1, 999, None), (3, "X", 2, 1470, 2), (4, "Y", 1, 1469, 2),
                       (5, "Y", 3, 1470, 2), (6, "Z", 1, 1469, 2), (7, "Z", 1, 1470, 2)]
    assert o.goods == goods
    assert o.results["fill"] == {"done": True, "bundles": {"2": [3, 4, 5, 6, 7]}}
    assert not any(line.bundle for line in o.lines)
    for line in o.lines[1:]:
        assert (line.warehouse, line.zone, line.supplier) == ("WH-SH", "chilled_high", "")
    assert log.count() == 0  # fill only reads


@pytest.mark.anyio
async def test_request_weights_are_used_when_given() -> None:
    ctx, _ = await make_ctx()
    o = order([bundle_line(qty=1, price=1000)],
              {"2": [{"sku": "X", "qty": 1, "weight": 3}, {"sku": "Y", "qty": 1, "weight": 1}]})
    await handle(o, ctx)
    assert view(o) == [(3, "X", 1, 750, 2), (4, "Y", 1, 250, 2)]


@pytest.mark.anyio
async def test_the_product_centre_supplies_components_the_request_did_not_carry() -> None:
    ctx, _ = await make_ctx({"product": {"bundles": {"BDL-1": [["P", 1, 1], ["Q", 3, 2]]}}})
    o = order([plain(), bundle_line(qty=1, price=1000, supplier="SUP-01")])
    await handle(o, ctx)
    # 1000 spread 1:2 -> 333 for P, 667 for Q's 3 units (2 x 222 + 223)
    assert view(o) == [(1, "SKU-A", 1, 999, None), (3, "P", 1, 333, 2), (4, "Q", 2, 222, 2), (5, "Q", 1, 223, 2)]
    assert all(line.supplier == "SUP-01" for line in o.lines[1:])


@pytest.mark.anyio
async def test_the_request_list_wins_over_the_product_centre() -> None:
    ctx, _ = await make_ctx({"product": {"bundles": {"BDL-1": [["P", 1, 1]]}}})
    o = order([plain(), bundle_line()], REQUEST_COMPONENTS)
    await handle(o, ctx)
    assert {line.sku for line in o.lines} == {"SKU-A", "X", "Y", "Z"}


@pytest.mark.anyio
async def test_several_bundles_get_consecutive_new_numbers_in_line_order() -> None:
    ctx, _ = await make_ctx({"product": {"bundles": {"B1": [["P", 1, 1], ["Q", 1, 1]], "B2": [["R", 1, 1]]}}})
    o = order([bundle_line(1, "B1", 1, 101), plain(3), bundle_line(5, "B2", 1, 50)])
    await handle(o, ctx)
    assert view(o) == [(6, "P", 1, 51, 1), (7, "Q", 1, 50, 1), (3, "SKU-A", 1, 999, None), (8, "R", 1, 50, 5)]
    assert o.results["fill"]["bundles"] == {"1": [6, 7], "5": [8]}


@pytest.mark.anyio
async def test_components_keep_dates_gift_links_and_virtual() -> None:
    ctx, _ = await make_ctx({"product": {"bundles": {"BDL-1": [["P", 1, 1]]}}})
    o = order([plain(), bundle_line(qty=1, price=10, gift_of=1, delivery_date="2024-06-01", virtual=True)])
    await handle(o, ctx)
    component = o.lines[1]
    assert (component.gift_of, component.delivery_date, component.virtual) == (1, "2024-06-01", True)


@pytest.mark.anyio
async def test_a_zero_weight_component_is_free() -> None:
    ctx, _ = await make_ctx({"product": {"bundles": {}}})
    o = order([bundle_line(qty=1, price=500)], {"2": [["P", 1, 1], ["FREEBIE", 1, 0]]})
    await handle(o, ctx)
    assert view(o) == [(3, "P", 1, 500, 2), (4, "FREEBIE", 1, 0, 2)]


def test_amounts_already_allocated_to_a_bundle_follow_its_components() -> None:
    b = bundle_line(qty=1, price=1000, discount=101, coupon=3, freight=7, payable=903)
    parts = expand(b, [("P", 1, 1), ("Q", 1, 3)], 10)
    assert [(p.goods, p.discount, p.coupon, p.freight, p.payable) for p in parts] == [
        (250, 25, 1, 2, 226), (750, 76, 2, 5, 677)]
    assert sum(p.payable for p in parts) == 903
    # A payable that is not the sum of the parts (set by hand) is still spread to the cent.
    odd = expand(bundle_line(qty=1, price=1000, payable=901), [("P", 1, 1), ("Q", 1, 3)], 10)
    assert [p.payable for p in odd] == [225, 676]


@pytest.mark.anyio
async def test_components_can_turn_on_sku_flags() -> None:
    ctx, _ = await make_ctx()
    o = order([plain(), bundle_line()], {"2": [{"sku": "CB-000011", "qty": 1}, {"sku": "BLK-000007", "qty": 1}]})
    assert not flags.has(o.flags, "cross_border") and not flags.has(o.flags, "bulky")
    await handle(o, ctx)
    assert flags.has(o.flags, "cross_border") and flags.has(o.flags, "bulky")


# -- bad bundles -------------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("sim, bundles, message", [
    ({"product": {"bundles": {"BDL-1": []}}}, None, "knows no components"),
    ({"product": {"generate_bundles": False}}, None, "knows no components"),
    ({}, {"2": [["P", 1, 0], ["Q", 1, 0]]}, "weights add up to 0"),
    ({}, {"2": [{"sku": "P", "qty": 0}]}, "qty must be a positive integer"),
    ({}, {"2": [{"sku": "", "qty": 1}]}, "sku must be a non-empty string"),
    ({}, {"2": ["P"]}, "a component must be"),
])
async def test_a_bundle_that_cannot_be_expanded_is_permanent(sim: dict, bundles: dict | None, message: str) -> None:
    ctx, _ = await make_ctx(sim)
    o = order([plain(), bundle_line()], bundles)
    before = view(o)
    with pytest.raises(PermanentError, match=message):
        await handle(o, ctx)
    assert view(o) == before and "fill" not in o.results


@pytest.mark.anyio
async def test_a_product_outage_during_expansion_leaves_the_order_untouched() -> None:
    ctx, _ = await make_ctx({"failure_rate": {"product": 1.0}})
    o = order([plain(), bundle_line()])
    before = view(o)
    with pytest.raises(TransientError):
        await handle(o, ctx)
    assert view(o) == before and "fill" not in o.results


# -- tax and idempotency ----------------------------------------------------------------------

@pytest.mark.anyio
async def test_every_line_gets_its_tax_rate() -> None:
    ctx, _ = await make_ctx({"product": {"tax_rates": {"X": 900, "SKU-A": 600}}})
    o = order([plain(), bundle_line()], REQUEST_COMPONENTS)
    await handle(o, ctx)
    assert {line.sku: line.tax_rate_bp for line in o.lines} == {"SKU-A": 600, "X": 900, "Y": 1300, "Z": 1300}


@pytest.mark.anyio
async def test_an_order_without_bundles_only_gets_tax() -> None:
    ctx, _ = await make_ctx()
    o = order([plain()])
    await handle(o, ctx)
    assert view(o) == [(1, "SKU-A", 1, 999, None)] and o.lines[0].tax_rate_bp == 1300
    assert o.results["fill"] == {"done": True, "bundles": {}}


@pytest.mark.anyio
async def test_a_second_run_does_not_expand_again_but_refreshes_tax() -> None:
    ctx, _ = await make_ctx()
    o = order([plain(), bundle_line()], REQUEST_COMPONENTS)
    await handle(o, ctx)
    expanded = view(o)
    ctx2, _ = await make_ctx({"product": {"default_tax_rate_bp": 900}})
    assert (await handle(o, ctx2)).kind == "next"
    assert view(o) == expanded
    assert {line.tax_rate_bp for line in o.lines} == {900}


@pytest.mark.anyio
async def test_a_tax_outage_after_expansion_retries_only_the_tax() -> None:
    failing, _ = await make_ctx({"failure_rate": {"product": 1.0}})
    o = order([plain(), bundle_line()], REQUEST_COMPONENTS)  # components from the request: no product call
    with pytest.raises(TransientError):
        await handle(o, failing)
    assert o.results["fill"]["done"] is True
    expanded = view(o)
    ctx, _ = await make_ctx()
    await handle(o, ctx)
    assert view(o) == expanded and all(line.tax_rate_bp == 1300 for line in o.lines)


@pytest.mark.anyio
async def test_generated_orders_keep_their_goods_to_the_cent() -> None:
    ctx, _ = await make_ctx()
    bundles = 0
    for i, request in enumerate(generator.generate(500, seed=21)):
        o = generator.to_order(request, f"G{i:05d}", 0.0)
        before, numbers = o.goods, {line.line_no for line in o.lines if not line.bundle}
        had = [line.line_no for line in o.lines if line.bundle]
        await handle(o, ctx)
        bundles += len(had)
        assert o.goods == before
        assert not any(line.bundle for line in o.lines)
        assert numbers <= {line.line_no for line in o.lines}
        assert len({line.line_no for line in o.lines}) == len(o.lines)
        for no in had:
            parts = [line for line in o.lines if line.bundle_of == no]
            component_skus = {c["sku"] for c in o.results["bundles"][str(no)]}
            assert parts and {p.sku for p in parts} == component_skus
        assert all(line.tax_rate_bp == 1300 for line in o.lines)
    assert bundles > 10
