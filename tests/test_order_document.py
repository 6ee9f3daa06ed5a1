"""The stored order document: fields at their default are left out, and nothing is lost by it."""
from __future__ import annotations

import msgspec
import orjson

from oms_pipeline import order as oc
from oms_pipeline.generator import generate, to_order

ORDER_FIELDS = [f.name for f in msgspec.structs.fields(oc.Order)]
LINE_FIELDS = [f.name for f in msgspec.structs.fields(oc.Line)]
ADDRESS_FIELDS = [f.name for f in msgspec.structs.fields(oc.Address)]


def _orders(n: int = 300) -> list[oc.Order]:
    return [to_order(request, f"N{i:017d}", 1.7e9 + i) for i, request in enumerate(generate(n, 5))]


def _everything(order: oc.Order) -> bytes:
    """The document as written before defaults were left out: every field of every struct."""
    return orjson.dumps(oc.document(order))


def test_a_document_round_trips_and_leaves_defaults_out():
    for order in _orders():
        data = oc.encode(order)
        assert oc.decode(data) == order
        stored = orjson.loads(data)
        assert "children" not in stored  # [] left out
        assert ("results" in stored) == bool(order.results)  # {} left out, a non-empty dict kept
        assert all("discount" not in line or line["discount"] for line in stored["lines"])
        assert list(stored["consignee"]) == ADDRESS_FIELDS  # goes downstream as it is: kept whole
        assert len(data) < len(_everything(order))


def test_documents_written_with_every_field_still_decode_to_the_same_order():
    for order in _orders():
        assert oc.decode(_everything(order)) == order


def test_document_shows_every_field_in_declaration_order():
    order = _orders(1)[0]
    order.results["stock"] = {"lines": {"1": ["SKU-1", "WH-1", 2]}}
    full = oc.document(order)
    assert list(full) == ORDER_FIELDS
    assert all(list(line) == LINE_FIELDS for line in full["lines"])
    assert full["children"] == [] and full["status"] == order.status and full["amounts"]["paid"] == 0
    assert full["results"]["stock"] == {"lines": {"1": ["SKU-1", "WH-1", 2]}}
    assert orjson.loads(orjson.dumps(full)) == full  # JSON-ready builtins only
    assert oc.decode(orjson.dumps(full)) == order
