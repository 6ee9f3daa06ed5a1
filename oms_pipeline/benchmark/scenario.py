"""Benchmark scenarios: TOML files in bench/scenarios (or any path).

A scenario says what runs (generated stages with a latency profile, or the
daemon's 16 real stages on the embedded or production backends), the load
(how many orders, open-loop arrival rate or one burst, a seed), config
overrides in the format of config/oms.toml, and which comparisons to make.
Unknown keys are refused, naming the key, as the daemon's config does.
`--smoke` shrinks any scenario to a few seconds (its `[smoke]` table).
"""
from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

ROOT = Path(__file__).resolve().parent.parent.parent
SCENARIO_DIR = ROOT / "bench" / "scenarios"

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(gt=0, le=1)]


class ScenarioError(Exception):
    """The scenario cannot be used; the message names the file and the key."""


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Load(_Strict):
    orders: Positive = 5000
    rate: NonNegative = 0.0  # open-loop arrivals per second (Poisson); 0 = all at once (a burst)
    duration: NonNegative = 0.0  # with a rate: rate x duration orders (replaces `orders`)
    batch: Positive = 500  # most orders one intake call takes, as a broker consumer with prefetch
    timeout: NonNegative = 600.0  # a run stops after this many seconds, finished or not
    stall: NonNegative = 10.0  # ... or after this long without an order finishing, once all were sent

    def count(self) -> int:
        return max(1, round(self.rate * self.duration)) if self.rate and self.duration else self.orders


class StageProfile(_Strict):
    """One generated stage's override of the kind's profile."""

    kind: Literal["io", "cpu"] | None = None
    wait_ms: NonNegative | None = None
    cpu_ms: NonNegative | None = None


class Workload(_Strict):
    # memory: the daemon's 16 real stages on the in-memory store, timers and counters (nothing durable):
    # what the stages, intake, hops and relay cost on their own, the ceiling of any durable store
    kind: Literal["synthetic", "memory", "embedded", "production"] = "synthetic"
    # synthetic: generated stages, alternating io / cpu (io first), named io01, cpu02, ...
    stages: Positive = 16
    io_wait_ms: NonNegative = 20.0
    io_dist: Literal["fixed", "uniform", "exponential"] = "uniform"  # uniform: +-50% around the mean
    cpu_ms: NonNegative = 0.5
    stage: dict[str, StageProfile] = {}  # per-stage overrides by generated name
    # memory / embedded / production: fields every generated order request gets (e.g. no payment to wait for)
    order_overrides: dict[str, Any] = {}
    postgres: str = "postgresql://postgres@127.0.0.1:5432"  # production: a database is created per run
    rabbitmq: str = "amqp://guest:guest@127.0.0.1:5672/"
    redis: str = "redis://127.0.0.1:6379/0"
    # production: daemon processes sharing the run's database and prefixes, each with its own
    # daemon.instance_id (0..999) and its share of the orders, as behind a load balancer
    instances: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1

    def __post_init__(self) -> None:
        if self.instances > 1 and self.kind != "production":
            raise ValueError(f"workload.instances = {self.instances} needs kind = \"production\" (several "
                             f"daemons share one database, RabbitMQ and Redis), not {self.kind!r}")


class Compare(_Strict):
    strategies: list[Literal["per_stage", "shared_pool", "per_order"]] = msgspec.field(
        default_factory=lambda: ["per_stage"])
    repeat: Positive = 1  # rounds of the strategy and advisor runs, interleaved; each reports its median
    capacity: bool = True  # pipeline throughput vs the tightest resource's capacity
    raw_chain: NonNegInt = 0  # items through a raw asyncio.Queue chain (0: skip)
    noop_orders: NonNegInt = 0  # orders through the pipeline with no-op stages, for the overhead ratio
    advisor: bool = False
    advisor_grid: list[Positive] = msgspec.field(default_factory=lambda: [4, 8, 16, 32, 64])  # io pools tried
    advisor_utilisation: Fraction = 0.8  # the busy share each proposed pool is sized for
    advisor_headroom: NonNegative = 2.0  # ... and at least this many sqrt(busy slots) more (small pools)
    peers: list[Literal["celery", "dramatiq"]] = []
    peer_orders: Positive = 1000
    peer_concurrency: Positive = 64  # threads per peer worker process
    peer_processes: Positive = 2


class Scenario(_Strict):
    description: str = ""
    seed: int = 1
    sample_interval: Annotated[float, msgspec.Meta(gt=0)] = 0.25  # seconds between samples
    load: Load = Load()
    workload: Workload = Workload()
    config: dict[str, Any] = {}  # overrides in the format of config/oms.toml
    compare: Compare = Compare()
    smoke: dict[str, Any] = {}  # overrides applied with --smoke
    name: str = ""  # the file's stem (set when loaded)
    source: str = ""


# What --smoke applies to any scenario before its own [smoke] table: seconds, not minutes.
SMOKE = {"load": {"orders": 300, "duration": 0.0, "timeout": 60.0, "stall": 5.0},
         "compare": {"raw_chain": 20000, "noop_orders": 2000, "advisor_grid": [4, 16], "peers": []},
         "sample_interval": 0.1}


def find(ref: str) -> Path:
    """A scenario by name (bench/scenarios/NAME.toml) or by path."""
    path = Path(ref)
    if path.suffix == ".toml" or path.exists():
        if not path.exists():
            raise ScenarioError(f"{ref}: no such scenario file")
        return path
    named = SCENARIO_DIR / f"{ref}.toml"
    if not named.exists():
        known = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
        raise ScenarioError(f"{ref}: no scenario of that name (known: {known})")
    return named


def load(ref: str, *, smoke: bool = False, overrides: dict[str, Any] | None = None) -> Scenario:
    path = find(ref)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    if smoke:
        raw = merge(merge(raw, SMOKE), raw.get("smoke", {}))
    raw = merge(raw, overrides or {})
    raw.update(name=path.stem, source=str(path))
    try:
        return msgspec.convert(raw, Scenario)
    except msgspec.ValidationError as exc:
        raise ScenarioError(f"{path}: {exc}") from None


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, table by table."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_dict(scenario: Scenario) -> dict[str, Any]:
    return msgspec.to_builtins(scenario)
