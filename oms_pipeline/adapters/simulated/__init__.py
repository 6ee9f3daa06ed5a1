"""Simulated downstream systems for the demo, the tests and the benchmark (DESIGN R-2).

* `settings`: `SimSettings`, from the config's `[downstream]` table;
* `effects`: `EffectLog`, every applied effect with its idempotency key;
* `effect_file`: the log's SQLite file format, and reading it from outside;
* `state_file`: that file on the event-loop thread, when nothing per key stays in memory;
* `reservations`: where the inventory keeps its reservations (memory or that file);
* `systems`: one simulated class per port, built by `build_simulated_ports`.
"""
from .effects import Effect, EffectLog, read_duplicates, read_effects
from .settings import SYSTEMS, ErpSim, InventorySim, Latency, ProductSim, RiskSim, SimSettings, SimSettingsError
from .systems import build_simulated_ports

__all__ = [
    "SYSTEMS", "Effect", "EffectLog", "ErpSim", "InventorySim", "Latency", "ProductSim", "RiskSim",
    "SimSettings", "SimSettingsError", "build_simulated_ports", "read_duplicates", "read_effects",
]
