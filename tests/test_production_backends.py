"""The daemon on PostgreSQL and Redis, run as an operator does: migrate, start, work, restart."""
from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import redis

from tests.conftest import require_service
from tests.support.daemon import ROOT, Daemon, write_config
from tests.support.postgres import fresh_postgres_database
from tests.support.rabbitmq import delete_topology
from tests.test_daemon_lifecycle import plain_orders, wait_all_terminal

pytestmark = [pytest.mark.slow, pytest.mark.anyio]


def redis_coordination(prefix: str) -> str:
    return f'[coordination]\nurl = "redis://127.0.0.1:6379/0"\nprefix = "{prefix}"\n'


def oms(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oms_pipeline.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


async def test_an_unmigrated_database_stops_startup_naming_oms_migrate(tmp_path):
    async with fresh_postgres_database() as url:
        config, _ = write_config(tmp_path, store_url=url)
        done = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(config)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "oms migrate" in done.stderr and "not migrated" in done.stderr


async def test_orders_run_on_postgres_and_redis_and_survive_a_restart(tmp_path):
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"oms-test:{uuid.uuid4().hex}:"
    async with fresh_postgres_database() as url:
        config, port = write_config(tmp_path, redis_coordination(prefix), store_url=url)
        migrated = oms("migrate", "--config", str(config))
        assert migrated.returncode == 0, migrated.stderr
        d = Daemon(config, port).start()
        try:
            for order in plain_orders(40, seed=11):
                assert d.post("/orders", order)[0] == 201
            d.kill()  # mid-run, on purpose
            d = Daemon(config, port).start()
            for order in plain_orders(40, seed=11):  # upstream resends: the same orders, no new ones
                assert d.post("/orders", order)[0] in (200, 201)
            orders = wait_all_terminal(d, 40)
            assert orders.get("manual", 0) == 0 and orders.get("done", 0) >= 40
        finally:
            d.stop()
        counters = redis.Redis(host="127.0.0.1", port=6379)
        try:
            keys = list(counters.scan_iter(f"{prefix}*"))
            assert any(b"flow:" in k for k in keys)  # warehouse capacity was counted in Redis
            for key in keys:
                counters.delete(key)
        finally:
            counters.close()


async def test_pay_deadlines_fire_through_rabbitmq_delay_queues(tmp_path):
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"oms-test-{uuid.uuid4().hex[:8]}"
    config, port = write_config(tmp_path, f"""
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/"
prefix = "{prefix}"
delay_tiers = [0.5, 1.0]
[payment]
timeout = 2.0
""")
    from oms_pipeline.generator import generate
    online = [{**r, "kind": "toc", "source": "app", "payment_method": "online", "remark": "",
               "delivery_promise": "standard", "presale": False} for r in generate(6, 5)]
    d = Daemon(config, port).start()
    try:
        created = [d.post("/orders", order)[1] for order in online]
        assert all(c["status"] == "WAIT_PAY" for c in created)
        paid = created[0]
        assert d.post("/payments", {"order_no": paid["order_no"], "payment_id": "P1",
                                    "amount": paid["payable"]})[0] == 200
        wait_all_terminal(d, 6, timeout=30)
        states = {c["order_no"]: d.get(f"/orders/{c['order_no']}")[1]["state"] for c in created}
        assert states[paid["order_no"]] == "done"
        assert [s for no, s in states.items() if no != paid["order_no"]] == ["cancelled"] * 5
    finally:
        d.stop()
        await delete_topology(prefix)  # every queue under the prefix: tiers, intake, outbox
