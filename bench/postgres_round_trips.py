"""What a round trip to PostgreSQL costs the client and the server, by the way it is made.

    .venv/bin/python bench/postgres_round_trips.py --n 5000 [--rows 256]

Loops of `SELECT 1` through asyncpg on uvloop, each printed with wall time,
this process's CPU and every `postgres` process's CPU (user + system, from
/proc, so run it on the database's machine) per iteration:

* a pooled connection acquired and released around each statement, with the
  pool's default reset at release (pg_advisory_unlock_all, CLOSE ALL,
  UNLISTEN *, RESET ALL) and without it (the store's `reset`);
* a held connection, the statement inside a transaction (BEGIN, COMMIT);
* a held connection, the statement alone (autocommit).

Then the parameters of a group commit: `--rows` order rows shaped like the
store's `create_orders` (eight text columns, two times, one of them mostly
null, a ~1 KB document) expanded into rows by the server, per row: every
column as an array (unnest, the store's way), and every column but the
documents as a JSON array (ROWS FROM json_array_elements_text): a fifth of
the client's CPU, a third more of the server's (bench/RESULTS.md: tried and
kept out, as PostgreSQL is the tier several instances share).
"""
from __future__ import annotations

import argparse
import time

import asyncpg
import orjson
import uvloop
from common import server_cpu

COLUMNS = "order_no, source, external_id, kind, state, stage, status, parent_no, doc, at, member_id, wake_at"
TYPES = ("text",) * 8 + ("bytea", "float8", "text", "float8")
AS_ARRAYS = (f"SELECT count(*), sum(length(doc)), sum(at) FROM unnest("
             f"{', '.join(f'${i}::{t}[]' for i, t in enumerate(TYPES, 1))}) AS n({COLUMNS})")
AS_JSON = (f"SELECT count(*), sum(length(doc)), sum(at::float8) FROM ROWS FROM ("
           + ", ".join(f"unnest(${i}::bytea[])" if t == "bytea" else f"json_array_elements_text(${i}::json)"
                       for i, t in enumerate(TYPES, 1)) + f") AS n({COLUMNS})")


async def loop(label: str, step, n: int, per: int = 1, unit: str = "") -> None:
    await step()  # connections open, statements prepared
    wall, cpu, server = time.perf_counter(), time.process_time(), server_cpu()
    for _ in range(n):
        await step()
    wall, cpu, server = time.perf_counter() - wall, time.process_time() - cpu, server_cpu() - server
    n *= per
    print(f"{label + unit:44s} wall {wall / n * 1e6:5.1f} us  client {cpu / n * 1e6:5.1f} us  "
          f"server {server / n * 1e6:5.1f} us")


def json_columns(rows: list[tuple]) -> list:
    """Every column but the documents as one JSON array (documents as bytea[])."""
    return [list(column) if isinstance(column[0], bytes) else orjson.dumps(column).decode()
            for column in zip(*rows)]


def order_rows(n: int) -> list[tuple]:
    doc = ('{"consignee":{"name":"张三","city":"上海市"},"lines":[' + ",".join(
        f'{{"line_no":{i},"sku":"SKU-{i:05d}","qty":2,"unit_price":1999,"warehouse":"WH-EAST-01"}}'
        for i in range(9)) + "]}").encode()
    return [(f"OMS{i:013d}", "platform", f"EXT-{i}", "third_party", "queued", "risk_check", "IN_FULFILMENT",
             None if i % 3 else f"OMS{i + 1:013d}", doc, 1765000000.0 + i / 1000, f"M{i % 977}",
             None if i % 5 else 1765000100.25) for i in range(n)]


async def main(url: str, n: int, rows: int) -> None:
    async def kept(conn: asyncpg.Connection) -> None:
        pass

    default = await asyncpg.create_pool(url, min_size=1, max_size=1)
    no_reset = await asyncpg.create_pool(url, min_size=1, max_size=1, reset=kept)
    conn = await asyncpg.connect(url)
    try:
        async def pooled(pool: asyncpg.Pool) -> None:
            async with pool.acquire() as c:
                await c.fetchval("SELECT 1")

        async def in_transaction() -> None:
            async with conn.transaction():
                await conn.fetchval("SELECT 1")

        async def alone() -> None:
            await conn.fetchval("SELECT 1")

        await loop("pool acquire/release, default reset", lambda: pooled(default), n)
        await loop("pool acquire/release, no reset query", lambda: pooled(no_reset), n)
        await loop("held connection, BEGIN + statement + COMMIT", in_transaction, n)
        await loop("held connection, statement alone", alone, n)

        batch = order_rows(rows)
        arrays, as_json = await conn.prepare(AS_ARRAYS), await conn.prepare(AS_JSON)
        expected = await arrays.fetchrow(*[list(c) for c in zip(*batch)])
        assert tuple(await as_json.fetchrow(*json_columns(batch))) == tuple(expected), "the two encodings differ"
        times = max(1, n // rows * 4)
        await loop("order rows as arrays (unnest, the store's)",
                   lambda: arrays.fetchrow(*[list(c) for c in zip(*batch)]), times, rows, ", per row")
        await loop("order rows as JSON columns", lambda: as_json.fetchrow(*json_columns(batch)),
                   times, rows, ", per row")
    finally:
        await conn.close()
        await default.close()
        await no_reset.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--rows", type=int, default=256, help="order rows a group commit passes")
    args = parser.parse_args()
    uvloop.run(main(args.url, args.n, args.rows))
