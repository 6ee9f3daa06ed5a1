"""Structured logs: one JSON object a line, personal data masked.

Every record carries the fields passed in `extra=` (order_no, stage,
request_id, event, ...). Names, phone numbers and addresses are masked before
they are written, wherever they appear in those fields.
"""
from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from typing import Any

import orjson

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

PERSONAL_KEYS = frozenset({"name", "phone", "mobile", "address", "detail", "consignee", "recipient"})
_PHONE = re.compile(r"(?<!\d)(1\d{2})\d{4}(\d{4})(?!\d)")
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def mask_phone(text: str) -> str:
    return _PHONE.sub(r"\1****\2", text)


def mask_name(name: str) -> str:
    return name[:1] + "*" * max(1, len(name) - 1) if name else name


def mask(key: str, value: Any) -> Any:
    """Mask a personal value by what its key says it is; recurse into containers."""
    if isinstance(value, dict):
        return {k: mask(k, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask(key, v) for v in value]
    if not isinstance(value, str):
        return value
    if key in ("name", "recipient"):
        return mask_name(value)
    if key in ("phone", "mobile"):
        return value[:3] + "****" + value[-4:] if len(value) >= 8 else "****"
    if key in PERSONAL_KEYS:
        return "***"
    return mask_phone(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": mask_phone(record.getMessage()),
        }
        rid = request_id.get()
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = mask(key, value)
        if record.exc_info:
            out["error"] = mask_phone(self.formatException(record.exc_info))
        return orjson.dumps(out, default=str).decode()


def setup(level: str = "info", stream: Any = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.Formatter.converter = time.gmtime
