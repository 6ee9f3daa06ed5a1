"""SQL lives in .sql files: numbered migrations and named queries (`-- name: x`)."""
from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def queries(dialect: str) -> dict[str, str]:
    text = resources.files("oms_pipeline").joinpath(f"sql/{dialect}/queries.sql").read_text()
    parts = _NAME.split(text)[1:]
    return {name: body.strip().rstrip(";") for name, body in zip(parts[::2], parts[1::2])}


def migrations(dialect: str) -> list[tuple[int, str, str]]:
    """(version, name, sql) for every `NNN_name.sql`, in order."""
    folder = resources.files("oms_pipeline").joinpath(f"sql/{dialect}")
    found = []
    for entry in folder.iterdir():
        match = re.fullmatch(r"(\d+)_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text()))
    return sorted(found)
