"""The store's create statement (`create_orders`: order_keys, then orders) per row, as it is and
with the orders insert given back its old `ON CONFLICT DO NOTHING`, interleaved.

    .venv/bin/python bench/postgres_creates.py --rounds 24 --batch 500

Each round inserts `batch` new orders (~1.4 KB documents) in one transaction, the two
statements taking turns (which goes first alternates). Prints the median wall time of a row
and PostgreSQL's CPU a row (every postgres process; run it on the database's machine). Runs on
a fresh database on the server given (created, migrated, dropped).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import anyio
import asyncpg
from common import fresh_database, server_cpu

from oms_pipeline.adapters.postgres_store import _statement

PLAIN = "FROM n JOIN k USING (order_no)\nRETURNING"
CONFLICT = "FROM n JOIN k USING (order_no)\nON CONFLICT DO NOTHING\nRETURNING"


async def main(args: argparse.Namespace) -> None:
    async with fresh_database(args.server) as url:
        conn = await asyncpg.connect(url)
        try:
            await measure(conn, args)
        finally:
            await conn.close()


async def measure(conn: asyncpg.Connection, args: argparse.Namespace) -> None:
    doc = os.urandom(700).hex().encode()
    wall: dict[str, list[float]] = {"as it is": [], "ON CONFLICT DO NOTHING": []}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    n = 0
    for i in range(args.rounds):
        names = list(wall) if i % 2 == 0 else list(reversed(wall))
        for variant in names:
            rows = []
            for _ in range(args.batch):
                n += 1
                rows.append((f"1261208000000{n:017d}", "bench", f"ext-{n}", "toc", "queued", "risk_check",
                             "IN_FULFILMENT", None, doc, time.time(), f"M{n % 50_000}", None))
            query, *values = _statement("create_orders", rows)
            assert PLAIN in query
            if variant != "as it is":
                query = query.replace(PLAIN, CONFLICT)
            before, started = server_cpu(), time.perf_counter()
            async with conn.transaction():
                created = await conn.fetch(query, *values, "bench")
            wall[variant].append((time.perf_counter() - started) / args.batch)
            cpu[variant].append((server_cpu() - before) / args.batch)
            assert len(created) == args.batch
    for variant in wall:
        print(f"{variant}: {1e6 * statistics.median(wall[variant][2:]):.1f} us a row (median), "
              f"PostgreSQL CPU {1e6 * statistics.mean(cpu[variant][2:]):.1f} us a row (mean)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--batch", type=int, default=500)
    anyio.run(main, ap.parse_args())
