"""take_capacity calls per second on Redis, from concurrent tasks.

    .venv/bin/python bench/redis_capacity.py --calls 50000 --tasks 50

Each call is one EVALSHA of the capacity script (a new holder on one of 100
keys, limit high enough that all are granted), through a pool of 32
connections, on uvloop. Compare with PERF_NOTES: `SET NX EX` from 50 tasks,
~13-15k/s. The client's CPU per call is printed too: it, not Redis, is the
limit (hiredis, redis-py's C parser and packer, is a dependency for it). The
keys live under a throwaway prefix and are deleted afterwards.
"""
from __future__ import annotations

import argparse
import time
from uuid import uuid4

import anyio

from oms_pipeline.adapters.redis_coordination import RedisCoordination

KEYS = 100


async def worker(c: RedisCoordination, first: int, step: int, calls: int) -> None:
    for i in range(first, calls, step):  # task `first` makes calls first, first+step, ...
        await c.take_capacity(f"flow:WH{i % KEYS}:20240101", f"O{i}", calls, 3600)


async def delete_keys(c: RedisCoordination) -> None:
    keys = [key async for key in c.client.scan_iter(match=c.prefix + "*", count=500)]
    if keys:
        await c.client.delete(*keys)


async def main(url: str, calls: int, tasks: int) -> None:
    async with RedisCoordination(url, prefix=f"oms-bench:{uuid4().hex}:") as c:
        try:
            await worker(c, 0, 1, 100)  # load the script and open connections first
            await delete_keys(c)
            started, cpu = time.perf_counter(), time.process_time()
            async with anyio.create_task_group() as tg:
                for t in range(tasks):
                    tg.start_soon(worker, c, t, tasks, calls)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
        finally:
            await delete_keys(c)
    print(f"take_capacity calls={calls} tasks={tasks} elapsed={elapsed:.2f}s "
          f"rate={calls / elapsed:,.0f} calls/s client_cpu={cpu / calls * 1e6:.1f}us/call")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--calls", type=int, default=50_000)
    parser.add_argument("--tasks", type=int, default=50)
    args = parser.parse_args()
    anyio.run(main, args.url, args.calls, args.tasks, backend_options={"use_uvloop": True})
