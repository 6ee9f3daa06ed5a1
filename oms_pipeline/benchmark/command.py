"""`oms bench SCENARIO`: the harness's command line (also bench/harness.py)."""
from __future__ import annotations

import argparse
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("scenario", nargs="?",
                   help="a name in bench/scenarios (smoke, seed_mix, embedded, ...) or a TOML file")
    p.add_argument("--out", help="output directory (default: bench/out/SCENARIO-TIMESTAMP)")
    p.add_argument("--smoke", action="store_true", help="shrink the scenario to a few seconds (CI)")
    p.add_argument("--orders", type=int, help="orders to send (overrides load.orders)")
    p.add_argument("--rate", type=float, help="open-loop arrivals per second; 0 = one burst")
    p.add_argument("--seed", type=int, help="seed of the arrivals and the generated orders")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any scenario key, VALUE in TOML (e.g. compare.peers=[] or "
                        "config.stage_defaults.io.pool=64); repeatable")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars on stderr (default: when stderr is a terminal)")
    p.add_argument("--list", action="store_true", help="list the scenarios in bench/scenarios and exit")
    return p


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (("orders", args.orders), ("rate", args.rate)):
        if value is not None:
            out.setdefault("load", {})[key] = value
    if args.orders is not None:
        out["load"]["duration"] = 0.0  # an explicit count wins over rate x duration
    if args.seed is not None:
        out["seed"] = args.seed
    for item in args.set:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def run(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from .harness import DEFAULT_OUT, Harness
    from .scenario import SCENARIO_DIR, ScenarioError, load
    if args.list:
        for path in sorted(SCENARIO_DIR.glob("*.toml")):
            print(f"{path.stem:<16} {_first_line(path)}")
        return EXIT_OK
    if not args.scenario:
        print("oms bench: which scenario? (--list shows them)", file=sys.stderr)
        return EXIT_USAGE
    try:
        scenario = load(args.scenario, smoke=args.smoke, overrides=overrides(args))
    except (ScenarioError, ValueError) as exc:
        print(f"oms bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out) if args.out else DEFAULT_OUT / f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        results = Harness(scenario, out, progress=progress).run()
    except (ConfigError, ValueError) as exc:
        print(f"oms bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print((out / "summary.md").read_text())
    print(f"results: {out / 'results.json'}", file=sys.stderr)
    return EXIT_FAIL if results["incomplete"] else EXIT_OK


def _first_line(path: Path) -> str:
    try:
        return str(tomllib.loads(path.read_text()).get("description", "")).splitlines()[0]
    except (tomllib.TOMLDecodeError, IndexError):
        return ""


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="bench/harness.py", description=__doc__))
    return run(parser.parse_args(argv))
