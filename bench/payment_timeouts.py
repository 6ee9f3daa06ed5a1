"""Pay deadlines cancelling orders on the production backends, nobody paying.

    .venv/bin/python bench/payment_timeouts.py --orders 200000 --rate 1000 --deadline 200

The daemon's App (oms_pipeline.app.build) runs in this process on PostgreSQL (a
fresh database, dropped afterwards), RabbitMQ (timers and outbox under a fresh
prefix, deleted afterwards) and Redis (a fresh key prefix, deleted
afterwards), with `payment.timeout = --deadline` and simulated downstream
systems. Shop orders (ToC, paid online) go through intake (stock reserved,
stored, pay deadline armed on RabbitMQ) at `--rate` a second. With
`--deadline` >= orders / rate every order waits at once before the first
deadline passes: that many pay-deadline timers are pending on the broker.
Nobody pays, so each timer fires and the pipeline's `expire_payment` cancels
its order (a compare-and-set on the store, the stock release and the events
written to the outbox, then relayed).

The simulated downstream systems run in this process too. `--downstream-state
file` (the default) keeps their per-order state out of it, as an operator
would for a long run: `downstream.effect_log` in a fresh temporary directory
(deleted afterwards) with `retain_effects = false`, so the effect log's keys
and results and the inventory's reservations live in that SQLite file.
`--downstream-state memory` keeps them in dicts (the embedded default, with
`retain_effects = false`): the process then grows with every order.

Reported: the create rate; the timers pending on the broker at the peak; the
process RSS before the first create, at the peak and at the end; the cancel
lag, from each order's deadline to its cancel committed (the pipeline's end
listener), p50 / p99 / max; in file mode the file's size and its commits
(bench/rabbitmq_timers.py measures the timers adapter alone).
"""
from __future__ import annotations

import argparse
import array
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import anyio
from common import rss_mb
from rabbitmq_intake import AMQP, PG, REDIS, admin, cleanup

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oms_pipeline import app as app_module  # noqa: E402
from oms_pipeline import config, routing  # noqa: E402
from oms_pipeline.adapters.postgres_store import migrate  # noqa: E402
from oms_pipeline.daemon import tune_gc  # noqa: E402
from oms_pipeline.generator import generate  # noqa: E402

BATCH = 100  # orders per intake call


def shop_orders(n: int, seed: int) -> Iterator[dict[str, Any]]:
    """Generated requests as standard-delivery ToC orders paid online, made lazily."""
    for i, r in enumerate(generate(n, seed)):
        out = {**r, "kind": "toc", "source": "app", "remark": "", "payment_method": "online",
               "external_id": f"bench-pt-{seed}-{i}", "delivery_promise": "standard", "presale": False}
        out["lines"] = [{k: v for k, v in line.items() if k != "delivery_date"} for line in r["lines"]]
        if r["kind"] != "toc":
            out["amounts"] = {}
            out["lines"] = [{**line, "qty": min(line["qty"], 5)} for line in out["lines"]]
        yield out


class Cancels:
    """Lag of every pay-timeout cancel, preallocated so it does not count in the RSS."""

    def __init__(self, n: int) -> None:
        self.lags = array.array("d", bytes(8 * n))
        self.count = 0
        self.first = self.last = 0.0  # when the first and the last cancel committed
        self.done = anyio.Event()
        self.expected = n

    def on_end(self, end: str, reason: str, order: Any) -> None:
        if end != routing.CANCELLED or order.pay_deadline is None:
            return
        now = time.time()
        self.first, self.last = self.first or now, now
        if self.count < len(self.lags):
            self.lags[self.count] = now - order.pay_deadline
        self.count += 1
        if self.count >= self.expected:
            self.done.set()


async def create_all(app: Any, n: int, seed: int, rate: float, workers: int = 4) -> tuple[int, float]:
    """Create n orders in batches, each batch no earlier than its slot at `rate`; returns
    (created, seconds)."""
    requests = shop_orders(n, seed)
    slots = iter(range(0, n, BATCH))
    started = time.perf_counter()
    created = 0

    async def worker() -> None:
        nonlocal created
        for k in slots:
            await anyio.sleep(max(0.0, started + k / rate - time.perf_counter()))
            batch = [next(requests) for _ in range(min(BATCH, n - k))]
            answers = await app.intake.create(batch)
            created += sum(c.created for c in answers)

    async with anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(worker)
    return created, time.perf_counter() - started


def percentile(ordered, q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def downstream(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    """The `[downstream]` table: per-order state in a SQLite file in `folder`, or in memory."""
    table: dict[str, Any] = {"seed": args.seed, "retain_effects": False}
    if args.downstream_state == "file":
        table["effect_log"] = str(Path(folder) / "downstream.sqlite3")
    return table


async def run(args: argparse.Namespace) -> None:
    db_name, prefix = f"oms_bench_{secrets.token_hex(4)}", f"oms-bench-{secrets.token_hex(4)}"
    await admin(f"CREATE DATABASE {db_name}")
    try:
        await migrate(f"{PG}/{db_name}")
        with tempfile.TemporaryDirectory(prefix="oms-bench-") as folder:
            settings = config.from_mapping({
                "store": {"url": f"{PG}/{db_name}"}, "metrics": {"port": 0},
                "routing": {"file": str(ROOT / "config" / "routes.toml")},
                "payment": {"timeout": args.deadline},
                "broker": {"url": AMQP, "prefix": prefix},
                "coordination": {"url": REDIS, "prefix": f"{prefix}:"},
                "downstream": downstream(args, folder),
            })
            app = await app_module.build(settings)
            try:
                await measure(app, args)
            finally:
                await app.aclose()
            report_file(app)
    finally:
        await cleanup(db_name, prefix)


def report_file(app: Any) -> None:
    if app.effects.file is None:
        return
    path = Path(app.effects.path)
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))  # with its -wal and -shm
    print(f"downstream state file: {size / 2 ** 20:.0f} MB, {app.effects.commits:,} commits, "
          f"{app.effects.count():,} effects")


async def measure(app: Any, args: argparse.Namespace) -> None:
    cancels = Cancels(args.orders)
    app.pipeline.listeners.append(cancels.on_end)
    async with anyio.create_task_group() as tg:
        await tg.start(app.pipeline.run)
        rss_before = rss_mb()
        created, seconds = await create_all(app, args.orders, args.seed, args.rate)
        cancels.expected = created
        pending = await app.pipeline.timers.refresh_pending()
        rss_peak, cancelled_at_peak = rss_mb(), cancels.count
        with anyio.move_on_after(args.deadline + args.timeout):
            await cancels.done.wait()
        rss_end = rss_mb()
        tg.cancel_scope.cancel()
    lags = sorted(cancels.lags[i] for i in range(min(cancels.count, len(cancels.lags))))
    print(f"orders={args.orders} deadline={args.deadline:g}s tiers={app.pipeline.timers.topology.tiers} "
          f"downstream state: {args.downstream_state}")
    print(f"created {created:,} in {seconds:.1f}s = {created / seconds:,.0f}/s; pending on the broker after the "
          f"last create: {created - cancelled_at_peak:,} pay deadlines in {pending:,} messages "
          f"(cancelled by then: {cancelled_at_peak:,})")
    print(f"rss: before {rss_before:.1f} MB, at the peak {rss_peak:.1f} MB, at the end {rss_end:.1f} MB")
    rate = cancels.count / max(cancels.last - cancels.first, 1e-9)
    print(f"cancelled {cancels.count:,}/{created:,} at {rate:,.0f}/s; re-parked {app.pipeline.timers.reparked:,}; "
          + (f"lag p50 {percentile(lags, 0.5) * 1000:.0f} ms, p99 {percentile(lags, 0.99) * 1000:.0f} ms, "
             f"max {lags[-1] * 1000:.0f} ms" if lags else "nothing cancelled"))


if __name__ == "__main__":
    tune_gc()  # as the daemon does
    ap = argparse.ArgumentParser()
    ap.add_argument("--orders", type=int, default=200_000)
    ap.add_argument("--rate", type=float, default=2500.0, help="orders created a second")
    ap.add_argument("--deadline", type=float, default=90.0, help="payment.timeout, seconds")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=300.0, help="give up this long after the last deadline")
    ap.add_argument("--downstream-state", choices=("file", "memory"), default="file",
                    help="where the simulated systems keep their per-order state (see the docstring)")
    anyio.run(run, ap.parse_args(), backend_options={"use_uvloop": True})
