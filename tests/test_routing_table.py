"""The routing table: compiled paths, overrides, and validation that names the route at fault."""
from __future__ import annotations

import pytest

from oms_pipeline import routing
from oms_pipeline.order import KINDS

STAGES = ["a", "b", "c", "d"]


def table(**raw):
    raw.setdefault("stages", STAGES)
    raw.setdefault("paths", {"all": {"kinds": ["toc"]}})
    t = routing.parse(raw)
    routing.validate(t, STAGES, ["toc", "tob"] if "tob" in str(raw["paths"]) else ["toc"])
    return t


def test_defaults_walk_the_canonical_order_and_end_done():
    route = table().route_for("toc", [])
    assert route.stages == ("a", "b", "c", "d")
    assert route.target("a", "next") == "b" and route.target("d", "skip") == routing.DONE
    assert route.target("b", "park") == "b" and route.target("b", "retry") == "b"
    assert route.target("b", "cancel") == routing.CANCELLED and route.target("b", "manual") == routing.MANUAL


def test_paths_and_flag_rules_skip_stages():
    t = table(paths={"toc": {"kinds": ["toc"]}, "tob": {"kinds": ["tob"], "skip": ["a"]}},
              flag_rules=[{"flag": "virtual", "skip": ["c"]}])
    assert t.route_for("tob", []).stages == ("b", "c", "d")
    assert t.route_for("tob", ["virtual", "cod"]).stages == ("b", "d")
    assert t.route_for("toc", ["cod"]) is t.route_for("toc", [])  # flags no rule names share a route


def test_rules_override_a_target_for_a_flag():
    t = table(rules=[{"stage": "b", "outcome": "next", "to": "d", "flag": "virtual"}])
    assert t.route_for("toc", ["virtual"]).target("b", "next") == "d"
    assert t.route_for("toc", []).target("b", "next") == "c"


@pytest.mark.parametrize("raw, message", [
    ({"stages": ["a", "x"]}, "unknown stage 'x'"),
    ({"flag_rules": [{"flag": "v", "skip": ["a", "b", "c", "d"]}], "paths": {"all": {"kinds": ["toc"], "skip": ["a"]}}},
     "stage 'a' is unreachable"),
    ({"rules": [{"stage": "c", "outcome": "next", "to": "b"}]}, "route loop b -> c -> b"),
    ({"rules": [{"stage": "c", "outcome": "next", "to": "nowhere"}]}, "unknown target 'nowhere'"),
    ({"rules": [{"stage": "c", "outcome": "explode", "to": "d"}]}, "outcome must be one of"),
    ({"paths": {"all": {"kinds": ["toc"], "skip": ["zz"]}}}, "paths.all.skip: unknown stage 'zz'"),
    ({"paths": {"all": {"kinds": ["toc"], "colour": "red"}}}, "unknown key 'colour'"),
])
def test_validation_names_the_route_at_fault(raw, message):
    with pytest.raises(routing.RoutingError, match=message.replace("(", r"\(")):
        table(**raw)


def test_every_kind_needs_a_path():
    t = routing.parse({"stages": STAGES, "paths": {"all": {"kinds": ["toc"]}}})
    with pytest.raises(routing.RoutingError, match="order kind 'tob' has no path"):
        routing.validate(t, STAGES, ["toc", "tob"])


def test_the_shipped_table_is_valid_and_describes_each_kind():
    from stages import STAGE_NAMES
    t = routing.load("config/routes.toml", STAGE_NAMES, KINDS)
    tob = t.describe("tob")
    assert "notify_paid" not in tob and "dispatch_wms -> @done" in tob
    assert "audit --cancel--> @cancelled" not in tob  # the default target is not an override
    virtual = t.route_for("toc", ["virtual"])
    assert "waybill" not in virtual.stages and "flow_limit" not in virtual.stages
