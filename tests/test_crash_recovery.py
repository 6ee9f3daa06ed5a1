"""Acceptance: orders through the daemon, killed with SIGKILL mid-run and restarted each time:
every order ends in a terminal state, none is lost, and every downstream effect was applied
exactly once. On the embedded default (2,000 orders, two kills) and on the production backends
(PostgreSQL, RabbitMQ, Redis: 5,000 orders, three kills at random moments)."""
from __future__ import annotations

import asyncio
import random
import sqlite3
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest

from oms_pipeline.adapters.simulated import read_duplicates, read_effects
from oms_pipeline.generator import generate
from oms_pipeline.order import decode, document
from oms_pipeline.adapters import postgres_store
from tests.conftest import require_service
from tests.support.daemon import NO_CHECKPOINTS, Daemon, production_backends, write_config
from tests.support.postgres import fresh_postgres_database
from tests.support.rabbitmq import delete_topology

pytestmark = pytest.mark.slow
N = 2000


def requests(n: int = N) -> list[dict]:
    # Standard delivery and no remarks: every order can run to its end by itself
    # (a next-day promise parks until tonight's cut-off; a remark waits for a person).
    return [{**r, "remark": "", "delivery_promise": "standard"} for r in generate(n, 2024)]


def feed(d: Daemon, batch: list[dict]) -> None:
    """Submit as an upstream system does: resend until answered, then pay what waits."""
    def one(request: dict) -> None:
        status, body = _retried(d, "/orders", request)
        assert status in (200, 201), body
        waiting = body.get("status") == "WAIT_PAY" if status == 201 else body["state"] == "wait_pay"
        if waiting:
            payable = body["payable"] if status == 201 else body["order"]["amounts"]["payable"]
            paid = _retried(d, "/payments", {"order_no": body["order_no"], "payment_id": f"P-{body['order_no']}",
                                             "amount": payable})
            assert paid[0] == 200, paid
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, batch))


def _retried(d: Daemon, path: str, body: dict) -> tuple[int, dict]:
    """As an upstream system does: a 503 (the store away a moment, e.g. a connection reset) or a
    409 "try again" is sent again."""
    for _ in range(50):
        status, answer = d.post(path, body)
        if status != 503 and not (status == 409 and "try again" in answer.get("error", "")):
            return status, answer
        time.sleep(0.2)
    return status, answer


def feed_until_killed(d: Daemon, batch: list[dict], kill_after: float) -> None:
    with ThreadPoolExecutor(1) as pool:
        pool.submit(_quietly, feed, d, batch)
        time.sleep(kill_after)
        d.kill()


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except (AssertionError, OSError):
        pass  # the daemon was killed under it: the next run resends


# The default (every boundary after an io stage; cpu stages, pure functions, run again), and
# NO_CHECKPOINTS: a kill then replays several stages per order, each effect keyed.
@pytest.mark.parametrize("policy", ["", NO_CHECKPOINTS], ids=["default", "checkpoint-false"])
def test_two_sigkills_lose_nothing_and_apply_every_effect_once(tmp_path, policy):
    effects_path = tmp_path / "effects.sqlite3"
    config, port = write_config(tmp_path, f"""{policy}
[downstream]
seed = 11
effect_log = "{effects_path}"
[downstream.latency.default]
dist = "uniform"
mean_ms = 2.0
""")
    orders = requests()
    d = Daemon(config, port).start()
    feed_until_killed(d, orders[:1200], kill_after=1.5)
    d = Daemon(config, port).start()
    feed_until_killed(d, orders[:1800], kill_after=2.0)
    d = Daemon(config, port).start()
    try:
        feed(d, orders)
        _wait_terminal(d)
    finally:
        d.stop()
    assert d.proc.returncode == 0
    assert "illegal_transition" not in d.log_path.read_text()
    _assert_all_ended_once(_orders(tmp_path / "oms.sqlite3"), orders, effects_path)


def _assert_all_ended_once(rows: list[dict], orders: list[dict], effects_path) -> None:
    top = [r for r in rows if r["parent_no"] is None]
    assert len(top) == len(orders) and {r["external_id"] for r in top} == {o["external_id"] for o in orders}
    states = {r["state"] for r in rows}
    assert states <= {"done", "cancelled"}, states  # split parents settled from their children
    _assert_effects_once(rows, read_effects(str(effects_path)))
    # The kills landed mid-stage: stages ran again after restart and the
    # downstream systems turned the repeated calls away by their keys.
    assert sum(read_duplicates(str(effects_path)).values()) > 0


@pytest.mark.anyio
@pytest.mark.parametrize("policy", ["", NO_CHECKPOINTS], ids=["default", "checkpoint-false"])
async def test_three_sigkills_on_the_production_backends_lose_nothing_and_apply_every_effect_once(tmp_path, policy):
    """Also with every stage `checkpoint = false`, the configuration the production throughput
    benchmark runs (bench/scenarios/production_2x_no_checkpoints.toml)."""
    require_service("RabbitMQ", "127.0.0.1", 5672)
    require_service("Redis", "127.0.0.1", 6379)
    prefix = f"oms-crash-{uuid.uuid4().hex[:8]}"
    effects_path = tmp_path / "effects.sqlite3"
    rng = random.Random(5)
    async with fresh_postgres_database() as url:
        await postgres_store.migrate(url)
        config, port = write_config(tmp_path, f"""{policy}
{production_backends(prefix)}[downstream]
seed = 11
effect_log = "{effects_path}"
[downstream.latency.default]
dist = "uniform"
mean_ms = 2.0
""", store_url=url)
        orders = requests(5000)
        try:
            for upto in (1500, 3000, 4500):
                d = Daemon(config, port).start()
                await asyncio.to_thread(feed_until_killed, d, orders[:upto], rng.uniform(2.0, 6.0))
            d = Daemon(config, port).start()
            try:
                await asyncio.to_thread(feed, d, orders)
                await asyncio.to_thread(_wait_terminal, d, 600)
            finally:
                d.stop()
            assert d.proc.returncode == 0
            assert "illegal_transition" not in d.log_path.read_text()
            _assert_all_ended_once(await _pg_orders(url), orders, effects_path)
        finally:
            await delete_topology(prefix)


async def _pg_orders(url: str) -> list[dict]:
    conn = await asyncpg.connect(url)
    try:
        return [dict(r) | {"doc": document(decode(r["doc"]))} for r in await conn.fetch("SELECT * FROM orders")]
    finally:
        await conn.close()


def _wait_terminal(d: Daemon, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        orders = d.get("/stats")[1]["orders"]
        if not any(orders.get(s) for s in ("queued", "parked", "wait_pay", "split", "manual")):
            return
        time.sleep(0.5)
    raise AssertionError(f"orders still open: {d.get('/stats')[1]['orders']}")


def _orders(path) -> list[dict]:
    conn = sqlite3.connect(path)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) | {"doc": document(decode(r["doc"]))} for r in conn.execute("SELECT * FROM orders")]
    conn.close()
    return rows


def _assert_effects_once(rows: list[dict], effects: list[tuple]) -> None:
    by_key: dict[str, list[tuple]] = {}
    for effect in effects:
        by_key.setdefault(effect[0], []).append(effect)
    # A reservation key is reserved, then confirmed or released: unique per (key, system, op).
    assert len({e[:3] for e in effects}) == len(effects)
    assert all(len(v) == 1 for v in by_key.values() if v[0][1] != "inventory")
    wanted = set()
    for row in rows:  # split parents booked the stages before the split, children those after
        no, results = row["order_no"], row["doc"]["results"]
        dispatched = results.get("dispatch_wms", {})
        wanted |= {f"{no}:dispatch_wms:wms:{g}" for g in dispatched.get("wms", {})}
        wanted |= {f"{no}:dispatch_wms:supplier:{s}" for s in dispatched.get("supplier", {})}
        wanted |= {f"{no}:waybill:{g}" for g in results.get("waybill", {})}
        if "voucher" in results:
            wanted.add(f"{no}:voucher")
        if "invoice" in results:
            wanted.add(f"{no}:invoice")
        if row["state"] == "done" and not row["doc"]["children"]:
            assert dispatched, f"{no} done without a dispatch"
    booked = {k for k, v in by_key.items()
              if v[0][1] in ("wms", "supplier", "tms", "finance", "invoice") and v[0][2] != "outbound"}
    assert wanted == booked  # each wanted effect exactly once, and nothing booked that no order wanted
