"""Orders per second through the RabbitMQ intake queue, on the production backends.

    .venv/bin/python bench/rabbitmq_intake.py --orders 20000

A burst as a group-buy closing makes it: N orders (generated, needing no
payment, passing audit) are published to `<prefix>.intake.orders` with
publisher confirms BEFORE the daemon starts, then `run_pipeline.py` starts as
a subprocess on PostgreSQL (a fresh database, migrated, dropped afterwards),
RabbitMQ (timers and intake under a fresh prefix, deleted afterwards) and
Redis (a fresh key prefix, deleted afterwards), with simulated downstream
systems at zero latency. Measured from the daemon answering /readyz:

* intake rate: orders taken in (created, acked) per second until all N are in;
* end-to-end rate: orders per second until every one has reached its end
  (done, split into children that are done, or cancelled) through the 16 stages.

Both include the 16 stages running on the same two cores: intake only goes as
fast as the first stage's queue takes orders (backpressure).
"""
from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aio_pika
import asyncpg
import orjson
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oms_pipeline.adapters.postgres_store import migrate  # noqa: E402
from oms_pipeline.adapters.rabbitmq_intake import RabbitIntake  # noqa: E402
from oms_pipeline.config import IntakeSettings  # noqa: E402
from oms_pipeline.generator import generate  # noqa: E402

PLAIN = {"kind": "tob", "source": "sales_plan", "payment_method": "none", "remark": "",
         "delivery_promise": "standard", "presale": False}
PG = "postgresql://postgres@127.0.0.1:5432"
AMQP = "amqp://guest:guest@127.0.0.1:5672/"
REDIS = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bodies(n: int, seed: int) -> list[bytes]:
    return [orjson.dumps({**r, **PLAIN, "external_id": f"bench-q-{seed}-{i}"}) for i, r in enumerate(generate(n, seed))]


async def admin(statement: str) -> None:
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def publish_all(prefix: str, payloads: list[bytes], settings: IntakeSettings, in_flight: int = 500) -> float:
    """Declare the intake topology as the daemon will, then publish every order (confirmed); returns msg/s."""
    declare = RabbitIntake(AMQP, prefix=prefix, settings=settings)
    await declare.open()
    await declare.close()
    connection = await aio_pika.connect(AMQP)
    started = time.perf_counter()
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = f"{prefix}.intake.orders"
        for i in range(0, len(payloads), in_flight):
            await asyncio.gather(*(channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                 content_type="application/json"), queue, mandatory=True)
                for body in payloads[i:i + in_flight]))
    return len(payloads) / (time.perf_counter() - started)


def write_config(tmp: Path, db: str, prefix: str, args: argparse.Namespace) -> tuple[Path, int]:
    port = free_port()
    text = (ROOT / "config" / "oms.toml").read_text()
    text = re.sub(r"(?m)^port = 8480$", f"port = {port}", text)
    text = re.sub(r"(?m)^port = 9480$", "port = 0", text)
    text = re.sub(r'(?m)^url = "sqlite:///var/oms.sqlite3".*$', f'url = "{db}"', text)
    text = text.replace('[broker]\nurl = "memory://"', f'[broker]\nurl = "{AMQP}"\nprefix = "{prefix}"')
    text = text.replace('[coordination]\nurl = "memory://"', f'[coordination]\nurl = "{REDIS}"\nprefix = "{prefix}:"')
    text += f"\n[intake]\nprefetch = {args.prefetch}\nbatch = {args.batch}\nworkers = {args.workers}\n"
    (tmp / "oms.toml").write_text(text)
    shutil.copy(ROOT / "config" / "routes.toml", tmp / "routes.toml")
    return tmp / "oms.toml", port


async def get_json(port: int, url: str):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {url} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)


async def watch(port: int, proc: subprocess.Popen, n: int) -> tuple[float, float, int, dict]:
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited with {proc.returncode}")
        try:
            if (await get_json(port, "/readyz"))[0] == 200:
                break
        except OSError:
            pass
        await asyncio.sleep(0.05)
    started = time.perf_counter()
    base = (await get_json(port, "/stats"))[1]["intake"]
    intake_done = None
    while True:
        stats = (await get_json(port, "/stats"))[1]
        if intake_done is None and stats["intake"] >= n:
            intake_done = time.perf_counter()
        orders = stats["orders"]
        if intake_done is not None and not any(orders.get(s) for s in ("queued", "parked", "wait_pay")):
            return intake_done - started, time.perf_counter() - started, base, orders
        await asyncio.sleep(0.1)


async def cleanup(db_name: str, prefix: str) -> None:
    await admin(f"DROP DATABASE IF EXISTS {db_name} WITH (FORCE)")
    ctl = shutil.which("rabbitmqctl")
    names = {"queues": [], "exchanges": []}
    if ctl:
        for what in names:
            out = subprocess.run([ctl, "-q", f"list_{what}", "name"], capture_output=True, text=True).stdout
            names[what] = [x for x in out.split() if x.startswith(prefix + ".")]
    connection = await aio_pika.connect(AMQP)
    async with connection:
        channel = await connection.channel()
        for name in names["queues"]:
            await channel.queue_delete(name)
        for name in names["exchanges"]:
            await channel.exchange_delete(name)
    r = aioredis.from_url(REDIS)
    async for key in r.scan_iter(f"{prefix}:*"):
        await r.delete(key)
    await r.aclose()


async def run(args: argparse.Namespace) -> None:
    db_name, prefix = f"oms_bench_{secrets.token_hex(4)}", f"oms-bench-{secrets.token_hex(4)}"
    tmp = Path(tempfile.mkdtemp(prefix="oms-bench-intake-"))
    await admin(f"CREATE DATABASE {db_name}")
    proc = None
    try:
        await migrate(f"{PG}/{db_name}")
        settings = IntakeSettings(prefetch=args.prefetch, batch=args.batch, workers=args.workers)
        print(f"publishing {args.orders} orders ...", file=sys.stderr)
        publish_rate = await publish_all(prefix, bodies(args.orders, args.seed), settings)
        config, port = write_config(tmp, f"{PG}/{db_name}", prefix, args)
        log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 - the daemon's output for its lifetime
        proc = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(config)],
                                cwd=tmp, stdout=log, stderr=log)
        intake_s, total_s, before_ready, orders = await watch(port, proc, args.orders)
        taken = args.orders - before_ready
        print(f"orders={args.orders} prefetch={args.prefetch} batch={args.batch} workers={args.workers} "
              f"published={publish_rate:,.0f}/s intake={taken / intake_s:,.0f} orders/s ({intake_s:.1f} s) "
              f"end_to_end={taken / total_s:,.0f} orders/s ({total_s:.1f} s) "
              f"taken_before_ready={before_ready} orders_by_state={orders}")
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        await cleanup(db_name, prefix)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--prefetch", type=int, default=IntakeSettings().prefetch)
    parser.add_argument("--batch", type=int, default=IntakeSettings().batch)
    parser.add_argument("--workers", type=int, default=IntakeSettings().workers)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
