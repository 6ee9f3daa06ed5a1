from __future__ import annotations

import pytest

from oms_pipeline import flags
from oms_pipeline.order import Address, Amounts, Line, Order


def make_order(*lines: Line, **fields) -> Order:
    base = dict(order_no="1", source="app", external_id="e1", kind="toc", member_id="M1",
                consignee=Address(name="王伟", phone="13800000000", province="北京市", city="北京市"),
                lines=list(lines) or [Line(line_no=1, sku="SKU-000001", qty=1, unit_price=1000)],
                amounts=Amounts())
    return Order(**(base | fields))


def test_table_positions_are_unique_and_within_the_width():
    positions = [spec.position for spec in flags.FLAGS]
    assert len(set(positions)) == len(positions)
    assert all(1 <= p <= flags.WIDTH for p in positions)
    assert len({spec.name for spec in flags.FLAGS}) == len(flags.FLAGS)


def test_table_documents_the_required_flags():
    required = {"presale", "cod", "virtual", "gift", "o2o_pickup", "bulky", "valuable", "reissue",
                "exchange", "cross_border", "drop_ship", "invoice", "pullback", "mixed_payment",
                "third_party"}
    assert required <= {spec.name for spec in flags.FLAGS}


def test_blank_is_all_off_and_fixed_width():
    assert flags.blank() == "0" * flags.WIDTH
    assert flags.describe(flags.blank()) == {}


def test_set_then_read_round_trips_every_flag():
    for spec in flags.FLAGS:
        for char in spec.values:
            f = flags.set_flag(flags.blank(), spec.name, char)
            assert len(f) == flags.WIDTH
            assert flags.has(f, spec.name) and flags.value(f, spec.name) == char
            assert flags.describe(f) == {spec.name: char}


def test_setting_one_flag_leaves_the_others_alone():
    f = flags.set_flag(flags.set_flag(flags.blank(), "cod"), "cold_chain", "2")
    assert flags.describe(f) == {"cod": "1", "cold_chain": "2"}
    f = flags.set_flag(f, "cod", "0")
    assert flags.describe(f) == {"cold_chain": "2"}
    assert len(f) == flags.WIDTH


def test_flag_position_is_what_downstream_reads():
    f = flags.set_flag(flags.blank(), "presale")
    assert f[0] == "1" and f[1:] == "0" * (flags.WIDTH - 1)


def test_unknown_flag_name_raises_key_error_naming_it():
    with pytest.raises(KeyError, match="unknown order flag 'nope'"):
        flags.has(flags.blank(), "nope")
    with pytest.raises(KeyError, match="nope"):
        flags.set_flag(flags.blank(), "nope")


def test_value_outside_the_documented_values_is_rejected():
    with pytest.raises(ValueError, match="cold_chain"):
        flags.set_flag(flags.blank(), "cold_chain", "7")


def test_short_or_empty_strings_read_as_off_and_long_ones_are_rejected():
    assert not flags.has("", "cod")
    assert len(flags.set_flag("", "cod")) == flags.WIDTH
    with pytest.raises(ValueError):
        flags.describe("0" * (flags.WIDTH + 1))


def test_derive_plain_order_sets_nothing():
    assert flags.derive(make_order()) == flags.blank()


def test_derive_cod_o2o_presale_invoice_remark():
    order = make_order(payment_method="cod", presale=True, invoice_title="个人", remark="放门卫室",
                       consignee=Address(name="李娜", phone="1", province="上海市", city="上海市",
                                         pickup_point="PP-SH-01"))
    assert flags.names(flags.derive(order)) == {"cod", "o2o_pickup", "presale", "invoice", "remark"}


def test_derive_virtual_only_when_every_line_is_virtual():
    card = Line(line_no=1, sku="GC-0100", qty=1, unit_price=10000, virtual=True)
    goods = Line(line_no=2, sku="SKU-000002", qty=1, unit_price=100)
    assert flags.has(flags.derive(make_order(card)), "virtual")
    assert not flags.has(flags.derive(make_order(card, goods)), "virtual")


def test_derive_line_attributes():
    order = make_order(
        Line(line_no=1, sku="BLK-000007", qty=1, unit_price=100, zone="chilled_low"),
        Line(line_no=2, sku="CB-000011", qty=1, unit_price=100, supplier="SUP-01", zone="frozen_high"),
        Line(line_no=3, sku="SKU-000003", qty=1, unit_price=0, gift_of=1),
    )
    f = flags.derive(order)
    assert flags.names(f) == {"bulky", "cross_border", "drop_ship", "gift", "cold_chain"}
    assert flags.value(f, "cold_chain") == "2"  # frozen wins over chilled


def test_derive_valuable_from_goods_total():
    line = Line(line_no=1, sku="SKU-000001", qty=2, unit_price=flags.VALUABLE_GOODS // 2)
    assert flags.has(flags.derive(make_order(line)), "valuable")
    line.unit_price -= 1
    assert not flags.has(flags.derive(make_order(line)), "valuable")


@pytest.mark.parametrize("kind", ["reissue", "exchange", "pullback", "third_party"])
def test_derive_kind_flags(kind):
    assert flags.names(flags.derive(make_order(kind=kind))) == {kind}


def test_derive_mixed_payment_and_delivery_promise():
    f = flags.derive(make_order(payment_method="mixed", delivery_promise="next_day"))
    assert flags.describe(f) == {"mixed_payment": "1", "promise": "1"}


def test_markdown_table_has_a_row_per_flag():
    table = flags.markdown_table()
    assert table.startswith("| Pos | Name |")
    for spec in flags.FLAGS:
        assert f"| {spec.position} | `{spec.name}` |" in table


def test_derive_writes_every_derived_value_at_its_own_position():
    from oms_pipeline.generator import generate, to_order
    assert [spec.position for spec in flags.FLAGS] == list(range(1, len(flags.FLAGS) + 1))
    for i, request in enumerate(generate(300, 11)):
        order = to_order(request, f"N{i:017d}", 1.7e9)
        expected = flags.blank()
        values = flags._derived_values(order)
        assert list(values) == [spec.name for spec in flags.FLAGS]
        for name, v in values.items():
            expected = flags.set_flag(expected, name, ("1" if v else flags.OFF) if isinstance(v, bool) else v)
        assert flags.derive(order) == expected
