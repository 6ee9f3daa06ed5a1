"""Sustained `POST /orders` rate over HTTP, against the daemon on the embedded default.

    .venv/bin/python bench/api_create.py --seconds 20 --clients 50

Starts `run_pipeline.py` as a subprocess on a copy of config/oms.toml in a
temporary directory (SQLite store there, a free port, no metrics server) and
drives it with N concurrent aiohttp clients on keep-alive connections, each
posting its next order as soon as the previous answer arrives, for the given
time. The orders need no payment and pass audit (generated requests made
ToB / sales_plan / payment none / no remark / standard delivery), so every
one runs the whole pipeline while intake goes on: the rate is what intake
sustains with the 16 stages and their checkpoints behind it. The clients run
on the same machine, so they take some of its CPU.

Reports creates/s (201 answers per second of the timed run), p50/p99/max
latency of the answers, and where the orders stood when it stopped.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oms_pipeline.generator import generate

PLAIN = {"kind": "tob", "source": "sales_plan", "payment_method": "none", "remark": "",
         "delivery_promise": "standard", "presale": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    text = (ROOT / "config" / "oms.toml").read_text()
    text = re.sub(r"(?m)^port = 8480$", f"port = {port}", text)
    text = re.sub(r"(?m)^port = 9480$", "port = 0", text)
    (tmp / "oms.toml").write_text(text)
    shutil.copy(ROOT / "config" / "routes.toml", tmp / "routes.toml")
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - the daemon's stderr for its lifetime
    proc = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(tmp / "oms.toml")],
                            cwd=tmp, stdout=log, stderr=log)
    return proc, port


async def wait_ready(session: aiohttp.ClientSession, base: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited with {proc.returncode}")
        try:
            async with session.get(base + "/readyz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit("daemon not ready after 30 s")


# --orders shop: ToC orders paid online, as a shop's checkout creates them: intake takes them in
# (validation, stock reservation, the durable create, the pay-deadline timer) and they wait for
# their payment, so the rate is intake's own. --orders plain: orders that need no payment run
# the 16 stages at once, so the rate is capped by the pipeline behind intake.
SHOP = {"kind": "toc", "source": "app", "payment_method": "online", "remark": "", "delivery_promise": "standard",
        "presale": False}


def bodies(n: int, seed: int, kind: str = "plain") -> list[bytes]:
    extra = PLAIN if kind == "plain" else SHOP
    return [orjson.dumps({**r, **extra, "external_id": f"bench-{seed}-{i}"})
            for i, r in enumerate(generate(n, seed))]


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


async def run(seconds: float, clients: int, prepared: int, warmup: float, kind: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="oms-bench-api-"))
    proc, port = start_daemon(tmp)
    base = f"http://127.0.0.1:{port}"
    print(f"generating {prepared} requests ...", file=sys.stderr)
    queue = bodies(prepared, 7, kind)
    taken = 0
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    headers = {"Content-Type": "application/json"}
    try:
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
            await wait_ready(session, base, proc)
            latencies: list[float] = []
            codes: Counter[int] = Counter()
            measuring = False

            async def client(stop_at: float) -> None:
                nonlocal taken
                while time.perf_counter() < stop_at:
                    if taken >= len(queue):
                        return
                    body = queue[taken]
                    taken += 1
                    started = time.perf_counter()
                    async with session.post(base + "/orders", data=body) as resp:
                        await resp.read()
                        status = resp.status
                    if measuring:
                        latencies.append(time.perf_counter() - started)
                        codes[status] += 1

            if warmup:
                await asyncio.gather(*[client(time.perf_counter() + warmup) for _ in range(clients)])
            measuring = True
            started = time.perf_counter()
            await asyncio.gather(*[client(started + seconds) for _ in range(clients)])
            elapsed = time.perf_counter() - started
            async with session.get(base + "/stats") as resp:
                stats = await resp.json()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if taken >= len(queue):
        print("warning: ran out of prepared requests; raise --prepared", file=sys.stderr)
    latencies.sort()
    created = codes.get(201, 0)
    ms = [1000 * percentile(latencies, q) for q in (0.5, 0.99)]
    print(f"orders={kind} clients={clients} seconds={elapsed:.1f} creates={created} rate={created / elapsed:,.0f} creates/s "
          f"p50={ms[0]:.1f}ms p99={ms[1]:.1f}ms max={1000 * latencies[-1]:.1f}ms answers={dict(codes)} "
          f"orders_by_state={stats['orders']} in_flight={stats['in_flight']} cpus={os.cpu_count()}")
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the timed run")
    parser.add_argument("--prepared", type=int, default=80_000, help="requests generated before the run")
    parser.add_argument("--orders", choices=("plain", "shop"), default="plain",
                        help="plain: no payment, the whole pipeline runs behind intake; shop: ToC orders "
                             "waiting for their payment (intake alone)")
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    asyncio.run(run(args.seconds, args.clients, args.prepared, args.warmup, args.orders))


if __name__ == "__main__":
    main()
