"""The daemon on RabbitMQ, run as an operator does: a command written with a checkpoint travels
outbox -> relay -> `<prefix>.events` -> `<prefix>.downstream` -> the simulated downstream system.

The command: an unpaid order's payment deadline cancels it, and the cancel's checkpoint writes
`inventory.release` for its stock reservation into the outbox. Its business events go out on the
same exchange, where a queue of the test's own listens to `order.cancelled`.
"""
from __future__ import annotations

import time
import urllib.request
import uuid

import aio_pika
import orjson
import anyio
import pytest

from oms_pipeline.adapters.rabbitmq_intake import Topology as IntakeTopology
from oms_pipeline.adapters.rabbitmq_timers import Topology as TimersTopology
from oms_pipeline.adapters.simulated import read_effects
from oms_pipeline.config import IntakeSettings
from tests.conftest import require_service
from tests.support.daemon import Daemon, write_config

pytestmark = [pytest.mark.slow, pytest.mark.anyio, pytest.mark.rabbitmq]

URL = "amqp://guest:guest@127.0.0.1:5672/"
ORDER = {
    "source": "app", "external_id": "OUTBOX-1", "kind": "toc", "member_id": "M1",
    "consignee": {"name": "张三", "phone": "13812345678", "province": "北京市", "city": "北京市",
                  "district": "朝阳区", "detail": "建国路 1 号"},
    "lines": [{"sku": "SKU-000001", "qty": 2, "unit_price": 1990, "warehouse": "WH-BJ"}],
    "amounts": {"freight": 600},
}


async def test_a_cancel_s_stock_release_reaches_the_simulated_inventory_over_rabbitmq(tmp_path):
    require_service("RabbitMQ", "127.0.0.1", 5672)
    prefix = f"oms-test-{uuid.uuid4().hex[:8]}"
    effects = tmp_path / "effects.sqlite3"
    config, port = write_config(tmp_path, f"""
[broker]
url = "{URL}"
prefix = "{prefix}"
delay_tiers = [0.5, 1.0]
[payment]
timeout = 1.0
[downstream]
effect_log = "{effects}"
""", metrics=True)
    connection = await aio_pika.connect(URL)
    try:
        events = await watch_cancelled(connection, prefix)
        d = Daemon(config, port).start()
        try:
            status, created = d.post("/orders", ORDER)
            assert status == 201 and created["status"] == "WAIT_PAY"
            order_no = created["order_no"]
            message = await next_message(events)
            [event] = orjson.loads(message.body)  # events travel packed (relay.events_per_message)
            assert message.routing_key == "order.cancelled" and message.headers["events"] == 1
            assert event["message_id"].startswith(f"{order_no}:event:") and event["order_no"] == order_no
            assert event["event"]["to"] == "CANCELLED"
            await wait_published(metrics_port(config), 'oms_outbox_published_total{topic="inventory.release"} 1.0')
        finally:
            d.stop()
        released = [(key, op) for key, system, op, _, _ in read_effects(str(effects)) if system == "inventory"]
        assert (f"{order_no}:reserve:SKU-000001@WH-BJ", "release") in released
    finally:
        await delete_topology(connection, prefix)
        await connection.close()


async def watch_cancelled(connection, prefix: str):
    channel = await connection.channel()
    exchange = await channel.declare_exchange(f"{prefix}.events", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(f"{prefix}.watch", durable=True)
    await queue.bind(exchange, "order.cancelled")
    return queue


async def next_message(queue, timeout: float = 30):
    with anyio.fail_after(timeout):
        while (message := await queue.get(fail=False)) is None:
            await anyio.sleep(0.05)
    await message.ack()
    return message


def metrics_port(config) -> int:
    text = config.read_text()
    return int(text.split("[metrics]\nport = ")[1].split()[0])


async def wait_published(port: int, line: str, timeout: float = 30) -> None:
    """The relay's metric says the command went out (and the downstream consumer took it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            if line in resp.read().decode():
                return
        await anyio.sleep(0.1)
    raise AssertionError(f"not published: {line}")


async def delete_topology(connection, prefix: str) -> None:
    channel = await connection.channel()
    timers = TimersTopology(prefix, (0.5, 1.0))
    intake = IntakeTopology(prefix, tuple(IntakeSettings().retry_delays))
    queues = (*timers.queues, *intake.queues, f"{prefix}.downstream", f"{prefix}.downstream.dead", f"{prefix}.watch")
    for name in queues:
        await channel.queue_delete(name)
    for name in (*timers.exchanges, *intake.exchanges, f"{prefix}.events"):
        await channel.exchange_delete(name)
