"""gifts: campaign gift lines attached to a main line, once per campaign."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from oms_pipeline import flags
from oms_pipeline.clock import VirtualClock
from oms_pipeline.order import Address, Amounts, Line, Order, encode
from oms_pipeline.outcome import PermanentError
from oms_pipeline.stage import CpuContext, StageContext
from stages import allocate, gifts, split
from stages.gifts import apply_campaigns

CST = timezone(timedelta(hours=8))
NOW = datetime(2023, 11, 15, 12, tzinfo=CST).timestamp()


@pytest.fixture
def anyio_backend():
    return "asyncio"


def campaign(**kw) -> dict:
    return {"id": "C1", "gift_sku": "GIFT-TOWEL", "gift_qty": 1, "min_amount": 0, "members": [], **kw}


def ctx(*campaigns, now=NOW, **settings) -> StageContext:
    return StageContext("gifts", {**gifts.SPEC.defaults, "campaigns": list(campaigns), **settings},
                        ports=None, coordination=None, clock=VirtualClock(now))


def order(member="M1") -> Order:
    lines = [Line(line_no=1, sku="SKU-A", qty=1, unit_price=2000, warehouse="WH-BJ"),
             Line(line_no=2, sku="SKU-B", qty=2, unit_price=3000, warehouse="WH-SH", zone="chilled_low",
                  delivery_date="2023-11-20"),
             Line(line_no=3, sku="SKU-C", qty=1, unit_price=1000, warehouse="WH-GZ", supplier="SUP-01")]
    o = Order(order_no="O1", source="app", external_id="app-1", kind="toc", member_id=member,
              consignee=Address(name="王伟", phone="13812345678", province="北京市", city="北京市", detail="x"),
              lines=lines, amounts=Amounts(discount=900, freight=600, payable=8700))
    o.flags = flags.derive(o)
    return o


async def added(o: Order, *campaigns, **kw) -> list[Line]:
    before = len(o.lines)
    outcome = await gifts.handle(o, ctx(*campaigns, **kw))
    assert outcome.kind == ("next" if len(o.lines) > before else "skip")
    return o.lines[before:]


@pytest.mark.anyio
async def test_a_gift_attaches_to_the_largest_line_at_zero_price():
    o = order()
    outcome = await gifts.handle(o, ctx(campaign(gift_qty=2)))
    assert outcome.kind == "next"
    gift = o.lines[-1]
    assert (gift.line_no, gift.sku, gift.qty, gift.unit_price, gift.gift_of) == (4, "GIFT-TOWEL", 2, 0, 2)
    # It ships with its main line: same warehouse, zone, supplier and date.
    assert (gift.warehouse, gift.zone, gift.supplier, gift.delivery_date) == ("WH-SH", "chilled_low", "", "2023-11-20")
    assert flags.has(o.flags, "gift")
    assert o.results["gifts"] == ["C1"]
    assert o.amounts.payable == 8700


@pytest.mark.anyio
async def test_running_again_adds_no_second_gift():
    o = order()
    await gifts.handle(o, ctx(campaign()))
    outcome = await gifts.handle(o, ctx(campaign()))
    assert outcome.kind == "skip" and "already added: C1" in outcome.reason
    assert len(o.lines) == 4 and o.results["gifts"] == ["C1"]


@pytest.mark.anyio
async def test_a_campaign_added_later_applies_on_a_rerun_without_repeating_the_first():
    o = order()
    await gifts.handle(o, ctx(campaign()))
    new = await added(o, campaign(), campaign(id="C2", gift_sku="GIFT-BAG"))
    assert [(x.line_no, x.sku) for x in new] == [(5, "GIFT-BAG")]
    assert o.results["gifts"] == ["C1", "C2"]


@pytest.mark.anyio
async def test_no_campaign_skips_with_the_reason():
    o = order()
    outcome = await gifts.handle(o, ctx())
    assert outcome.kind == "skip" and outcome.reason == "no campaign applies"
    assert not flags.has(o.flags, "gift") and "gifts" not in o.results


@pytest.mark.anyio
async def test_several_campaigns_number_their_gifts_after_the_last_line():
    new = await added(order(), campaign(), campaign(id="C2", gift_sku="GIFT-BAG", main_sku="SKU-A"))
    assert [(x.line_no, x.sku, x.gift_of) for x in new] == [(4, "GIFT-TOWEL", 2), (5, "GIFT-BAG", 1)]


@pytest.mark.anyio
async def test_min_amount_is_on_the_goods_total():
    assert await added(order(), campaign(min_amount=9001)) == []  # goods 9000; payable does not count
    assert len(await added(order(), campaign(min_amount=9000))) == 1


@pytest.mark.anyio
async def test_only_candidate_members_qualify_when_a_list_is_given():
    assert await added(order("M2"), campaign(members=["M1", "M3"])) == []
    assert len(await added(order("M3"), campaign(members=["M1", "M3"]))) == 1


@pytest.mark.anyio
async def test_excluded_members_never_qualify():
    assert await added(order("M1"), campaign(excluded=["M1"])) == []


@pytest.mark.anyio
@pytest.mark.parametrize("bounds, applies", [
    ({"start": "2023-11-15", "end": "2023-11-15"}, True),   # dates cover the whole local day
    ({"start": "2023-11-16"}, False),
    ({"end": "2023-11-14"}, False),
    ({"start": "2023-11-15T12:00:00+08:00"}, True),
    ({"start": "2023-11-15T12:00:01"}, False),               # no offset: local time
    ({"end": "2023-11-15T12:00:00+08:00"}, False),           # the end is exclusive
    ({"start": NOW - 1, "end": NOW + 1}, True),               # epoch seconds
    ({"start": NOW + 1}, False),
    ({"start": str(int(NOW) - 1)}, True),                   # epoch seconds as a string
])
async def test_a_campaign_applies_only_while_it_runs(bounds, applies):
    assert len(await added(order(), campaign(**bounds))) == (1 if applies else 0)


@pytest.mark.anyio
async def test_the_date_bounds_follow_the_configured_timezone():
    # 12:00 at UTC+8 is 04:00 UTC the same day; at UTC-10 it is still the 14th.
    assert await added(order(), campaign(start="2023-11-15"), timezone_offset_hours=-10) == []


@pytest.mark.anyio
async def test_main_sku_picks_the_line_and_a_missing_one_means_no_gift():
    (gift,) = await added(order(), campaign(main_sku="SKU-C"))
    assert (gift.gift_of, gift.warehouse, gift.supplier) == (3, "WH-GZ", "SUP-01")
    assert await added(order(), campaign(main_sku="SKU-Z")) == []


@pytest.mark.anyio
async def test_a_gift_never_hangs_off_another_gift_or_a_bundle_component():
    o = order()
    o.lines.append(Line(line_no=9, sku="PART", qty=1, unit_price=99_999, bundle_of=1))
    (gift,) = await added(o, campaign())
    assert gift.gift_of == 2 and gift.line_no == 10


@pytest.mark.anyio
async def test_a_virtual_main_line_gives_a_virtual_gift():
    o = order()
    o.lines = [Line(line_no=1, sku="GC-0100", qty=1, unit_price=10000, virtual=True)]
    (gift,) = await added(o, campaign())
    assert gift.virtual


@pytest.mark.anyio
@pytest.mark.parametrize("bad, message", [
    ({"id": ""}, "without an id"),
    ({"gift_sku": ""}, "no gift_sku"),
    ({"gift_qty": 0}, "gift_qty must be a positive integer"),
    ({"start": "soon"}, "bad start/end"),
])
async def test_a_misconfigured_campaign_is_a_permanent_error(bad, message):
    with pytest.raises(PermanentError, match=message):
        await gifts.handle(order(), ctx(campaign(**bad)))


def test_apply_campaigns_is_pure():
    o = order()
    before = encode(o)
    lines = apply_campaigns(o, [campaign()], NOW)
    assert [x.sku for x in lines] == ["GIFT-TOWEL"]
    assert encode(o) == before
    assert apply_campaigns(o, [campaign()], NOW) == lines


@pytest.mark.anyio
async def test_gifts_get_no_money_at_allocate_and_ship_with_their_main_line_at_split():
    o = order()
    await gifts.handle(o, ctx(campaign(main_sku="SKU-A")))
    assert allocate.handle(o, CpuContext("allocate", NOW, {})).kind == "next"
    gift = o.lines[-1]
    assert (gift.discount, gift.freight, gift.payable) == (0, 0, 0)
    outcome = split.handle(o, CpuContext("split", NOW, dict(split.SPEC.defaults)))
    homes = [[x.line_no for x in c.lines] for c in outcome.children]
    assert homes == [[1, 4], [2], [3]]
    assert flags.has(outcome.children[0].flags, "gift") and not flags.has(outcome.children[1].flags, "gift")
