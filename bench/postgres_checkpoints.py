"""Checkpoints/s through PostgresStore: concurrent callers each checkpointing batches.

    .venv/bin/python bench/postgres_checkpoints.py --callers 16 --batch 256 --rounds 40 --writers 2 [--think-ms 20] [--lines 18]

Like the pipeline's stages: each caller owns `batch` orders and, round after
round, checkpoints all of them in one call (one stage boundary for a batch of
orders, ~1.3 KB documents) and waits for it to be durable before the next.
Runs on a fresh database on the server given (created, migrated, dropped).
Prints this process's CPU and every postgres process's CPU per checkpoint
(run it on the database's machine).
"""
from __future__ import annotations

import argparse
import random
import time

import anyio
import orjson
from common import fresh_database, server_cpu

from oms_pipeline.adapters.postgres_store import PostgresStore
from oms_pipeline.ports.store import QUEUED, Checkpoint, NewOrder


def document(order_no: str, n_lines: int) -> bytes:
    """A JSON order document: 18 lines make ~1.3 KB, 2 lines ~270 bytes."""
    lines = [{"sku": f"SKU-{i:05d}", "qty": 1 + i % 3, "price": 1999 + i, "warehouse": "WH-EAST-01"}
             for i in range(n_lines)]
    doc = {"order_no": order_no, "member_id": "M" + order_no[-4:], "kind": "toc", "lines": lines,
           "address": {"city": "Hangzhou", "street": "1 Example Road", "zip": "310000"}}
    return orjson.dumps(doc)


def new_order(order_no: str, n_lines: int) -> NewOrder:
    return NewOrder(order_no, "bench", order_no, "toc", QUEUED, "s0", "IN_FULFILMENT", time.time(),
                    document(order_no, n_lines))


def checkpoint(order: NewOrder, round_no: int) -> Checkpoint:
    return Checkpoint(order.order_no, f"s{round_no}", "next", "", time.time(), QUEUED, f"s{round_no + 1}",
                      "IN_FULFILMENT", 0, None, order.doc)


async def caller(store: PostgresStore, orders: list[NewOrder], rounds: int, think: float) -> None:
    for round_no in range(rounds):
        if think:  # stage work of varying length: callers drift apart instead of moving in lockstep
            await anyio.sleep(random.uniform(0, think))
        await store.checkpoint([checkpoint(o, round_no) for o in orders])


async def run(url: str, args: argparse.Namespace) -> None:
    store = PostgresStore(url, writers=args.writers, pool_size=max(args.writers + 1, 4))
    await store.open()
    groups = [[new_order(f"1{c:03d}{i:06d}", args.lines) for i in range(args.batch)] for c in range(args.callers)]
    for group in groups:
        await store.create(group)
    commits = store.commits
    started, cpu, server = time.perf_counter(), time.process_time(), server_cpu()
    async with anyio.create_task_group() as tg:
        for group in groups:
            tg.start_soon(caller, store, group, args.rounds, args.think_ms / 1000)
    elapsed, cpu, server = time.perf_counter() - started, time.process_time() - cpu, server_cpu() - server
    commits = store.commits - commits
    await store.close()
    total = args.callers * args.batch * args.rounds
    print(f"callers={args.callers} batch={args.batch} rounds={args.rounds} writers={args.writers} think_ms={args.think_ms} "
          f"doc={len(groups[0][0].doc)}B checkpoints={total} elapsed={elapsed:.2f}s "
          f"rate={total / elapsed:,.0f} checkpoints/s commits={commits} "
          f"records/commit={total / max(1, commits):,.0f} "
          f"client_cpu={cpu / total * 1e6:.1f}us server_cpu={server / total * 1e6:.1f}us per checkpoint")


async def main(args: argparse.Namespace) -> None:
    async with fresh_database(args.server) as url:
        await run(url, args)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    ap.add_argument("--callers", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--lines", type=int, default=18, help="lines per order document (its size)")
    ap.add_argument("--think-ms", type=float, default=0.0, help="random pause of up to this before each call")
    anyio.run(main, ap.parse_args(), backend_options={"use_uvloop": True})
