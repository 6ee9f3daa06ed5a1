"""Park N pay-deadline timers on RabbitMQ delay queues and let them fire.

    .venv/bin/python bench/rabbitmq_timers.py --timers 200000 --deadline 60

Each timer is armed the way intake arms a pay deadline: due `--deadline` seconds
after it is scheduled, on the tiers the daemon uses with `payment.timeout =
--deadline` (the default ladder plus that timeout), so it parks once.
`--spread S` adds 0-S s at random to every deadline: those walk the ladder
(30-60 s spread: `--deadline 30 --spread 30`, what the first version measured).
The consumer runs from the start, as in the daemon (`--consume-after`: only
once scheduling is done). Reports the schedule rate (each schedule awaits its
publisher confirm; `--concurrency` of them in flight), the process RSS before
and after scheduling and at the end (it should stay flat: the process keeps
nothing per parked timer), how many timers came back early and were re-parked,
and the lag of firing after `at`.

What "firing" is: the adapter handing the timer to its callback, which here
only records the time; the pipeline's cancel behind it (expire_payment, a
compare-and-set on the store) is measured by bench/payment_timeouts.py. Lags
and a seen-flag per timer are preallocated before the first RSS reading so
they do not count.
"""
from __future__ import annotations

import argparse
import array
import random
import time
from uuid import uuid4

import aio_pika
import anyio
from common import rss_mb

from oms_pipeline.adapters.rabbitmq_timers import DEFAULT_PREFETCH, DEFAULT_TIERS, RabbitTimers, with_deadlines
from oms_pipeline.clock import SystemClock
from oms_pipeline.daemon import tune_gc


class Firings:
    """Lag per timer, and how many fired more than once."""

    def __init__(self, n: int) -> None:
        self.lags = array.array("d", bytes(8 * n))
        self.seen = bytearray(n)
        self.count = self.duplicates = 0
        self.first = self.last = 0.0  # when the first and the last timer fired
        self.done = anyio.Event()

    async def on_due(self, due) -> None:
        now = time.time()
        self.first, self.last = self.first or now, now
        for d in due:
            i = int(d.order_no)
            if self.seen[i]:
                self.duplicates += 1
                continue
            self.seen[i] = 1
            self.lags[i] = now - d.at
            self.count += 1
        if self.count == len(self.seen):
            self.done.set()


async def schedule_all(timers: RabbitTimers, n: int, deadline: float, spread: float, concurrency: int) -> None:
    """Timers generated lazily by `concurrency` workers: the bench itself holds nothing per timer."""
    next_index = iter(range(n))

    async def worker() -> None:
        for i in next_index:
            await timers.schedule("pay_deadline", str(i), time.time() + deadline + random.uniform(0, spread))

    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)


async def delete_topology(url: str, timers: RabbitTimers) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in timers.topology.queues:
            await channel.queue_delete(name)
        for name in timers.topology.exchanges:
            await channel.exchange_delete(name)


def percentile(ordered, q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def main(args) -> None:
    tiers = args.tiers or with_deadlines(DEFAULT_TIERS, (args.deadline,))  # as app.py builds them
    timers = RabbitTimers(args.url, SystemClock(), prefix=f"oms-bench-{uuid4().hex[:8]}",
                          tiers=tiers, prefetch=args.prefetch)
    firings = Firings(args.timers)
    await timers.open()
    try:
        async with anyio.create_task_group() as tg:
            if not args.consume_after:
                tg.start_soon(timers.run, firings.on_due)
            rss_before = rss_mb()
            started = time.perf_counter()
            await schedule_all(timers, args.timers, args.deadline, args.spread, args.concurrency)
            scheduled = time.perf_counter() - started
            rss_after = rss_mb()
            pending = await timers.refresh_pending()
            if args.consume_after:
                tg.start_soon(timers.run, firings.on_due)
            with anyio.move_on_after(args.deadline + args.spread + args.timeout):
                await firings.done.wait()
            rss_end = rss_mb()
            tg.cancel_scope.cancel()
    finally:
        await timers.close()
        await delete_topology(args.url, timers)
    lags = sorted(firings.lags[i] for i in range(args.timers) if firings.seen[i])
    print(f"timers={args.timers} deadline={args.deadline:g}s+0-{args.spread:g}s tiers={tiers} "
          f"concurrency={args.concurrency} prefetch={args.prefetch} consumer="
          f"{'after scheduling' if args.consume_after else 'from the start'}")
    print(f"schedule: {scheduled:.1f}s = {args.timers / scheduled:,.0f} timers/s; pending after: {pending:,}")
    print(f"rss: before {rss_before:.1f} MB, after scheduling {rss_after:.1f} MB, at the end {rss_end:.1f} MB")
    print(f"re-parked {timers.reparked:,}; fired {firings.count:,}/{args.timers:,} "
          f"(duplicates {firings.duplicates}) at {firings.count / max(firings.last - firings.first, 1e-9):,.0f}/s; "
          f"early {sum(x < 0 for x in lags)}; "
          f"lag p50 {percentile(lags, 0.5) * 1000:.0f} ms, p99 {percentile(lags, 0.99) * 1000:.0f} ms, "
          f"max {lags[-1] * 1000:.0f} ms" if lags else "nothing fired")


if __name__ == "__main__":
    tune_gc()  # as the daemon does
    ap = argparse.ArgumentParser()
    ap.add_argument("--timers", type=int, default=200_000)
    ap.add_argument("--deadline", type=float, default=60.0, help="pay timeout: seconds from scheduling to `at`")
    ap.add_argument("--spread", type=float, default=0.0, help="add 0..SPREAD s at random to each deadline")
    ap.add_argument("--concurrency", type=int, default=500, help="schedules awaiting a confirm at once")
    ap.add_argument("--prefetch", type=int, default=DEFAULT_PREFETCH)
    ap.add_argument("--tiers", type=lambda v: tuple(float(t) for t in v.split(",")), default=None,
                    help="comma-separated seconds (default: the daemon's ladder plus --deadline)")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up this long after the last deadline")
    ap.add_argument("--consume-after", action="store_true",
                    help="start consuming only after scheduling (RSS then measures scheduling alone)")
    ap.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    anyio.run(main, ap.parse_args(), backend_options={"use_uvloop": True})
