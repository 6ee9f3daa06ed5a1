"""The 16 fulfilment stages of seed 001, one module each, in pipeline order."""
from __future__ import annotations

import importlib

from oms_pipeline.stage import StageSpec

STAGE_NAMES = (
    "notify_paid", "risk_check", "gifts", "fill", "allocate", "voucher", "split", "audit",
    "presale", "effective_time", "waybill", "erp_stock", "flow_limit", "reissue_sms", "invoice",
    "dispatch_wms",
)


def load_specs() -> dict[str, StageSpec]:
    """Every stage's spec, by name (each module defines SPEC)."""
    return {name: importlib.import_module(f"stages.{name}").SPEC for name in STAGE_NAMES}
