"""Typed, frozen settings loaded from TOML with environment overrides.

An unknown key or a bad value stops startup with the file, the key and the
reason (`ConfigError`). Environment variables `OMS__SECTION__KEY=value` override
the file; the value is read as a TOML value when it parses as one (numbers,
booleans, quoted strings), else as a plain string.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "oms.toml"

Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class ConfigError(Exception):
    """The configuration cannot be used; the message names file, key and reason."""


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class RetrySettings(_Frozen):
    max_attempts: Positive = 5
    base_delay: NonNegative = 0.5
    factor: Annotated[float, msgspec.Meta(ge=1)] = 2.0
    max_delay: NonNegative = 60.0
    jitter: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.2


class StageSettings(_Frozen):
    """Per-stage runtime settings. Unset values fall back to [stage_defaults.<kind>]."""

    pool: Positive | None = None
    queue: Positive | None = None
    timeout: PositiveFloat | None = None
    batch: Positive | None = None
    mode: Literal["inline", "process"] | None = None  # cpu stages only
    # False: an order that goes straight on to its next stage after this one is not checkpointed
    # here (it is at the next checkpoint; a crash replays the stage, its effects keyed).
    checkpoint: bool | None = None
    retry: RetrySettings | None = None
    settings: dict[str, Any] = {}  # the stage's own business settings


class KindDefaults(_Frozen):
    pool: Positive
    queue: Positive = 1000
    timeout: PositiveFloat = 10.0
    batch: Positive = 256
    mode: Literal["inline", "process"] = "inline"
    # Unset: io stages write every boundary; cpu stages none of their straight hops on (a cpu handler
    # is a pure function of the order with no downstream effect: after a crash it simply runs again).
    checkpoint: bool | None = None


class StageDefaults(_Frozen):
    io: KindDefaults = KindDefaults(pool=32)
    cpu: KindDefaults = KindDefaults(pool=2)
    retry: RetrySettings = RetrySettings()


class DaemonSettings(_Frozen):
    instance_id: Annotated[int, msgspec.Meta(ge=0, le=999)] = 0
    shutdown_grace: NonNegative = 10.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    order_no_key: str = "change-me-in-production"
    process_workers: Positive = 2  # size of the shared process pool for `cpu` stages in process mode


class StoreSettings(_Frozen):
    url: str = "sqlite:///var/oms.sqlite3"
    checkpoint_max_batch: Positive = 5000
    synchronous: Literal["normal", "full"] = "normal"  # SQLite only
    writer: Literal["process", "loop"] = "process"  # SQLite only: where its commits run
    # PostgreSQL only: group commits in flight at once, each on a pool connection of its own
    writers: Annotated[int, msgspec.Meta(ge=1, le=7)] = 2
    # Several instances on one database: an instance not heard of for this many seconds is
    # presumed dead and its queued orders are taken over (it renews every third of it).
    lease: PositiveFloat = 15.0


class BrokerSettings(_Frozen):
    url: str = "memory://"
    prefix: str = "oms"  # names of the exchanges and queues on RabbitMQ
    # Delay-queue tiers in seconds: a timer walks down them; it fires at most half the smallest tier late.
    # Every payment timeout is added as a tier (app.py), so a pay deadline parks once.
    delay_tiers: Annotated[tuple[PositiveFloat, ...], msgspec.Meta(min_length=1)] = (1, 5, 30, 120, 600, 3600, 21600)
    # The sweeper (safety net behind the timers): every sweep_interval seconds it fires wake-ups and
    # pay deadlines overdue by more than sweep_grace seconds, ones the broker lost, and restarts this
    # instance's queued orders unwritten for sweep_grace seconds that nothing here works on.
    sweep_interval: PositiveFloat = 60.0
    sweep_grace: NonNegative = 30.0


class CoordinationSettings(_Frozen):
    url: str = "memory://"
    prefix: str = "oms:"  # namespace of every Redis key


class HttpSettings(_Frozen):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8480
    token: str = ""
    max_body_bytes: Positive = 1_048_576


class MetricsSettings(_Frozen):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 9480  # 0: no metrics server


class IntakeSettings(_Frozen):
    max_lines: Positive = 200
    queue: Positive = 2000  # orders accepted but not yet in the first stage
    # RabbitMQ intake queues (broker.url amqp://; oms_pipeline/adapters/rabbitmq_intake.py).
    prefetch: Positive = 500  # unacked deliveries per queue: what the daemon holds when the pipeline is full
    batch: Positive = 250  # most messages one handler call takes (orders: one create)
    workers: Positive = 2  # handler calls in flight per queue
    delivery_limit: Positive = 5  # attempts at a message that keeps failing before it is dead-lettered
    # Seconds before retry n (the last one repeats): one TTL queue per distinct delay.
    retry_delays: Annotated[tuple[PositiveFloat, ...], msgspec.Meta(min_length=1)] = (1.0, 5.0, 30.0)


class PaymentSettings(_Frozen):
    timeout: PositiveFloat = 600.0  # seconds an online order waits for payment (seed 001: 10 min)
    timeout_by_kind: dict[str, PositiveFloat] = {}

    def timeout_for(self, kind: str) -> float:
        return self.timeout_by_kind.get(kind, self.timeout)


class StockSettings(_Frozen):
    """Reservations at intake (oms_pipeline/stock.py)."""

    # Seconds a reservation may stay neither confirmed nor released before the reconciler
    # settles it; unset: the longest payment timeout + 300 (an unpaid order is cancelled first).
    reservation_ttl: PositiveFloat | None = None
    reconcile_interval: PositiveFloat = 60.0  # seconds between reconciler passes

    def ttl(self, payment: "PaymentSettings") -> float:
        if self.reservation_ttl is not None:
            return self.reservation_ttl
        return max([payment.timeout, *payment.timeout_by_kind.values()]) + 300.0


class ReverseSettings(_Frozen):
    # Once an order with this flag (or of this kind) has passed the stage, a buyer's or seller's
    # cancel is refused (customer service, risk and arbitration may still cancel).
    no_cancel_after: dict[str, str] = msgspec.field(default_factory=lambda: {"o2o_pickup": "dispatch_wms"})
    refund_freight_on_return: bool = False  # a cancel always gives freight back; a return by policy
    return_approval: Literal["auto", "merchant"] = "auto"  # merchant: a person approves each return
    retry_interval: PositiveFloat = 5.0  # seconds between attempts at requests that could not finish


class RelaySettings(_Frozen):
    """The outbox relay (oms_pipeline/relay.py) and, on RabbitMQ, the consumer that hands the
    published commands to the simulated downstream systems (adapters/rabbitmq_downstream.py)."""

    batch: Positive = 500  # outbox rows per claim; on RabbitMQ all of them are in flight at once
    lanes: Positive = 2  # claim-publish loops side by side (one publishes while another waits for confirms)
    lease: PositiveFloat = 30.0  # seconds a claim keeps other instances off the rows (a dead relay's lapse)
    idle_sleep: PositiveFloat = 0.2  # longest pause between polls of an empty outbox
    max_backoff: PositiveFloat = 60.0  # longest wait before retrying a failed batch or a refused row
    confirm_timeout: PositiveFloat = 10.0  # seconds a publish may wait for the broker's confirm
    mandatory_events: bool = False  # true: an event no queue is bound for is an error and stays in the outbox
    events_per_message: Positive = 100  # RabbitMQ: events of one topic packed into one message (1: one each)
    concurrency: Positive = 32  # embedded: commands applied at once in-process
    downstream_prefetch: Positive = 200  # RabbitMQ consumer: unacked commands held (and applied at once)
    downstream_max_retries: Annotated[int, msgspec.Meta(ge=0)] = 5  # transient failures before dead-lettering
    downstream_retry_delay: PositiveFloat = 0.5  # seconds before the first retry, doubling (capped at 30)


class RoutingSettings(_Frozen):
    file: str = "routes.toml"  # relative to the config file


class Settings(_Frozen):
    daemon: DaemonSettings = DaemonSettings()
    store: StoreSettings = StoreSettings()
    broker: BrokerSettings = BrokerSettings()
    coordination: CoordinationSettings = CoordinationSettings()
    http: HttpSettings = HttpSettings()
    metrics: MetricsSettings = MetricsSettings()
    intake: IntakeSettings = IntakeSettings()
    payment: PaymentSettings = PaymentSettings()
    stock: StockSettings = StockSettings()
    reverse: ReverseSettings = ReverseSettings()
    relay: RelaySettings = RelaySettings()
    routing: RoutingSettings = RoutingSettings()
    stage_defaults: StageDefaults = StageDefaults()
    stages: dict[str, StageSettings] = {}
    downstream: dict[str, Any] = {}  # simulated downstream systems (see adapters/simulated.py)
    source: str = ""  # the file this came from (set by load())
    base_dir: str = ""  # relative paths in the file are taken from here


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Settings:
    """Read, override from the environment, and validate a config file."""
    path = Path(path) if path else DEFAULT_CONFIG
    raw = read_toml(path, ConfigError, "config file")
    _apply_env(raw, os.environ if env is None else env, path)
    return from_mapping(raw, source=str(path), base_dir=str(path.resolve().parent))


def read_toml(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """A TOML file's tables, or `error` naming the file and what is wrong with it."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such {what}") from None
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from None


def from_mapping(raw: dict[str, Any], *, source: str = "<mapping>", base_dir: str = ".") -> Settings:
    data = dict(raw, source=source, base_dir=base_dir)
    stages = data.get("stages", {})
    if isinstance(stages, dict):  # one by one, so an error names the stage, not `stages[...]`
        data["stages"] = {name: _convert(table, StageSettings, source, f"stages.{name}")
                          for name, table in stages.items()}
    return _convert(data, Settings, source, "")


def _convert(data: Any, kind: type, source: str, prefix: str) -> Any:
    try:
        return msgspec.convert(data, kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(exc, prefix)}") from None


def _explain(exc: msgspec.ValidationError, prefix: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.http.port`"; lead with the key.
    reason, _, at = str(exc).partition(" - at `$")
    key = ".".join(filter(None, [prefix, at.rstrip("`").lstrip(".")]))
    unknown = re.match(r"Object contains unknown field `(\w+)`", reason)
    if unknown:
        return f"key {'.'.join(filter(None, [key, unknown[1]]))}: unknown key"
    return f"key {key}: {reason}" if key else reason


def _apply_env(raw: dict[str, Any], env: Any, path: Path) -> None:
    for name, text in env.items():
        if not name.startswith("OMS__"):
            continue
        keys = [k.lower() for k in name[5:].split("__")]
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: env {name}: {key} is not a table")
        node[keys[-1]] = _env_value(text)


def _env_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve_path(settings: Settings, relative: str) -> Path:
    """A path from the config file, taken relative to the file's folder."""
    p = Path(relative)
    return p if p.is_absolute() else Path(settings.base_dir) / p
