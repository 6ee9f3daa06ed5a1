"""The answer of a request handled outside HTTP too (payments, reverse requests, reports): an
HTTP-like status and a JSON body, so the API and the broker intake give the same answers."""
from __future__ import annotations

from typing import Any, NamedTuple


class Answer(NamedTuple):
    status: int
    body: dict[str, Any]


def problem(status: int, reason: str, **extra: Any) -> Answer:
    return Answer(status, {"error": reason, **extra})
