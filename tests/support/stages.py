"""A stage context on real simulated downstream systems, for stage unit tests."""
from __future__ import annotations

from typing import Any

from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.adapters.simulated import EffectLog, SimSettings, build_simulated_ports
from oms_pipeline.clock import VirtualClock
from oms_pipeline.stage import StageContext, StageSpec


async def stage_context(spec: StageSpec, settings: dict[str, Any] | None = None, sim: dict[str, Any] | None = None,
                        clock: VirtualClock | None = None) -> tuple[StageContext, EffectLog]:
    """(context, effect log): the stage's defaults overridden by `settings`; `sim` configures the systems."""
    clock = clock or VirtualClock()
    log = EffectLog()
    await log.open()
    ports = build_simulated_ports(SimSettings.from_mapping(sim or {}), clock, log)
    return StageContext(spec.name, {**spec.defaults, **(settings or {})}, ports, LocalCoordination(clock), clock), log
