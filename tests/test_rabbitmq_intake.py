"""The RabbitMQ intake queues, on the real broker: orders in, duplicates, dead letters with their
reason, retries up to the delivery limit, backpressure at prefetch, and a broker restart.

Isolation: each test uses its own `broker.prefix` and deletes what it declared afterwards
(everything named after the prefix: the daemon's timers and relay declare under it too).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
import anyio
import orjson
import pytest

from oms_pipeline import app as app_module
from oms_pipeline import config
from oms_pipeline.adapters.rabbitmq_intake import ORIGIN, REASON, RETRIES, RabbitIntake, Topology
from oms_pipeline.config import IntakeSettings
from oms_pipeline.generator import generate
from oms_pipeline.health import Health
from oms_pipeline.ports.intake import ACCEPTED, INVALID, Verdict
from tests.conftest import require_service
from tests.support.rabbitmq import Publisher
from tests.support.daemon import Daemon, write_config

pytestmark = [pytest.mark.anyio, pytest.mark.rabbitmq]

URL = "amqp://guest:guest@127.0.0.1:5672/"
ROUTES = Path(__file__).resolve().parent.parent / "config" / "routes.toml"
# Orders that need no payment and pass audit: they run the whole path by themselves.
PLAIN = {"kind": "tob", "source": "sales_plan", "payment_method": "none", "remark": "",
         "delivery_promise": "standard", "presale": False}


def plain_orders(n: int, seed: int, tag: str = "") -> list[dict]:
    return [{**r, **PLAIN, "external_id": f"q{tag}-{seed}-{i}"} for i, r in enumerate(generate(n, seed))]


def new_prefix() -> str:
    require_service("RabbitMQ", "127.0.0.1", 5672)
    return f"oms-test-{uuid.uuid4().hex[:8]}"


# -- broker helpers ----------------------------------------------------------

async def publish(queue: str, bodies: list[bytes], headers: dict | None = None) -> None:
    """As an upstream system does: persistent, through the default exchange, confirmed."""
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        for body in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers or {},
                                 content_type="application/json"), queue, mandatory=True)


async def ready_count(queue: str) -> int:
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count


async def take_dead(prefix: str, n: int, timeout: float = 30) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The first n dead letters (waiting for them)."""
    out = []
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(f"{prefix}.intake.dead", passive=True)
        with anyio.fail_after(timeout):
            while len(out) < n:
                message = await queue.get(no_ack=True, fail=False)
                if message is None:
                    await anyio.sleep(0.05)
                else:
                    out.append(message)
    return out


async def delete_prefixed(prefix: str) -> None:
    """Everything declared under the prefix: listed by rabbitmqctl where it is installed, else the
    intake's own topology."""
    queues, exchanges = list(Topology(prefix, (0.1,)).queues), []
    ctl = shutil.which("rabbitmqctl")
    if ctl:
        queues = _listed(ctl, "list_queues", prefix)
        exchanges = _listed(ctl, "list_exchanges", prefix)
    connection = await aio_pika.connect(URL)
    async with connection:
        channel = await connection.channel()
        for name in queues:
            await channel.queue_delete(name)
        for name in exchanges:
            await channel.exchange_delete(name)


def _listed(ctl: str, what: str, prefix: str) -> list[str]:
    done = subprocess.run([ctl, "-q", what, "name"], capture_output=True, text=True, timeout=60)
    return [n for n in done.stdout.split() if n.startswith(prefix + ".")]


async def wait_for(predicate, timeout: float = 30, what: str = "") -> None:
    with anyio.fail_after(timeout):
        while not await predicate():
            await anyio.sleep(0.05)


# -- the adapter with handlers of the test's own -----------------------------

@asynccontextmanager
async def consuming(handler, prefix: str, **settings):
    intake = RabbitIntake(URL, prefix=prefix, settings=IntakeSettings(**settings))
    await intake.open()
    intake.register("orders", handler)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(intake.run)
            yield intake
            await intake.stop(5)
    finally:
        await intake.close()
        await delete_prefixed(prefix)


async def test_a_full_handler_stops_taking_from_the_broker_at_prefetch():
    prefix = new_prefix()
    gate = anyio.Event()

    async def slow(bodies):
        await gate.wait()  # a pipeline that is full
        return [Verdict(ACCEPTED)] * len(bodies)

    async with consuming(slow, prefix, prefetch=10, batch=4, workers=1) as intake:
        queue = f"{prefix}.intake.orders"
        await publish(queue, [b"{}"] * 100)

        async def held_at_prefetch() -> bool:
            return await ready_count(queue) == 90 and intake.unacked("orders") == 10
        await wait_for(held_at_prefetch)
        assert intake.unacked("orders") == 10 and await ready_count(queue) == 90
        gate.set()

        async def all_taken() -> bool:
            return intake.counts.messages.get(("orders", "accepted"), 0) == 100
        await wait_for(all_taken)
        assert await ready_count(queue) == 0


async def test_a_message_that_always_fails_is_dead_lettered_after_the_limit_while_others_flow():
    prefix = new_prefix()
    seen: dict[bytes, int] = {}

    async def handler(bodies):
        for body in bodies:
            seen[body] = seen.get(body, 0) + 1
        if b"poison" in bodies:
            raise RuntimeError("the handler breaks on this one")
        if b"flaky" in bodies and seen[b"flaky"] < 3:
            raise ConnectionError("the store is away for now")
        return [Verdict(ACCEPTED)] * len(bodies)

    async with consuming(handler, prefix, delivery_limit=4, retry_delays=(0.1, 0.2)) as intake:
        bodies = [b"ok-%d" % i for i in range(20)]
        await publish(f"{prefix}.intake.orders", [*bodies[:10], b"poison", b"flaky", *bodies[10:]],
                      headers={"x-upstream": "shop-7"})
        [dead] = await take_dead(prefix, 1)
        assert dead.body == b"poison"
        assert dead.headers[RETRIES] == 4 and dead.headers[ORIGIN] == f"{prefix}.intake.orders"
        assert dead.headers[REASON].startswith("failed 4 times, last: RuntimeError: the handler breaks on this one")
        assert dead.headers["x-upstream"] == "shop-7"  # the message as it was published
        assert not any(k.startswith("x-death") for k in dead.headers)

        async def settled() -> bool:
            return intake.counts.messages.get(("orders", "accepted"), 0) == 21
        await wait_for(settled)
        assert all(seen[b] == 1 for b in bodies)  # the others were taken once, whatever failed beside them
        assert seen[b"poison"] == 4 and seen[b"flaky"] == 3
        assert intake.counts.messages[("orders", "retried")] == 3 + 2
        assert intake.counts.dead_letters == 1
        assert await ready_count(f"{prefix}.intake.dead") == 0


# -- the whole app: the same intake code path as POST /orders -----------------

@asynccontextmanager
async def app_on_rabbitmq(tmp_path, prefix: str, **extra):
    settings = config.from_mapping({
        "store": {"url": f"sqlite:///{tmp_path / 'oms.sqlite3'}"},
        "broker": {"url": URL, "prefix": prefix, "delay_tiers": [0.5, 1.0]},
        "intake": {"retry_delays": [0.1], "delivery_limit": 3},
        "routing": {"file": str(ROUTES)},
        **extra})
    app = await app_module.build(settings)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(app.pipeline.run)
            yield app
            await app.broker_intake.stop(5)
            tg.cancel_scope.cancel()
    finally:
        await app.aclose()
        await delete_prefixed(prefix)


async def stored_orders(app) -> int:
    """Orders taken in (split children, which count in the store's states, are not)."""
    return app.pipeline.intake_count


async def test_orders_published_to_the_intake_queue_become_orders_and_duplicates_make_one(tmp_path):
    prefix = new_prefix()
    orders = plain_orders(60, seed=3)
    async with app_on_rabbitmq(tmp_path, prefix) as app:
        bodies = [orjson.dumps(o) for o in orders]
        await publish(f"{prefix}.intake.orders", bodies + bodies[:25])  # upstream sends some twice
        counts = app.broker_intake.counts.messages

        async def all_seen() -> bool:
            return counts.get(("orders", "accepted"), 0) + counts.get(("orders", "duplicate"), 0) == 85
        await wait_for(all_seen)
        assert counts[("orders", "accepted")] == 60 and counts[("orders", "duplicate")] == 25
        assert await stored_orders(app) == 60
        for o in orders:
            assert await app.pipeline.store.find_external(o["source"], o["external_id"]) is not None
        # The HTTP API takes the same path: the same order again is the known one.
        assert (await app.intake.create([app.intake.request(orders[0])]))[0].created is False


async def test_undecodable_and_invalid_orders_are_dead_lettered_with_the_reason_while_valid_ones_flow(tmp_path):
    prefix = new_prefix()
    valid = plain_orders(30, seed=5)
    bad_qty = {**valid[0], "external_id": "bad-qty",
               "lines": [{**valid[0]["lines"][0], "qty": 0}]}
    line = {"sku": "SKU-SOLD-OUT", "qty": 1, "unit_price": 100, "warehouse": "WH-BJ"}
    sold_out = {**valid[0], "external_id": "sold-out", "lines": [line], "amounts": {}}
    poison = b'\xff{"source": "app"'
    bodies = [orjson.dumps(o) for o in valid[:10]] + [poison, orjson.dumps(bad_qty), orjson.dumps(sold_out)] \
        + [orjson.dumps(o) for o in valid[10:]]
    async with app_on_rabbitmq(tmp_path, prefix,
                               downstream={"inventory": {"stock": {"WH-BJ": {"SKU-SOLD-OUT": 0}}}}) as app:
        await publish(f"{prefix}.intake.orders", bodies)
        dead = {m.body: m.headers for m in await take_dead(prefix, 3)}
        assert dead[poison][REASON].startswith("invalid order: $: not valid JSON")
        assert dead[orjson.dumps(bad_qty)][REASON].startswith("invalid order: lines.0.qty: ")
        assert dead[orjson.dumps(sold_out)][REASON] == "out of stock: SKU-SOLD-OUT@WH-BJ"
        assert all(h[RETRIES] == 0 for h in dead.values())  # dead at once, never retried

        async def valid_in() -> bool:
            return app.broker_intake.counts.messages.get(("orders", "accepted"), 0) == 30
        await wait_for(valid_in)
        assert await stored_orders(app) == 30
        assert app.broker_intake.counts.dead_letters == 3


async def test_reverse_requests_and_reports_from_their_queues_reach_the_reverse_flow(tmp_path):
    prefix = new_prefix()
    order = plain_orders(1, seed=8, tag="reverse")[0]
    async with app_on_rabbitmq(tmp_path, prefix) as app:
        created = (await app.intake.create([app.intake.request(order)]))[0]
        cancel = {"order_no": created.order_no, "request_id": "cs-1", "kind": "cancel", "source": "customer_service"}
        await publish(f"{prefix}.intake.reverse", [orjson.dumps(cancel), orjson.dumps(cancel),
                                                    orjson.dumps({"request_id": "cs-2"})])
        await publish(f"{prefix}.intake.reports", [orjson.dumps(
            {"order_no": "1" * 18, "event": "delivered", "report_id": "tms-1"})])
        dead = {m.headers[ORIGIN]: m.headers[REASON] for m in await take_dead(prefix, 2)}
        assert dead[f"{prefix}.intake.reverse"].startswith("invalid request: order_no: ")
        assert dead[f"{prefix}.intake.reports"].startswith("404 no order 111111111111111111")
        counts = app.broker_intake.counts.messages

        async def both_taken() -> bool:
            return counts.get(("reverse", "accepted"), 0) + counts.get(("reverse", "duplicate"), 0) == 2
        await wait_for(both_taken)
        assert counts[("reverse", "duplicate")] == 1  # the same request id again: the same reverse order


async def test_payment_notifications_from_their_queue_pay_the_order_like_the_api(tmp_path):
    prefix = new_prefix()
    order = {**plain_orders(1, seed=10, tag="pay")[0], "kind": "toc", "source": "app", "payment_method": "online"}
    async with app_on_rabbitmq(tmp_path, prefix) as app:
        created = (await app.intake.create([app.intake.request(order)]))[0]
        assert created.status == "WAIT_PAY"
        payment = {"order_no": created.order_no, "payment_id": "PQ-1", "amount": created.payable}
        await publish(f"{prefix}.intake.payments", [orjson.dumps(payment), orjson.dumps(payment),
                                                     orjson.dumps({"order_no": created.order_no})])
        dead = {m.headers[ORIGIN]: m.headers[REASON] for m in await take_dead(prefix, 1)}
        assert dead[f"{prefix}.intake.payments"].startswith("invalid request: payment_id: ")
        counts = app.broker_intake.counts.messages

        async def both_taken() -> bool:
            return counts.get(("payments", "accepted"), 0) + counts.get(("payments", "duplicate"), 0) == 2
        await wait_for(both_taken)
        assert counts[("payments", "duplicate")] == 1  # the same payment again: a no-op
        order_doc = (await app.pipeline.store.get(created.order_no))
        assert order_doc.status != "WAIT_PAY"


async def test_a_payment_request_through_the_intake_verdicts_follow_the_answer():
    from oms_pipeline.intake_queues import verdict
    from oms_pipeline.ports.intake import DUPLICATE, RETRY

    class Answer:
        def __init__(self, status, body):
            self.status, self.body = status, body

    assert verdict(Answer(200, {"duplicate": False})) == Verdict(ACCEPTED)
    assert verdict(Answer(200, b'{"duplicate": true}')).result == DUPLICATE
    assert verdict(Answer(503, {"error": "refund failed for now"})).result == RETRY
    assert verdict(Answer(409, {"error": "order 1 changed meanwhile; try again"})).result == RETRY
    assert verdict(Answer(404, {"error": "no order 1"})) == Verdict(INVALID, "404 no order 1")


async def test_readiness_probes_are_shared_and_name_what_is_down():
    calls = {"store": 0, "redis": 0}

    async def store():
        calls["store"] += 1

    async def redis():
        calls["redis"] += 1
        raise ConnectionRefusedError("connection refused")

    health = Health({"store": [store], "redis": [redis]}, max_age=60)
    assert await health.unreachable() == ["redis"]
    assert await health.unreachable() == ["redis"]  # the cached answer: no second round of probes
    assert calls == {"store": 1, "redis": 1}


# -- a RabbitMQ restart under load, the daemon as an operator runs it ---------

def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.slow
async def test_a_rabbitmq_restart_under_load_loses_and_duplicates_no_order(tmp_path):
    prefix = new_prefix()
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not installed")
    n = 600
    config_path, port = write_config(tmp_path, f"""
[broker]
url = "{URL}"
prefix = "{prefix}"
delay_tiers = [0.5, 1.0]
[intake]
prefetch = 50
batch = 25
""")
    orders = plain_orders(n, seed=9, tag="restart")
    d = Daemon(config_path, port).start()
    publisher = Publisher(f"{prefix}.intake.orders", [orjson.dumps(o) for o in orders])
    try:
        publisher.start()
        while publisher.sent < n // 4:
            time.sleep(0.05)
        rabbitmqctl("stop_app")
        try:
            status, body = wait_not_ready(d)
            assert status == 503 and "rabbitmq" in body["unreachable"], body
            assert "store" not in body["unreachable"]
        finally:
            rabbitmqctl("start_app")
        publisher.join(300)
        assert publisher.error is None and publisher.sent == n
        wait_ready(d)
        stats = wait_all_in(d, n)
        assert stats["intake"] == n, stats  # none lost; none twice: (source, external id) is unique
        d.signal(signal.SIGTERM)  # consumers cancelled first, then the drain: a clean exit
        assert d.wait(60) == 0
    finally:
        d.stop()
        await delete_prefixed(prefix)


def wait_not_ready(d: Daemon, timeout: float = 60) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = d.get("/readyz")
        if status == 503:
            return status, body
        time.sleep(0.1)
    raise AssertionError("/readyz stayed ready while RabbitMQ was down")


def wait_ready(d: Daemon, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while d.get("/readyz")[0] != 200:
        assert time.monotonic() < deadline, d.get("/readyz")
        time.sleep(0.2)


def wait_all_in(d: Daemon, n: int, timeout: float = 180) -> dict:
    """/stats once n orders were taken in (or more: the test says) and none is still queued."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = d.get("/stats")[1]
        if stats["intake"] >= n and not stats["orders"].get("queued"):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"not all in: {d.get('/stats')[1]['orders']}\n{d.log()}")
