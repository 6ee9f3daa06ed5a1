"""A group-buy burst on the embedded default: N third-party orders at once.

    .venv/bin/python bench/embedded_burst.py --orders 50000 [--no-checkpoint] [--writer process|loop]

Seed 001: a group-buy closing pushes tens of thousands of third-party orders at
once; the pipeline must absorb them at its own rate with bounded memory. This
runs the real 16 stages on the embedded default (SQLite store, checkpoint at
every stage boundary, in-process timers) with zero-latency simulated
downstream systems. Orders are generated lazily and fed in batches of 500 (as
a broker consumer with prefetch delivers them); intake waits whenever the
first stage's queue is full, so what the process holds is bounded by the
queues, not by the burst. `--no-checkpoint` sets every stage `checkpoint =
false` (README "Durability"); `--writer` is `store.writer`.
"""
from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import anyio
from common import rss_mb

from oms_pipeline import app as app_module
from oms_pipeline import config
from oms_pipeline.daemon import tune_gc
from oms_pipeline.generator import generate

ROOT = Path(__file__).resolve().parent.parent
BURST = {"kind": "third_party", "source": "platform", "payment_method": "none", "remark": "",
         "delivery_promise": "standard", "presale": False}



async def main(n: int, batch: int, db: str, checkpoint: bool, writer: str) -> None:
    url = "memory://" if db == "memory" else f"sqlite:///{db}"
    kinds = {kind: {"pool": pool, "checkpoint": checkpoint} for kind, pool in (("io", 32), ("cpu", 2))}
    settings = config.from_mapping({"store": {"url": url, "writer": writer}, "metrics": {"port": 0},
                                    "downstream": {"retain_effects": False}, "stage_defaults": kinds,
                                    "routing": {"file": str(ROOT / "config" / "routes.toml")}})
    app = await app_module.build(settings)
    p = app.pipeline
    peak = rss_mb()
    most_in_flight = 0
    async with anyio.create_task_group() as tg:
        await tg.start(p.run)
        started = time.perf_counter()
        pending: list[dict] = []
        for request in generate(n, 42):
            pending.append({**request, **BURST})
            if len(pending) == batch:
                await app.intake.create(pending)
                pending = []
                peak = max(peak, rss_mb())
                most_in_flight = max(most_in_flight, len(p.in_flight))
        if pending:
            await app.intake.create(pending)
        fed = time.perf_counter() - started
        while len(p.in_flight):
            await anyio.sleep(0.05)
            peak = max(peak, rss_mb())
        elapsed = time.perf_counter() - started
        tg.cancel_scope.cancel()
    counts = await p.store.counts()
    commits = getattr(p.store, "commits", 0)
    await app.aclose()  # (effects.count() stays readable after close)
    top = n
    print(f"orders={n} elapsed={elapsed:.1f}s rate={top / elapsed:,.0f} orders/s (intake done after {fed:.1f}s) "
          f"peak_rss={peak:.0f}MB max_rss={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MB "
          f"most_in_flight={most_in_flight} effects_remembered_by_simulators={app.effects.count()} "
          f"states={counts} commits={commits}")


if __name__ == "__main__":
    tune_gc()  # as the daemon does
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--db", default="")
    ap.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                    help="stages checkpoint = false: only rests, ends and status changes are written")
    ap.add_argument("--writer", choices=("process", "loop"), default="process", help="store.writer")
    args = ap.parse_args()
    db = args.db or str(Path(tempfile.mkdtemp()) / "oms.sqlite3")
    anyio.run(main, args.orders, args.batch, db, args.checkpoint, args.writer, backend_options={"use_uvloop": True})
