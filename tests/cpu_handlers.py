"""`cpu` handlers for the process-pool test: top-level, importable by worker processes."""
import os

from oms_pipeline.outcome import NEXT


def record_pid(order, ctx):
    order.results["pid"] = os.getpid()
    order.results["threshold"] = ctx.settings.get("threshold")
    return NEXT


def explode(order, ctx):
    raise ValueError("bad amounts")
