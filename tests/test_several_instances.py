"""Two daemon instances on one PostgreSQL, RabbitMQ and Redis (DESIGN R-1.6).

Orders reach both through the shared intake queue. Each order is owned by one
instance at a time: no downstream effect is applied by both (each instance has
its own simulated downstream systems and effect log, so an order worked by
both would show its keys in both logs), and the warehouses' daily dispatch
capacity, a Redis counter, holds across both. When one instance is killed, the
other takes over its queued orders once its liveness (store.lease) lapses, and
every order still reaches its end.
"""
from __future__ import annotations

import os
import time
import uuid
from collections import defaultdict
from pathlib import Path

import orjson
import pytest

from oms_pipeline.adapters import postgres_store
from oms_pipeline.adapters.simulated.effects import read_effects
from oms_pipeline.generator import generate
from tests.conftest import require_service
from tests.support.daemon import NO_CHECKPOINTS, Daemon, production_backends, write_config
from tests.support.postgres import fresh_postgres_database
from tests.support.rabbitmq import Publisher, delete_topology

pytestmark = [pytest.mark.slow, pytest.mark.anyio]

CAPACITY = 150  # orders per warehouse per day, across both instances
PLAIN = {"kind": "tob", "source": "sales_plan", "payment_method": "none", "remark": "",
         "delivery_promise": "standard", "presale": False}


def instance(tmp: Path, i: int, url: str, prefix: str, policy: str = "") -> Daemon:
    folder = tmp / f"instance-{i}"
    folder.mkdir()
    extra = f"""{policy}
{production_backends(prefix)}[downstream]
effect_log = "{folder / 'effects.sqlite3'}"
[stages.flow_limit.settings]
default_capacity = {CAPACITY}
"""
    config, port = write_config(folder, extra, store_url=url)
    env = {**os.environ, "OMS__DAEMON__INSTANCE_ID": str(i), "OMS__STORE__LEASE": "2.0"}
    return Daemon(config, port, env=env).start()


def wait_settled(d: Daemon, n: int, timeout: float = 240) -> dict:
    """/stats once n orders (at least) are stored and none is queued or being worked on."""
    deadline = time.monotonic() + timeout
    while True:
        stats = d.get("/stats")[1]
        counts = stats["orders"]
        if sum(counts.values()) >= n and not counts.get("queued") and not counts.get("paused"):
            return counts
        assert time.monotonic() < deadline, counts
        time.sleep(0.5)


def effects_of(d: Daemon) -> list:
    return read_effects(str(d.config.parent / "effects.sqlite3"))


async def test_two_instances_share_the_orders_and_never_apply_an_effect_twice(tmp_path):
    require_service("RabbitMQ", "127.0.0.1", 5672)
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"oms-two-{uuid.uuid4().hex[:8]}"
    n = 800
    async with fresh_postgres_database() as url:
        await postgres_store.migrate(url)
        a, b = instance(tmp_path, 1, url, prefix), instance(tmp_path, 2, url, prefix)
        try:
            orders = [{**r, **PLAIN, "external_id": f"TWO-{i}"} for i, r in enumerate(generate(n, 77))]
            publisher = Publisher(f"{prefix}.intake.orders", [orjson.dumps(o) for o in orders])
            publisher.start()
            publisher.join(300)
            assert publisher.error is None
            counts = wait_settled(a, n)
            keys_a = {(k, s, op) for k, s, op, *_ in effects_of(a)}
            keys_b = {(k, s, op) for k, s, op, *_ in effects_of(b)}
            assert keys_a and keys_b  # both worked
            assert not keys_a & keys_b, sorted(keys_a & keys_b)[:5]  # no effect applied by both
            per_warehouse = defaultdict(set)
            for key, system, op in keys_a | keys_b:
                if system == "wms" and op == "dispatch":  # "ORDERNO:dispatch_wms:wms:WH/zone"
                    per_warehouse[key.split(":")[3].split("/")[0]].add(key.split(":")[0])
            assert per_warehouse and all(len(nos) <= CAPACITY for nos in per_warehouse.values()), \
                {wh: len(nos) for wh, nos in per_warehouse.items()}
            assert counts.get("parked", 0) > 0  # the capacity was reached: the rest waits for tomorrow
        finally:
            a.stop()
            b.stop()
            await delete_topology(prefix)


@pytest.mark.parametrize("policy", ["", NO_CHECKPOINTS], ids=["default", "checkpoint-false"])
async def test_a_dead_instances_orders_are_taken_over_by_the_other(tmp_path, policy):
    require_service("RabbitMQ", "127.0.0.1", 5672)
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"oms-takeover-{uuid.uuid4().hex[:8]}"
    n = 400
    async with fresh_postgres_database() as url:
        await postgres_store.migrate(url)
        a, b = instance(tmp_path, 1, url, prefix, policy), instance(tmp_path, 2, url, prefix, policy)
        try:
            orders = [{**r, **PLAIN, "external_id": f"TAKE-{i}"} for i, r in enumerate(generate(n, 78))]
            publisher = Publisher(f"{prefix}.intake.orders", [orjson.dumps(o) for o in orders])
            publisher.start()
            while publisher.sent < n // 2:
                time.sleep(0.05)
            a.kill()  # SIGKILL: its in-flight orders stay queued under its name
            publisher.join(300)
            assert publisher.error is None
            counts = wait_settled(b, n)  # nothing left queued: what A was working on, B finished
            assert not counts.get("queued"), counts
            print("taken over:", b.log_path.read_text().count('"event":"orders_taken_over"'), "times")
        finally:
            a.stop()
            b.stop()
            await delete_topology(prefix)
