"""Running `cpu` stage handlers, inline or in a process pool (DESIGN R-1.1).

Workers start with forkserver, never fork: a forked child would inherit the
running event loop, its signal wake-up fd and open sockets. Workers ignore
SIGINT/SIGTERM so that systemd's stop signal reaches only the parent, which
drains first and then shuts the pool down.
"""
from __future__ import annotations

import importlib
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

from .outcome import Outcome, PermanentError, manual, retry
from .stage import CpuContext


def make_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"),
                               initializer=_ignore_stop_signals)


def _ignore_stop_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def handler_ref(handler: Callable) -> tuple[str, str]:
    """How a worker process finds the handler: by module and name, not by pickling code."""
    return handler.__module__, handler.__qualname__


_handlers: dict[tuple[str, str], Callable] = {}


def _resolve(ref: tuple[str, str]) -> Callable:
    handler = _handlers.get(ref)
    if handler is None:
        obj: Any = importlib.import_module(ref[0])
        for part in ref[1].split("."):
            obj = getattr(obj, part)
        handler = _handlers[ref] = obj
    return handler


def run_one(handler: Callable, order: Any, ctx: CpuContext) -> Outcome:
    try:
        result = handler(order, ctx)
    except PermanentError as exc:
        return manual(f"{ctx.stage}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a handler failure becomes a retry, never a crash
        return retry(f"{ctx.stage}: {type(exc).__name__}: {exc}")
    if type(result) is not Outcome:
        return manual(f"{ctx.stage}: handler returned {type(result).__name__}, not an Outcome")
    return result


def run_chunk(ref: tuple[str, str], orders: list[Any], ctx: CpuContext) -> list[tuple[Outcome, Any]]:
    """Runs in a worker process: the handler mutates each order, so send the orders back."""
    handler = _resolve(ref)
    return [(run_one(handler, order, ctx), order) for order in orders]
