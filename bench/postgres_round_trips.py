"""What a round trip to PostgreSQL costs the client and the server, by the way it is made.

    .venv/bin/python bench/postgres_round_trips.py --n 5000

Loops of `SELECT 1` through asyncpg on uvloop, each printed with wall time,
this process's CPU and every `postgres` process's CPU (user + system, from
/proc, so run it on the database's machine) per iteration:

* a pooled connection acquired and released around each statement, with the
  pool's default reset at release (pg_advisory_unlock_all, CLOSE ALL,
  UNLISTEN *, RESET ALL) and without it (the store's `reset`);
* a held connection, the statement inside a transaction (BEGIN, COMMIT);
* a held connection, the statement alone (autocommit).
"""
from __future__ import annotations

import argparse
import os
import time

import asyncpg
import uvloop


def server_cpu() -> float:
    """CPU seconds of every postgres process (reaped children included)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        if name == "postgres":
            total += sum(int(x) for x in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


async def loop(label: str, step, n: int) -> None:
    await step()  # connections open, statements prepared
    wall, cpu, server = time.perf_counter(), time.process_time(), server_cpu()
    for _ in range(n):
        await step()
    wall, cpu, server = time.perf_counter() - wall, time.process_time() - cpu, server_cpu() - server
    print(f"{label:44s} wall {wall / n * 1e6:5.0f} us  client {cpu / n * 1e6:5.0f} us  "
          f"server {server / n * 1e6:5.0f} us")


async def main(url: str, n: int) -> None:
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
    finally:
        await conn.close()
        await default.close()
        await no_reset.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--n", type=int, default=5000)
    args = parser.parse_args()
    uvloop.run(main(args.url, args.n))
