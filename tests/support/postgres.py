"""A fresh PostgreSQL database per test on the local server, dropped afterwards."""
from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from typing import AsyncIterator

import asyncpg

from tests.conftest import require_service

PG_SERVER = "postgresql://postgres@127.0.0.1:5432"


@asynccontextmanager
async def fresh_postgres_database() -> AsyncIterator[str]:
    """A new, empty database on the local server for one test (its URL), dropped afterwards."""
    require_service("PostgreSQL", "127.0.0.1", 5432)
    name = f"oms_test_{secrets.token_hex(6)}"
    await _admin(f"CREATE DATABASE {name}")
    try:
        yield f"{PG_SERVER}/{name}"
    finally:
        await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(f"{PG_SERVER}/postgres")
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
