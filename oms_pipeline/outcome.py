"""What a stage handler says happened to an order (DESIGN R-1.2)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .order import Order

OUTCOMES = ("next", "skip", "park", "retry", "cancel", "manual", "split")


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    reason: str = ""
    until: float | None = None  # park: resume this stage at this time
    delay: float | None = None  # retry: wait this long (else the stage's backoff)
    children: tuple["Order", ...] = ()  # split: child orders that flow on by themselves


NEXT = Outcome("next")
SKIP = Outcome("skip")


def skip(reason: str = "") -> Outcome:
    return _skip(reason) if reason else SKIP


@functools.lru_cache(maxsize=1024)
def _skip(reason: str) -> Outcome:
    # Outcomes are immutable, and a stage skips many orders for one reason ("virtual order:
    # ..."): one Outcome per reason instead of a frozen dataclass built per order.
    return Outcome("skip", reason)


def park(until: float, reason: str) -> Outcome:
    """Come back to this same stage at `until` (clock seconds)."""
    return Outcome("park", reason, until=until)


def retry(reason: str, delay: float | None = None) -> Outcome:
    return Outcome("retry", reason, delay=delay)


def cancel(reason: str) -> Outcome:
    return Outcome("cancel", reason)


def manual(reason: str) -> Outcome:
    return Outcome("manual", reason)


def split(children: "list[Order]", reason: str = "") -> Outcome:
    return Outcome("split", reason, children=tuple(children))


class PermanentError(Exception):
    """A failure that retrying cannot fix: the order goes to manual at once."""


class TransientError(Exception):
    """A failure worth retrying (timeouts, a downstream system unavailable)."""
