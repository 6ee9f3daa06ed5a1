"""PostgreSQL, then Redis, restarted under load while the daemon runs on the production backends.

Orders keep arriving over HTTP (a client that, like any upstream system, sends a
request again when it gets 503) while the database server restarts and then
Redis does. The daemon reconnects by itself: /readyz names the dependency that
is down while it is down; stage boundaries wait for the store and are written
when it is back; afterwards every order taken in has reached its end, none was
taken in twice, and downstream effects stayed keyed to their orders.

(The RabbitMQ restart under load is in tests/test_rabbitmq_intake.py.)
"""
from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from oms_pipeline.adapters import postgres_store
from oms_pipeline.adapters.simulated.effects import read_effects
from oms_pipeline.generator import generate
from tests.conftest import require_service
from tests.support.daemon import Daemon, production_backends, write_config
from tests.support.postgres import fresh_postgres_database
from tests.support.rabbitmq import delete_topology

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

N = 600
PLAIN = {"kind": "tob", "source": "sales_plan", "payment_method": "none", "remark": "",
         "delivery_promise": "standard", "presale": False}


def postgres(action: str) -> None:
    clusters = os.listdir("/etc/postgresql")
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", clusters[0], "main", action],
                   check=True, capture_output=True, timeout=120)


def redis_restart() -> None:
    subprocess.run(["redis-cli", "shutdown", "nosave"], capture_output=True, timeout=30)
    subprocess.run(["redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
                    "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
                    "--logfile", "/var/log/redis/ci.log"], check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 30
    while subprocess.run(["redis-cli", "ping"], capture_output=True, text=True).stdout.strip() != "PONG":
        assert time.monotonic() < deadline, "redis did not come back"
        time.sleep(0.1)


class Client(threading.Thread):
    """Sends every order until it is answered 200/201; 503 (a dependency is down) is sent again."""

    def __init__(self, d: Daemon, orders: list[dict]) -> None:
        super().__init__(daemon=True)
        self.d, self.orders = d, orders
        self.numbers: dict[str, str] = {}
        self.retries = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for order in self.orders:
                while True:
                    try:
                        status, body = self.d.post("/orders", order)
                    except OSError:
                        status, body = 0, None
                    if status in (200, 201):
                        self.numbers[order["external_id"]] = body["order_no"]
                        break
                    assert status in (0, 503), (status, body)
                    self.retries += 1
                    time.sleep(0.1)
                time.sleep(0.005)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc


def down_while(d: Daemon, what: str, action) -> dict:
    """Run `action` (which takes `what` down and up again) and return a /readyz answer naming it."""
    seen: list[dict] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                status, body = d.get("/readyz")
            except OSError:
                continue
            if status == 503:
                seen.append(body)
            time.sleep(0.05)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        action()
        deadline = time.monotonic() + 60
        while d.get("/readyz")[0] != 200:
            assert time.monotonic() < deadline, d.get("/readyz")
            time.sleep(0.1)
    finally:
        stop.set()
        watcher.join(5)
    named = [body for body in seen if what in body.get("unreachable", ())]
    assert named, (what, seen[:3])
    return named[0]


def pg_restart() -> None:
    postgres("stop")
    time.sleep(3)  # long enough for the readiness probe (cached for 1 s) to see it
    postgres("start")


def redis_down_up() -> None:
    subprocess.run(["redis-cli", "shutdown", "nosave"], capture_output=True, timeout=30)
    time.sleep(3)
    redis_restart()


async def test_postgresql_then_redis_restart_under_load_loses_and_duplicates_nothing(tmp_path: Path):
    require_service("Redis", "127.0.0.1", 6379)
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"oms-restart-{uuid.uuid4().hex[:8]}"
    async with fresh_postgres_database() as url:
        await postgres_store.migrate(url)
        extra = f"""
{production_backends(prefix)}[downstream]
effect_log = "{tmp_path / 'effects.sqlite3'}"
"""
        config, port = write_config(tmp_path, extra, store_url=url)
        orders = [{**r, **PLAIN, "external_id": f"RESTART-{i}"} for i, r in enumerate(generate(N, 31))]
        d = Daemon(config, port).start()
        client = Client(d, orders)
        try:
            client.start()
            while len(client.numbers) < N // 4:
                time.sleep(0.05)
            pg = down_while(d, "store", pg_restart)
            assert pg["error"].startswith("not ready")
            while len(client.numbers) < N // 2:
                time.sleep(0.05)
            down_while(d, "redis", redis_down_up)
            client.join(300)
            assert client.error is None and len(client.numbers) == N, client.error
            assert len(set(client.numbers.values())) == N  # one order per request, retries included
            deadline = time.monotonic() + 180
            while True:
                states = [d.get(f"/orders/{no}")[1]["state"] for no in client.numbers.values()]
                if all(s in ("done", "split", "manual", "cancelled") for s in states):
                    break
                assert time.monotonic() < deadline, {s: states.count(s) for s in set(states)}
                time.sleep(1)
            log = d.log_path.read_text()
            assert '"event":"store_unavailable"' in log  # boundaries waited for the store and went on
            # Each done order was dispatched under its own keys, once (a stage replayed after the
            # store came back asked again with the same key: the downstream kept the first answer).
            effects = read_effects(str(tmp_path / "effects.sqlite3"))
            dispatched = {key.split(":")[0] for key, system, op, *_ in effects if op == "dispatch"}
            assert dispatched <= set(client.numbers.values()) | {no for no in dispatched if "-" in no}
            assert len(dispatched) >= states.count("done") // 2  # (virtual goods ship without a dispatch)
        finally:
            d.stop()
            await delete_topology(prefix)
