"""Settings of the simulated downstream systems, from the config's `[downstream]` table.

Latency distribution and failure rate per system, a seed, ERP and inventory
stock, the fraud rule and the product catalogue. A bad value raises
`SimSettingsError` naming its key.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Annotated, Any, Literal, Mapping, get_args, get_origin

import msgspec

SYSTEMS = ("notification", "finance", "product", "risk", "purchasing", "tms", "erp", "wms",
           "supplier", "invoice", "inventory", "accounts")


NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Rate = Annotated[float, msgspec.Meta(ge=0, le=1)]
BasisPoints = Annotated[int, msgspec.Meta(ge=0, le=10_000)]
Score = Annotated[int, msgspec.Meta(ge=0, le=100)]


class SimSettingsError(ValueError):
    """A `[downstream]` value cannot be used; the message starts with its key."""


class _Frozen(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class Latency(_Frozen):
    """A per-call delay in milliseconds. mean_ms = 0 means no sleep at all."""

    dist: Literal["fixed", "uniform", "exponential", "lognormal"] = "fixed"
    mean_ms: NonNegative = 0.0
    spread_ms: NonNegative | None = None  # uniform: half-width around the mean (default: the mean)
    sigma: Annotated[float, msgspec.Meta(gt=0)] = 0.5  # lognormal: std dev of log(latency)
    max_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None  # cap on the tail

    def __post_init__(self) -> None:
        if self.spread_ms is not None and self.spread_ms > self.mean_ms:
            raise ValueError(f"spread_ms ({self.spread_ms}) must not exceed mean_ms ({self.mean_ms}): "
                             "latencies cannot be negative")

    def draw_ms(self, u: float) -> float:
        """The latency for a uniform draw u in (0, 1) (inverse CDF, so hashes map to delays)."""
        mean = self.mean_ms
        if self.dist == "fixed" or mean == 0:
            ms = mean
        elif self.dist == "uniform":
            spread = mean if self.spread_ms is None else self.spread_ms
            ms = mean - spread + 2 * spread * u
        elif self.dist == "exponential":
            ms = -mean * math.log(1 - u)
        else:  # lognormal with the given arithmetic mean
            mu = math.log(mean) - self.sigma ** 2 / 2
            ms = math.exp(mu + self.sigma * NormalDist().inv_cdf(u))
        return min(ms, self.max_ms) if self.max_ms is not None else ms


class ErpSim(_Frozen):
    default_stock: Count = 1_000_000  # per (sku, warehouse) not listed in `stock`
    stock: dict[str, dict[str, Count]] = {}  # warehouse -> sku -> qty
    shortage_rate: Rate = 0.0  # chance a line is short whatever the stock (hash of key and line)


class InventorySim(_Frozen):
    default_stock: Count = 1_000_000  # initial sellable per (sku, warehouse) not listed
    stock: dict[str, dict[str, Count]] = {}  # warehouse -> sku -> sellable


class RiskSim(_Frozen):
    cheat_members: frozenset[str] = frozenset()  # always score 100
    cheat_phones: frozenset[str] = frozenset()
    base_max: Annotated[int, msgspec.Meta(ge=1, le=100)] = 40  # ordinary scores: [0, base_max)
    large_amount_cents: Count = 500_000
    large_amount_points: Score = 30  # added at or above large_amount_cents


class ProductSim(_Frozen):
    default_tax_rate_bp: BasisPoints = 1300
    tax_rates: dict[str, BasisPoints] = {}
    bundles: dict[str, list[tuple[str, Positive, Positive]]] = {}  # sku -> (component, qty, weight)
    generate_bundles: bool = True  # an unlisted sku gets 2-3 components derived from its name


class SimSettings(_Frozen):
    seed: int = 0
    latency: dict[str, Latency] = {}  # per system; "default" for the unlisted ones
    failure_rate: dict[str, Rate] = {}  # per system; "default" for the unlisted ones
    erp: ErpSim = ErpSim()
    inventory: InventorySim = InventorySim()
    risk: RiskSim = RiskSim()
    product: ProductSim = ProductSim()
    effect_log: str = ""  # SQLite file for a durable EffectLog; "" keeps the log in memory
    # Keep every effect's payload in memory. Off with `effect_log`: nothing per key in memory at
    # all, keys, results and reservations live in the file (state_file.py): for long runs.
    retain_effects: bool = True

    def __post_init__(self) -> None:
        for table in ("latency", "failure_rate"):
            for name in getattr(self, table):
                if name != "default" and name not in SYSTEMS:
                    raise SimSettingsError(f"downstream.{table}.{name}: unknown system "
                                           f"(known: default, {', '.join(SYSTEMS)})")

    def latency_for(self, system: str) -> Latency:
        return self.latency.get(system) or self.latency.get("default") or _NO_LATENCY

    def failure_rate_for(self, system: str) -> float:
        return self.failure_rate.get(system, self.failure_rate.get("default", 0.0))

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> "SimSettings":
        """Build from a config table; a bad value raises SimSettingsError naming its key."""
        return _convert(raw or {}, cls, "downstream")


_NO_LATENCY = Latency()


def _convert(value: Any, tp: Any, where: str) -> Any:
    """msgspec.convert, walked by hand through tables so an error names the exact key."""
    if get_origin(tp) is dict:
        if not isinstance(value, Mapping):
            raise SimSettingsError(f"{where}: expected a table, got {type(value).__name__}")
        value_type = get_args(tp)[1]
        return {str(k): _convert(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        if not isinstance(value, Mapping):
            raise SimSettingsError(f"{where}: expected a table, got {type(value).__name__}")
        fields = {f.name: f.type for f in msgspec.structs.fields(tp)}
        for name in value:
            if name not in fields:
                raise SimSettingsError(f"{where}.{name}: unknown key (known: {', '.join(fields)})")
        kwargs = {name: _convert(v, fields[name], f"{where}.{name}") for name, v in value.items()}
        try:
            return tp(**kwargs)
        except SimSettingsError:
            raise
        except (ValueError, TypeError) as exc:
            raise SimSettingsError(f"{where}: {exc}") from None
    try:
        return msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if " - at `$" in text:  # inside a list/tuple: "... - at `$[0][2]`"
            reason, at = text.rsplit(" - at `$", 1)
            raise SimSettingsError(f"{where}{at.rstrip('`')}: {reason}") from None
        raise SimSettingsError(f"{where}: {text}") from None

