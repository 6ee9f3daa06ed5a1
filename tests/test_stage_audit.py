"""Stage audit: black/white lists, fraud score, orders per hour, regions, remarks."""
from __future__ import annotations

from typing import Any

import pytest

from oms_pipeline import generator
from oms_pipeline.adapters.simulated import EffectLog
from oms_pipeline.clock import VirtualClock
from oms_pipeline.order import Address, Amounts, Line, Order
from oms_pipeline.outcome import TransientError
from oms_pipeline.stage import StageContext
from tests.support.stages import stage_context
from stages.audit import SPEC, handle

CLEAN = {"risk": {"base_max": 1}}  # every score 0 unless a test raises it



async def make_ctx(settings: dict[str, Any] | None = None, sim: dict[str, Any] | None = None,
                   clock: VirtualClock | None = None) -> tuple[StageContext, EffectLog]:
    return await stage_context(SPEC, settings, CLEAN if sim is None else sim, clock)


def order(no: str = "O500", *, member: str = "M1", phone: str = "13812345678", remark: str = "",
          payable: int = 5000, province: str = "北京市", city: str = "北京市") -> Order:
    return Order(order_no=no, source="app", external_id=f"e-{no}", kind="toc", member_id=member,
                 consignee=Address(name="Li", phone=phone, province=province, city=city),
                 lines=[Line(line_no=1, sku="A", qty=1, unit_price=payable)],
                 amounts=Amounts(payable=payable, paid=payable), remark=remark)


async def counted(ctx: StageContext, who: str, ident: str) -> int:
    return await ctx.coordination.count(f"audit:{who}:{ident}:{int(ctx.now() // 3600)}")


@pytest.mark.anyio
async def test_a_clean_order_passes_with_its_score() -> None:
    ctx, log = await make_ctx()
    o = order()
    assert (await handle(o, ctx)).kind == "next"
    assert o.results["audit"] == {"score": 0}
    assert await counted(ctx, "member", "M1") == 1 and await counted(ctx, "phone", "13812345678") == 1
    assert log.count() == 0  # audit reads and counts; it books nothing downstream


# -- lists ----------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("settings, reason", [
    ({"blacklist_members": ["M1"]}, "audit: member is on the black list"),
    ({"blacklist_phones": ["13812345678"]}, "audit: phone is on the black list"),
    ({"blacklist_members": ["M1"], "whitelist_members": ["M1"]}, "audit: member is on the black list"),
])
async def test_black_list_cancels_before_anything_is_counted(settings: dict, reason: str) -> None:
    ctx, _ = await make_ctx(settings)
    outcome = await handle(order(), ctx)
    assert (outcome.kind, outcome.reason) == ("cancel", reason)
    assert await counted(ctx, "member", "M1") == 0


@pytest.mark.anyio
@pytest.mark.parametrize("settings, listed", [
    ({"whitelist_members": ["M1"]}, "member"), ({"whitelist_phones": ["13812345678"]}, "phone")])
async def test_white_list_skips_score_and_frequency(settings: dict, listed: str) -> None:
    # Known cheat by the risk port and a limit of 0 orders an hour: the white list still passes.
    ctx, _ = await make_ctx({**settings, "max_orders_per_hour": 0}, {"risk": {"cheat_members": ["M1"]}})
    o = order()
    assert (await handle(o, ctx)).kind == "next"
    assert o.results["audit"] == {"score": None, "whitelisted": listed}
    assert await counted(ctx, "member", "M1") == 0


@pytest.mark.anyio
async def test_white_listed_orders_with_a_remark_still_go_to_review() -> None:
    ctx, _ = await make_ctx({"whitelist_members": ["M1"]})
    assert (await handle(order(remark="周末送货"), ctx)).kind == "manual"


# -- fraud score ---------------------------------------------------------------

@pytest.mark.anyio
async def test_a_known_cheat_is_cancelled() -> None:
    ctx, _ = await make_ctx(sim={"risk": {"cheat_phones": ["13812345678"]}})
    o = order()
    outcome = await handle(o, ctx)
    assert (outcome.kind, outcome.reason) == ("cancel", "audit: fraud score 100")
    assert o.results["audit"] == {"score": 100}
    assert await counted(ctx, "member", "M1") == 0


def scored(points: int) -> dict[str, Any]:
    """Simulated risk that scores exactly `points` for the test order."""
    return {"risk": {"base_max": 1, "large_amount_cents": 1, "large_amount_points": points}}


@pytest.mark.anyio
@pytest.mark.parametrize("score, kind", [(69, "next"), (70, "manual"), (89, "manual"), (90, "cancel"), (99, "cancel")])
async def test_score_thresholds(score: int, kind: str) -> None:
    ctx, _ = await make_ctx(sim=scored(score))
    o = order()
    outcome = await handle(o, ctx)
    assert outcome.kind == kind
    assert o.results["audit"]["score"] == score
    if kind == "manual":
        assert outcome.reason == f"audit: fraud score {score} needs review"
    if kind == "cancel":
        assert outcome.reason == f"audit: fraud score {score}"


@pytest.mark.anyio
async def test_thresholds_come_from_settings() -> None:
    ctx, _ = await make_ctx({"cheat_threshold": 50, "review_threshold": 20}, sim=scored(30))
    assert (await handle(order("O1"), ctx)).kind == "manual"
    ctx, _ = await make_ctx({"cheat_threshold": 50, "review_threshold": 20}, sim=scored(50))
    assert (await handle(order("O2"), ctx)).kind == "cancel"


@pytest.mark.anyio
async def test_an_operator_review_passes_the_review_band_but_never_a_cheat() -> None:
    ctx, _ = await make_ctx(sim=scored(75))
    o = order()
    assert (await handle(o, ctx)).kind == "manual"
    o.results["audit_reviewed"] = True
    assert (await handle(o, ctx)).kind == "next"
    ctx, _ = await make_ctx(sim=scored(95))
    o = order()
    o.results["audit_reviewed"] = True
    assert (await handle(o, ctx)).kind == "cancel"


@pytest.mark.anyio
async def test_a_risk_outage_propagates_and_counts_nothing() -> None:
    ctx, _ = await make_ctx(sim={"failure_rate": {"risk": 1.0}})
    o = order()
    with pytest.raises(TransientError):
        await handle(o, ctx)
    assert await counted(ctx, "member", "M1") == 0 and "audit_counted" not in o.results


# -- frequency -------------------------------------------------------------------

@pytest.mark.anyio
async def test_more_than_n_orders_per_member_an_hour_go_to_review() -> None:
    ctx, _ = await make_ctx({"max_orders_per_hour": 3})
    outcomes = [await handle(order(f"O{i}", phone=f"1380000000{i}"), ctx) for i in range(5)]
    assert [o.kind for o in outcomes] == ["next"] * 3 + ["manual"] * 2
    assert outcomes[3].reason == "audit: member placed more than 3 orders this hour"
    assert await counted(ctx, "member", "M1") == 3  # refused orders are not counted


@pytest.mark.anyio
async def test_more_than_n_orders_per_phone_an_hour_go_to_review() -> None:
    ctx, _ = await make_ctx({"max_orders_per_hour": 2})
    outcomes = [await handle(order(f"O{i}", member=f"M{i}"), ctx) for i in range(3)]
    assert [o.kind for o in outcomes] == ["next", "next", "manual"]
    assert outcomes[2].reason == "audit: phone placed more than 2 orders this hour"


@pytest.mark.anyio
async def test_the_count_starts_again_in_the_next_hour() -> None:
    clock = VirtualClock(start=3600 * 1000 + 3500)  # 100 s before an hour boundary
    ctx, _ = await make_ctx({"max_orders_per_hour": 1}, clock=clock)
    assert (await handle(order("O1"), ctx)).kind == "next"
    assert (await handle(order("O2"), ctx)).kind == "manual"
    clock.advance(100)
    assert (await handle(order("O3"), ctx)).kind == "next"


@pytest.mark.anyio
async def test_default_limit_is_20_an_hour() -> None:
    ctx, _ = await make_ctx()
    kinds = [(await handle(order(f"O{i}", phone=f"139{i:08d}"), ctx)).kind for i in range(21)]
    assert kinds == ["next"] * 20 + ["manual"]


@pytest.mark.anyio
async def test_replaying_an_order_counts_it_once() -> None:
    ctx, _ = await make_ctx({"max_orders_per_hour": 2})
    o = order("O1")
    for _ in range(3):
        assert (await handle(o, ctx)).kind == "next"
    assert await counted(ctx, "member", "M1") == 1
    assert await counted(ctx, "phone", "13812345678") == 1
    assert o.results["audit_counted"] == {"member": True, "phone": True}
    # The member still has one order left this hour.
    assert (await handle(order("O2"), ctx)).kind == "next"
    assert (await handle(order("O3"), ctx)).kind == "manual"


@pytest.mark.anyio
async def test_the_children_of_a_split_order_count_as_the_one_order_the_member_placed() -> None:
    ctx, _ = await make_ctx({"max_orders_per_hour": 2})
    children = [order(f"O1-{i}") for i in (1, 2, 3)]
    for child in children:
        child.parent_no = "O1"
    assert [(await handle(child, ctx)).kind for child in children] == ["next"] * 3
    assert await counted(ctx, "member", "M1") == 1 and await counted(ctx, "phone", "13812345678") == 1
    assert (await handle(order("O2"), ctx)).kind == "next"  # the member's second order this hour
    assert (await handle(order("O3"), ctx)).kind == "manual"


@pytest.mark.anyio
async def test_the_children_of_a_split_order_are_scored_as_the_one_order_the_member_placed() -> None:
    # 75 points at 10,000 cents and above: each child pays 5,000 of its parent's 15,000.
    ctx, _ = await make_ctx(sim={"risk": {"base_max": 1, "large_amount_cents": 10_000, "large_amount_points": 75}})
    children = [order(f"O1-{i}") for i in (1, 2, 3)]
    for child in children:
        child.parent_no, child.results["parent_payable"] = "O1", 15_000
    assert [(await handle(child, ctx)).kind for child in children] == ["manual"] * 3
    assert [child.results["audit"]["score"] for child in children] == [75] * 3
    single = order("O2")  # an order of 5,000 on its own
    assert (await handle(single, ctx)).kind == "next" and single.results["audit"]["score"] == 0


@pytest.mark.anyio
async def test_an_over_limit_order_replayed_stays_in_review_until_an_operator_passes_it() -> None:
    ctx, _ = await make_ctx({"max_orders_per_hour": 1})
    assert (await handle(order("O1"), ctx)).kind == "next"
    o = order("O2")
    assert (await handle(o, ctx)).kind == "manual"
    ctx.clock.advance(3600)  # a new hour must not launder it
    assert (await handle(o, ctx)).kind == "manual"
    o.results["audit_reviewed"] = True
    assert (await handle(o, ctx)).kind == "next"
    assert await counted(ctx, "member", "M1") == 0  # the replays counted nothing in the new hour


# -- region and remark -----------------------------------------------------------

@pytest.mark.anyio
async def test_review_regions() -> None:
    ctx, _ = await make_ctx({"review_regions": ["新疆维吾尔自治区", "三亚市"]})
    outcome = await handle(order("O1", province="海南省", city="三亚市"), ctx)
    assert (outcome.kind, outcome.reason) == ("manual", "audit: region 三亚市 needs review")
    assert (await handle(order("O2"), ctx)).kind == "next"


@pytest.mark.anyio
async def test_a_remark_goes_to_review_until_reviewed() -> None:
    ctx, _ = await make_ctx()
    o = order(remark=" 放门卫室 ")
    outcome = await handle(o, ctx)
    assert (outcome.kind, outcome.reason) == ("manual", "audit: remark needs review: 放门卫室")
    o.results["audit_reviewed"] = True
    assert (await handle(o, ctx)).kind == "next"
    assert await counted(ctx, "member", "M1") == 1


@pytest.mark.anyio
async def test_a_blank_remark_is_no_remark() -> None:
    ctx, _ = await make_ctx()
    assert (await handle(order(remark="   "), ctx)).kind == "next"


@pytest.mark.anyio
async def test_a_long_remark_is_shortened_in_the_reason() -> None:
    ctx, _ = await make_ctx()
    outcome = await handle(order(remark="x" * 500), ctx)
    assert outcome.kind == "manual" and len(outcome.reason) < 120 and outcome.reason.endswith("…")


@pytest.mark.anyio
async def test_generated_orders_with_remarks_go_to_review() -> None:
    ctx, _ = await make_ctx(sim={})
    remarks = 0
    for i, request in enumerate(generator.generate(400, seed=9)):
        o = generator.to_order(request, f"G{i:05d}", 0.0)
        outcome = await handle(o, ctx)
        assert outcome.kind in ("next", "manual", "cancel")
        if o.remark:
            remarks += 1
            assert outcome.kind == "manual"
        elif outcome.kind == "next":
            assert 0 <= o.results["audit"]["score"] < 70
    assert remarks > 0
