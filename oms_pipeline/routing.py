"""The strategy (routing) table: which stage an order goes to next (DESIGN R-1.2).

The table is data (`config/routes.toml`): the canonical stage order, one path
per group of order kinds (the stages it skips), flag rules (stages an order
with a flag skips), and explicit rules (path / flag, stage, outcome) -> target.
It is compiled once into a `Route` per (path, relevant flags), so the hot path
is two dict lookups.

Targets are a stage name or a terminal: `@done` (fulfilment handed over),
`@cancelled` (handed to the reverse flow), `@manual` (exception centre),
`@split` (the parent waits; its children flow on). `park` and `retry` always
come back to the same stage.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .config import read_toml

DONE, CANCELLED, MANUAL, SPLIT = "@done", "@cancelled", "@manual", "@split"
TERMINALS = (DONE, CANCELLED, MANUAL, SPLIT)
FORWARD = ("next", "skip")  # outcomes that move an order along its path
DEFAULT_TARGETS = {"cancel": CANCELLED, "manual": MANUAL, "split": SPLIT}


class RoutingError(Exception):
    """The routing table is unusable; the message names the route at fault."""


@dataclass(frozen=True)
class Rule:
    stage: str
    outcome: str
    to: str
    path: str | None = None
    flag: str | None = None

    def applies(self, path: str, flags: frozenset[str]) -> bool:
        return (self.path in (None, path)) and (self.flag is None or self.flag in flags)


@dataclass(frozen=True)
class Route:
    """One compiled path: its stages and where each (stage, outcome) leads."""

    name: str
    flags: frozenset[str]
    stages: tuple[str, ...]
    targets: dict[str, dict[str, str]] = field(hash=False, compare=False)

    @property
    def first(self) -> str:
        return self.stages[0] if self.stages else DONE

    def target(self, stage: str, outcome: str) -> str:
        if outcome in ("park", "retry"):
            return stage
        return self.targets[stage][outcome]


@dataclass(frozen=True)
class PathSpec:
    name: str
    kinds: tuple[str, ...]
    skip: frozenset[str]


class RoutingTable:
    def __init__(self, stages: Iterable[str], paths: list[PathSpec],
                 flag_skips: dict[str, frozenset[str]], rules: list[Rule]) -> None:
        self.stages = tuple(stages)
        self.paths = {p.name: p for p in paths}
        self.flag_skips = flag_skips
        self.rules = rules
        self.by_kind = {kind: p.name for p in paths for kind in p.kinds}
        # Only flags the table mentions change a route; the cache key ignores the rest.
        self.route_flags = frozenset(flag_skips) | {r.flag for r in rules if r.flag}
        self._cache: dict[tuple[str, frozenset[str]], Route] = {}

    def route_for(self, kind: str, flags: Iterable[str]) -> Route:
        path = self.by_kind.get(kind)
        if path is None:
            raise RoutingError(f"no path for order kind {kind!r}")
        key = (path, self.route_flags.intersection(flags))
        route = self._cache.get(key)
        if route is None:
            route = self._cache[key] = self.compile(*key)
        return route

    def compile(self, path: str, flags: frozenset[str]) -> Route:
        skip = set(self.paths[path].skip)
        for flag in flags:
            skip |= self.flag_skips.get(flag, frozenset())
        stages = tuple(s for s in self.stages if s not in skip)
        targets: dict[str, dict[str, str]] = {}
        for i, stage in enumerate(stages):
            following = stages[i + 1] if i + 1 < len(stages) else DONE
            targets[stage] = dict(DEFAULT_TARGETS, next=following, skip=following)
        for rule in self.rules:
            if rule.stage in targets and rule.applies(path, flags):
                targets[rule.stage][rule.outcome] = rule.to
        return Route(path, flags, stages, targets)

    def all_routes(self) -> list[Route]:
        """Every route an order can take: each path with each combination of flags."""
        flags = sorted(self.route_flags)
        combos = [frozenset(c) for n in range(len(flags) + 1) for c in itertools.combinations(flags, n)]
        return [self.compile(path, combo) for path in self.paths for combo in combos]

    def describe(self, kind: str | None = None) -> str:
        lines = []
        for route in self.all_routes():
            if kind and kind not in self.paths[route.name].kinds:
                continue
            with_flags = f" with flags {','.join(sorted(route.flags))}" if route.flags else ""
            lines.append(f"{route.name} ({', '.join(self.paths[route.name].kinds)}){with_flags}:")
            lines.append("  " + " -> ".join(route.stages + (DONE,)))
            for stage, targets in route.targets.items():
                for outcome, to in targets.items():
                    if _is_override(route, stage, outcome, to):
                        lines.append(f"  {stage} --{outcome}--> {to}")
        return "\n".join(lines)


def _is_override(route: Route, stage: str, outcome: str, to: str) -> bool:
    if outcome in FORWARD:
        i = route.stages.index(stage)
        return to != (route.stages[i + 1] if i + 1 < len(route.stages) else DONE)
    return DEFAULT_TARGETS.get(outcome) != to


def load(path: str | Path, known_stages: Iterable[str], kinds: Iterable[str]) -> RoutingTable:
    path = Path(path)
    raw = read_toml(path, RoutingError, "routing file")
    try:
        table = parse(raw)
        validate(table, known_stages, kinds)
    except RoutingError as exc:
        raise RoutingError(f"{path}: {exc}") from None
    return table


def parse(raw: dict[str, Any]) -> RoutingTable:
    _only(raw, {"stages", "paths", "flag_rules", "rules"}, "the routing file")
    paths = [PathSpec(name, tuple(_list(p, "kinds", f"paths.{name}")),
                      frozenset(_list(p, "skip", f"paths.{name}", required=False)))
             for name, p in raw.get("paths", {}).items() if _only(p, {"kinds", "skip"}, f"paths.{name}")]
    flag_skips: dict[str, frozenset[str]] = {}
    for i, fr in enumerate(raw.get("flag_rules", [])):
        _only(fr, {"flag", "skip"}, f"flag_rules[{i}]")
        flag_skips[str(fr["flag"])] = frozenset(_list(fr, "skip", f"flag_rules[{i}]"))
    rules = []
    for i, r in enumerate(raw.get("rules", [])):
        _only(r, {"stage", "outcome", "to", "path", "flag"}, f"rules[{i}]")
        try:
            rules.append(Rule(r["stage"], r["outcome"], r["to"], r.get("path"), r.get("flag")))
        except KeyError as exc:
            raise RoutingError(f"rules[{i}]: missing key {exc.args[0]}") from None
    return RoutingTable(_list(raw, "stages", "the routing file"), paths, flag_skips, rules)


def validate(table: RoutingTable, known_stages: Iterable[str], kinds: Iterable[str]) -> None:
    known = set(known_stages)
    _check_names(table, known, set(kinds))
    routes = table.all_routes()
    reached = {stage for route in routes for stage in route.stages}
    for stage in table.stages:
        if stage not in reached:
            raise RoutingError(f"stage {stage!r} is unreachable: every path and flag rule skips it")
    for route in routes:
        _check_terminates(route)


def _check_names(table: RoutingTable, known: set[str], kinds: set[str]) -> None:
    for stage in table.stages:
        if stage not in known:
            raise RoutingError(f"stages: unknown stage {stage!r} (known: {', '.join(sorted(known))})")
    if len(set(table.stages)) != len(table.stages):
        raise RoutingError("stages: a stage is listed twice")
    listed = set(table.stages)
    for path in table.paths.values():
        for stage in path.skip - listed:
            raise RoutingError(f"paths.{path.name}.skip: unknown stage {stage!r}")
        for kind in set(path.kinds) - kinds:
            raise RoutingError(f"paths.{path.name}.kinds: unknown order kind {kind!r}")
    for kind in kinds - set(table.by_kind):
        raise RoutingError(f"order kind {kind!r} has no path")
    for kind in table.by_kind:
        owners = [p.name for p in table.paths.values() if kind in p.kinds]
        if len(owners) > 1:
            raise RoutingError(f"order kind {kind!r} is in two paths: {', '.join(owners)}")
    for flag, skip in table.flag_skips.items():
        for stage in skip - listed:
            raise RoutingError(f"flag_rules[{flag}].skip: unknown stage {stage!r}")
    for rule in table.rules:
        _check_rule(table, rule, listed)


def _check_rule(table: RoutingTable, rule: Rule, listed: set[str]) -> None:
    where = f"rule ({rule.path or '*'}, {rule.flag or '*'}, {rule.stage}, {rule.outcome}) -> {rule.to}"
    if rule.stage not in listed:
        raise RoutingError(f"{where}: unknown stage {rule.stage!r}")
    if rule.outcome not in FORWARD + tuple(DEFAULT_TARGETS):
        raise RoutingError(f"{where}: outcome must be one of next, skip, cancel, manual, split")
    if rule.to not in listed and rule.to not in TERMINALS:
        raise RoutingError(f"{where}: unknown target {rule.to!r}")
    if rule.path is not None and rule.path not in table.paths:
        raise RoutingError(f"{where}: unknown path {rule.path!r}")


def _check_terminates(route: Route) -> None:
    """Following next/skip from any stage must reach a terminal, never loop."""
    state: dict[str, int] = {}  # 1: on the current trail, 2: known to terminate

    def visit(stage: str, trail: list[str]) -> None:
        state[stage] = 1
        for outcome in FORWARD:
            to = route.targets[stage][outcome]
            if to in TERMINALS or state.get(to) == 2:
                continue
            if to not in route.targets:
                raise RoutingError(f"path {route.name}: {stage} --{outcome}--> {to}, a stage this path skips")
            if state.get(to) == 1:
                loop = " -> ".join(trail[trail.index(to):] + [to])
                raise RoutingError(f"path {route.name}: route loop {loop} never reaches a terminal state")
            visit(to, trail + [to])
        state[stage] = 2

    for start in route.stages:
        if start not in state:
            visit(start, [start])


def _only(table: Any, allowed: set[str], where: str) -> bool:
    if not isinstance(table, dict):
        raise RoutingError(f"{where}: expected a table")
    for key in table:
        if key not in allowed:
            raise RoutingError(f"{where}: unknown key {key!r} (allowed: {', '.join(sorted(allowed))})")
    return True


def _list(table: dict, key: str, where: str, required: bool = True) -> list[str]:
    value = table.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RoutingError(f"{where}: {key} must be a list of names")
    return value
