"""A fulfilment stage: its name, kind and handler (DESIGN R-1.1).

`io` handlers are coroutines that talk to downstream ports; `cpu` handlers are
pure functions of the order (they may run in a worker process, so they only see
the order, the clock reading and their own settings).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Union

if TYPE_CHECKING:
    from .order import Order
    from .outcome import Outcome


@dataclass(frozen=True, slots=True)
class CpuContext:
    """What a `cpu` handler may read. Picklable, so it crosses to worker processes."""

    stage: str
    now: float
    settings: Mapping[str, Any]


@dataclass(slots=True)
class StageContext:
    """What an `io` handler may use: downstream ports, coordination, the clock."""

    stage: str
    settings: Mapping[str, Any]
    ports: Any  # oms_pipeline.ports.downstream.Ports
    coordination: Any  # oms_pipeline.ports.coordination.Coordination
    clock: Any  # oms_pipeline.clock.Clock

    def now(self) -> float:
        return self.clock.now()

    def key(self, order: "Order") -> str:
        """The idempotency key of this stage's downstream effect for this order."""
        return f"{order.order_no}:{self.stage}"


IoHandler = Callable[["Order", StageContext], Awaitable["Outcome"]]
CpuHandler = Callable[["Order", CpuContext], "Outcome"]


@dataclass(frozen=True, slots=True)
class StageSpec:
    name: str
    kind: str  # "io" | "cpu"
    handler: Union[IoHandler, CpuHandler]
    description: str = ""
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the stage's own settings

    def __post_init__(self) -> None:
        if self.kind not in ("io", "cpu"):
            raise ValueError(f"stage {self.name}: kind must be 'io' or 'cpu', not {self.kind!r}")
