"""The order intake's fast path (`schemas.ORDER_FAST`, msgspec structs derived from the pydantic
model) against pydantic itself: it may refuse what pydantic accepts (the caller then asks
pydantic), but never accepts what pydantic refuses, and what it accepts comes out the same."""
from __future__ import annotations

import copy
import random
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from oms_pipeline import schemas
from oms_pipeline.config import from_mapping
from oms_pipeline.generator import generate
from oms_pipeline.intake import Intake

# Values a mutation puts in place of a field: wrong types, bounds, formats, the trailing newline
# Python's `re` lets `$` match before.
ODD = [None, "", "x" * 300, "A-1\n", "A 1", -1, 0, 1, 1.5, 2.0, "12", True, False, [], {}, [{}], 10**11,
       "2026-13-01", "2026-12-07", "2026-12-07T00:00:00", 1_700_000_000, "ambient", "online", "scheduled",
       "13812345678", "+8613812345678\n", "SKU-000001", {"sku": "S-1", "qty": 1}]


def _pydantic(body: bytes) -> dict[str, Any] | None:
    try:
        return schemas.validate(schemas.OrderIn, schemas.decode_json(body)).model_dump(mode="json", exclude_none=True)
    except schemas.Invalid:
        return None


def _paths(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*path, i))
    return out


def _mutate(request: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out = copy.deepcopy(request)
    path = rng.choice(_paths(out)[1:])
    parent = out
    for step in path[:-1]:
        parent = parent[step]
    last = path[-1]
    what = rng.random()
    if what < 0.15 and isinstance(parent, dict):
        del parent[last]
    elif what < 0.25 and isinstance(parent, dict):
        parent["unknown_" + str(last)] = 1
    else:
        parent[last] = rng.choice(ODD)
    return out


def test_every_generated_request_takes_the_fast_path_with_pydantics_result():
    for seed in (1, 2, 3):
        for request in generate(3000, seed):
            body = orjson.dumps(request)
            fast = schemas.ORDER_FAST.parse(body)
            assert fast is not None, request
            assert fast == _pydantic(body)


def test_the_fast_path_never_accepts_what_pydantic_refuses():
    rng = random.Random(17)
    requests = list(generate(400, 9))
    refused_by_both = fast_only_refused = 0
    for _ in range(6000):
        mutated = _mutate(rng.choice(requests), rng)
        for _ in range(rng.randrange(2)):  # now and then two changes at once
            mutated = _mutate(mutated, rng)
        body = orjson.dumps(mutated)
        fast, slow = schemas.ORDER_FAST.parse(body), _pydantic(body)
        if fast is not None:
            assert slow is not None, f"fast path accepted what pydantic refuses: {mutated}"
            assert fast == slow
        elif slow is None:
            refused_by_both += 1
        else:
            fast_only_refused += 1  # pydantic's lax parsing (a date as a timestamp, ...): it decides
    assert refused_by_both > 3000  # the mutations do make invalid bodies
    assert fast_only_refused < refused_by_both


@pytest.mark.parametrize("first, last", [("toc", "tob"), ("toc", "bogus"), ("bogus", "toc")])
def test_a_key_given_twice_counts_as_pydantic_counts_it(first, last):
    body = orjson.dumps(next(generate(1, 5))).decode()
    at = body.index('"kind":')
    end = body.index(",", at)
    twice = f'{body[:at]}"kind":"{first}","kind":"{last}"{body[end:]}'.encode()
    fast, slow = schemas.ORDER_FAST.parse(twice), _pydantic(twice)
    assert fast is None or fast == slow


@pytest.mark.parametrize("body, path", [
    (b'{"source": "app"', "$"),
    (b"[1, 2]", "$"),
    (b'{"source":"app","external_id":"A-1\\n","kind":"toc","member_id":"M1","consignee":{},"lines":[]}',
     "external_id"),
])
def test_a_body_the_fast_path_refuses_gets_pydantics_errors(body, path):
    intake = Intake.__new__(Intake)
    intake.settings = from_mapping({})
    with pytest.raises(schemas.Invalid) as caught:
        intake.request_body(body)
    assert path in {e["path"] for e in caught.value.errors}


def test_every_error_is_named_not_only_the_first():
    request = next(generate(1, 5))
    request["lines"][0]["qty"] = -1
    request["consignee"]["phone"] = "call me"
    intake = Intake.__new__(Intake)
    intake.settings = from_mapping({})
    with pytest.raises(schemas.Invalid) as caught:
        intake.request_body(orjson.dumps(request))
    assert {"lines.0.qty", "consignee.phone"} <= {e["path"] for e in caught.value.errors}


def test_the_line_limit_holds_on_the_fast_path():
    request = next(generate(1, 5))
    intake = Intake.__new__(Intake)
    intake.settings = from_mapping({"intake": {"max_lines": len(request["lines"]) - 1 or 1}})
    request["lines"] = request["lines"] * 2
    with pytest.raises(schemas.Invalid, match="more than"):
        intake.request_body(orjson.dumps(request))


def test_a_field_type_the_derivation_does_not_know_is_refused_at_once():
    class WithDict(BaseModel):
        tags: dict[str, int]

    with pytest.raises(TypeError, match="no fast-path type"):
        schemas.FastSchema(WithDict)
