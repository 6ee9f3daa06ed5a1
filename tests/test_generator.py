from __future__ import annotations

import json
from collections import Counter
from itertools import islice

import msgspec
import pytest

from oms_pipeline import flags
from oms_pipeline.generator import WAREHOUSES, generate, settle_amounts, to_order
from oms_pipeline.order import KINDS, PAYMENT_METHODS, SOURCES, ZONES, decode, encode

N = 5_000


@pytest.fixture(scope="module")
def requests() -> list[dict]:
    return list(generate(N, seed=7))


def share(items, predicate) -> float:
    items = list(items)
    return sum(1 for x in items if predicate(x)) / len(items)


def test_same_seed_gives_identical_requests():
    assert list(generate(300, seed=11)) == list(generate(300, seed=11))


def test_different_seeds_differ_and_a_prefix_is_stable():
    assert list(generate(50, seed=1)) != list(generate(50, seed=2))
    assert list(islice(generate(500, seed=3), 20)) == list(generate(20, seed=3))


def test_requests_are_json_and_carry_no_order_number(requests):
    assert json.loads(json.dumps(requests[:200])) == requests[:200]
    assert all("order_no" not in r for r in requests)


def test_external_ids_are_unique_per_source(requests):
    keys = [(r["source"], r["external_id"]) for r in requests]
    assert len(set(keys)) == len(keys)


def test_placed_at_increases_from_start_at():
    placed = [r["placed_at"] for r in generate(200, seed=5, start_at=1000.0)]
    assert placed[0] == 1000.0 and placed == sorted(placed)


def test_values_come_from_the_model_vocabularies(requests):
    lines = [line for r in requests for line in r["lines"]]
    assert {r["kind"] for r in requests} == set(KINDS)
    assert {r["source"] for r in requests} <= set(SOURCES)
    assert {r["payment_method"] for r in requests} <= set(PAYMENT_METHODS)
    assert {line["zone"] for line in lines} == set(ZONES)
    assert {line["warehouse"] for line in lines} == set(WAREHOUSES) | {""}
    assert {len(r["lines"]) for r in requests} == set(range(1, 7))


def test_kind_mix_is_mostly_toc(requests):
    kinds = Counter(r["kind"] for r in requests)
    assert 0.75 < kinds["toc"] / N < 0.85
    assert all(kinds[k] > 0.01 * N for k in KINDS)


@pytest.mark.parametrize("name, predicate, target", [
    ("cod", lambda r: r["payment_method"] == "cod", 0.05),
    ("o2o pickup", lambda r: r["consignee"]["pickup_point"] is not None, 0.05),
    ("presale", lambda r: r["presale"], 0.03),
    ("remark", lambda r: r["remark"] != "", 0.03),
    ("virtual only", lambda r: all(line["virtual"] for line in r["lines"]), 0.03),
    ("invoice", lambda r: r["invoice_title"] is not None, 0.20),
])
def test_special_cases_appear_in_roughly_the_intended_share(requests, name, predicate, target):
    assert abs(share(requests, predicate) - target) < max(0.015, target * 0.25), name


def test_drop_ship_and_bundle_lines(requests):
    lines = [line for r in requests for line in r["lines"]]
    assert abs(share(lines, lambda l: l["supplier"] != "") - 0.05) < 0.015
    bundles = [line for line in lines if line["bundle"]]
    assert bundles and all(2 <= len(b["components"]) <= 3 for b in bundles)


def test_no_gift_lines_are_generated(requests):
    assert all("gift_of" not in line for r in requests for line in r["lines"])


def test_cod_is_never_offered_for_virtual_goods_or_non_toc(requests):
    for r in requests:
        if r["payment_method"] == "cod":
            assert r["kind"] == "toc" and not any(line["virtual"] for line in r["lines"])


def test_every_request_becomes_a_valid_order_with_payable_by_the_formula(requests):
    for i, r in enumerate(requests):
        order = to_order(r, order_no=f"{i:018d}", now=1_700_000_500.0)
        assert decode(encode(order)) == order  # type-checks the whole document
        a = order.amounts
        assert a.payable >= 0
        assert a.payable == order.goods - a.discount - a.coupon - a.points + a.freight
        assert order.status == "CREATED" and order.created_at == 1_700_000_500.0
        assert order.flags == flags.derive(order) and len(order.flags) == flags.WIDTH
        assert [line.line_no for line in order.lines] == list(range(1, len(order.lines) + 1))


def test_to_order_keeps_request_fields_and_bundle_components():
    r = next(r for r in generate(2_000, seed=9) if any(line["bundle"] for line in r["lines"]))
    order = to_order(r, "1" * 18, now=1.0)
    assert (order.source, order.external_id, order.kind) == (r["source"], r["external_id"], r["kind"])
    no = next(i for i, line in enumerate(r["lines"], 1) if line["bundle"])
    assert order.lines[no - 1].bundle
    assert order.results["bundles"][str(no)] == r["lines"][no - 1]["components"]


def test_to_order_derives_flags_from_the_request():
    r = next(r for r in generate(2_000, seed=9) if r["payment_method"] == "cod" and r["presale"])
    assert {"cod", "presale"} <= flags.names(to_order(r, "1" * 18, now=1.0).flags)


def test_over_deduction_shrinks_the_discount_first_then_coupon_then_points():
    assert settle_amounts(1000, 800, 500, 0, 0).discount == 500
    a = settle_amounts(goods=1000, discount=300, coupon=900, points=200, freight=100)
    assert (a.discount, a.coupon, a.points, a.payable) == (0, 900, 200, 0)
    a = settle_amounts(goods=1000, discount=0, coupon=900, points=400, freight=0)
    assert (a.coupon, a.points, a.payable) == (600, 400, 0)
    assert settle_amounts(1000, 100, 0, 0, 500).payable == 1400


def test_bad_request_fields_are_rejected_by_type():
    r = next(iter(generate(1, seed=1)))
    r["lines"][0]["qty"] = "two"
    with pytest.raises(msgspec.ValidationError):
        to_order(r, "1" * 18, now=1.0)
