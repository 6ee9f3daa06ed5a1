"""Celery and Dramatiq on RabbitMQ running the same stage mix, side by side with the pipeline.

Each order is a chain of one task per stage (Celery `chain`, Dramatiq
`pipeline`): every hop is a broker round trip with its own ack, which is how
a Python team would build these stages on those libraries. Workers run in
processes of their own (started here, stopped by their process group); the
orders are sent at once from this process, and the last task of each order
pushes its latency to Redis. Both are optional (`pip install -e .[bench-peers]`):
a peer that is not installed is reported as such.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from . import synthetic
from .peer_mix import PeerMix
from .probe import cpu_seconds, percentiles, tree_rss_mb
from .scenario import Scenario

MODULES = {"celery": ("celery",), "dramatiq": ("dramatiq", "pika")}


def missing(peer: str) -> list[str]:
    return [m for m in MODULES[peer] if importlib.util.find_spec(m) is None]


def run(peer: str, scenario: Scenario, profiles: list[synthetic.Profile], progress: bool) -> dict[str, Any]:
    lacking = missing(peer)
    if lacking:
        return {"label": peer, "skipped": f"not installed ({', '.join(lacking)}): pip install -e '.[bench-peers]'"}
    w, c = scenario.workload, scenario.compare
    mix = PeerMix(f"omsbench{peer}{secrets.token_hex(3)}", w.rabbitmq, w.redis,
                  [(p.kind, p.wait_ms / 1000, synthetic.stage_settings(p, "fixed", 0, 0).get("iterations", 0))
                   for p in profiles])
    os.environ.update(mix.to_env())  # the producer side reads it at import, as the workers do
    module = importlib.import_module(f"oms_pipeline.benchmark.peer_{peer}")
    log = tempfile.NamedTemporaryFile(prefix=f"oms-bench-{peer}-", suffix=".log", delete=False)
    workers = [subprocess.Popen(_command(peer, c.peer_processes, c.peer_concurrency), env={**os.environ},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        return _measure(peer, module, mix, c.peer_orders, workers[0].pid, progress, log.name,
                        {"processes": c.peer_processes, "threads": c.peer_concurrency})
    finally:
        for p in workers:
            _stop(p)
        _cleanup(mix, peer)


def _command(peer: str, processes: int, threads: int) -> list[str]:
    """Both peers get `processes` worker processes with `threads` threads in all."""
    per = max(1, threads // processes)
    if peer == "celery":
        # One Celery worker per process (each a thread pool): celery's own multi-process mode is prefork.
        script = (f"import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-m', 'celery', '-A', "
                  f"'oms_pipeline.benchmark.peer_celery', 'worker', '-P', 'threads', '-c', '{per}', "
                  f"'-n', f'w{{i}}@%h', '--loglevel', 'WARNING', '--without-gossip', '--without-mingle', "
                  f"'--without-heartbeat']) for i in range({processes})]; [p.wait() for p in ps]")
        return [sys.executable, "-c", script]
    return [sys.executable, "-m", "dramatiq", "oms_pipeline.benchmark.peer_dramatiq", "-p", str(processes),
            "-t", str(per)]


def _measure(peer: str, module: Any, mix: PeerMix, n: int, pid: int, progress: bool, log: str,
             config: dict[str, Any]) -> dict[str, Any]:
    import redis
    r = redis.Redis.from_url(mix.redis)
    try:
        if not _warm_up(module, r, mix):
            return {"label": peer, "skipped": f"its workers did not answer within 60 s (log: {log})"}
        cpu0, peak = cpu_seconds(pid), 0.0
        started = time.perf_counter()
        cpu_self0 = time.process_time()
        for i in range(n):
            module.send(i, time.time())
        done, last, last_change = 0, 0, time.perf_counter()
        while done < n and time.perf_counter() - last_change < 30:
            time.sleep(0.1)
            done = r.llen(mix.done_key)
            peak = max(peak, tree_rss_mb(pid))
            if done != last:
                last, last_change = done, time.perf_counter()
            if progress:
                rate = done / (time.perf_counter() - started)
                print(f"\r{peer:<22} {done}/{n} done, {rate:,.0f}/s", end="", file=sys.stderr, flush=True)
        elapsed = last_change - started
        if progress:
            print(file=sys.stderr)
        latencies = [float(x) for x in r.lrange(mix.done_key, 0, -1)]
        cpu = cpu_seconds(pid) - cpu0 + time.process_time() - cpu_self0
        return {"label": peer, "orders": n, "finished": done, "elapsed_s": round(elapsed, 3),
                "throughput": round(done / elapsed, 1) if elapsed > 0 else 0.0,
                "latency_ms": {k: round(v, 2) for k, v in percentiles(latencies).items()},
                "cpu_seconds": round(cpu, 2), "cpu_cores": round(cpu / elapsed, 2) if elapsed > 0 else 0.0,
                "rss_peak_mb": round(peak, 1), "system": {"workers": config, "broker": "rabbitmq"},
                "version": _version(peer)}
    finally:
        r.delete(mix.done_key)
        r.close()


def _warm_up(module: Any, r: Any, mix: PeerMix) -> bool:
    """One order end to end: the workers are up and the queues exist; then start counting."""
    module.send(-1, time.time())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if r.llen(mix.done_key):
            r.delete(mix.done_key)
            return True
        time.sleep(0.1)
    return False


def _version(peer: str) -> str:
    try:
        from importlib.metadata import version
        return version(peer)
    except Exception:  # noqa: BLE001 - a version is only informative
        return ""


def _stop(p: subprocess.Popen) -> None:
    """Stop the worker processes we started: their process group, politely first."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _cleanup(mix: PeerMix, peer: str) -> None:
    import anyio

    async def delete() -> None:
        import aio_pika
        connection = await aio_pika.connect(mix.broker)
        async with connection:
            for name in (mix.tag, f"{mix.tag}.DQ", f"{mix.tag}.XQ"):
                channel = await connection.channel()  # a failed delete closes its channel
                try:
                    await channel.queue_delete(name)
                except Exception:  # noqa: BLE001 - a queue this peer never declared
                    pass
            channel = await connection.channel()
            try:
                await channel.exchange_delete(mix.tag)  # Celery's exchange of the same name
            except Exception:  # noqa: BLE001 - Dramatiq declares none
                pass

    try:
        anyio.run(delete)
    except Exception:  # noqa: BLE001 - leftover queues are harmless; the run's figures stand
        pass
