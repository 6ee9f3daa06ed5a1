"""The simulated downstream systems: idempotency, failures, latency, truthful state."""
from __future__ import annotations

import time
from typing import Any

import anyio
import pytest
from hypothesis import given, settings as hsettings, strategies as st

from oms_pipeline.adapters.simulated import (
    EffectLog, Latency, SimSettings, SimSettingsError, build_simulated_ports,
)
from oms_pipeline.clock import VirtualClock
from oms_pipeline.outcome import PermanentError, TransientError
from oms_pipeline.ports.downstream import Occupation, Ports


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make(table: dict[str, Any] | None = None) -> tuple[Ports, EffectLog]:
    log = EffectLog()
    return build_simulated_ports(SimSettings.from_mapping(table), VirtualClock(), log), log


def run_now(coro: Any) -> Any:
    """Run a coroutine that must finish without ever suspending."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError("the call yielded to the event loop")


# (system, one effect call taking (ports, key)) for every effect of every port.
EFFECTS = [
    ("notification", lambda p, k: p.notification.send(k, "sms", "13812345678", "paid", {"no": "O1"})),
    ("finance", lambda p, k: p.finance.push_voucher(k, "O1", 1999, "online")),
    ("finance", lambda p, k: p.finance.refund(k, "O1", 500, "cancel")),
    ("purchasing", lambda p, k: p.purchasing.push_presale(k, "O1", [("A", 2)])),
    ("tms", lambda p, k: p.tms.request_waybill(k, "O1", "WH1", "ambient")),
    ("erp", lambda p, k: p.erp.occupy(k, "O1", [("A", "WH1", 1)])),
    ("wms", lambda p, k: p.wms.dispatch(k, "O1", {"lines": []})),
    ("wms", lambda p, k: p.wms.intercept(k, "O1")),
    ("supplier", lambda p, k: p.supplier.dispatch(k, "O1", "SUP-1", {"lines": []})),
    ("invoice", lambda p, k: p.invoice.request(k, "O1", "ACME Ltd", 1999)),
    ("inventory", lambda p, k: p.inventory.reserve(k, "A", "WH1", 2)),
    ("inventory", lambda p, k: p.inventory.release(k)),
]
READS = [
    lambda p: p.product.tax_rate_bp("A"),
    lambda p: p.product.bundle_components("B"),
    lambda p: p.risk.fraud_score("O1", "M1", "13812345678", 1000),
    lambda p: p.inventory.stock("A", "WH1"),
]


@pytest.mark.anyio
@pytest.mark.parametrize("system,call", EFFECTS)
async def test_same_key_twice_has_one_effect_and_counts_a_duplicate(system: str, call: Any) -> None:
    ports, log = make()
    first = await call(ports, "O1:stage")
    again = await call(ports, "O1:stage")
    assert again == first
    assert log.count(system) == 1
    assert log.duplicates == {system: 1}
    await call(ports, "O2:stage")
    assert log.count(system) == 2


@pytest.mark.anyio
async def test_a_duplicate_returns_the_original_answer_whatever_its_arguments() -> None:
    ports, log = make({"erp": {"stock": {"WH1": {"A": 5}}}})
    first = await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 3)])
    again = await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 4)])
    assert again == first == Occupation(occupation_id=first.occupation_id, short=[])
    assert ports.erp.available("A", "WH1") == 2


@pytest.mark.anyio
async def test_one_key_reaches_several_operations_independently() -> None:
    ports, log = make({"inventory": {"stock": {"WH1": {"A": 10}}}})
    assert await ports.inventory.reserve("O1:intake:1", "A", "WH1", 4)
    await ports.inventory.confirm("O1:intake:1")
    assert [(e.op, e.key) for e in log.applied("inventory")] == [("reserve", "O1:intake:1"),
                                                                  ("confirm", "O1:intake:1")]


async def _attempts_until_success(ports: Ports, keys: list[str]) -> dict[str, int]:
    attempts = {}
    for key in keys:
        for n in range(1, 50):
            try:
                await ports.tms.request_waybill(key, key, "WH1", "ambient")
            except TransientError:
                continue
            attempts[key] = n
            break
    return attempts


@pytest.mark.anyio
async def test_failures_are_deterministic_under_a_seed_in_any_call_order() -> None:
    keys = [f"O{i}:waybill" for i in range(300)]
    table = {"seed": 7, "failure_rate": {"tms": 0.3}}
    forward = await _attempts_until_success(make(table)[0], keys)
    backward = await _attempts_until_success(make(table)[0], keys[::-1])
    assert forward == backward
    other_seed = await _attempts_until_success(make({**table, "seed": 8})[0], keys)
    assert other_seed != forward
    failures = sum(n - 1 for n in forward.values())
    assert 0.2 < failures / (failures + len(keys)) < 0.4


@pytest.mark.anyio
async def test_a_failed_call_has_no_effect() -> None:
    ports, log = make({"failure_rate": {"erp": 1.0, "inventory": 1.0},
                       "erp": {"stock": {"WH1": {"A": 5}}}, "inventory": {"stock": {"WH1": {"A": 5}}}})
    with pytest.raises(TransientError, match="erp.occupy"):
        await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 3)])
    with pytest.raises(TransientError):
        await ports.inventory.reserve("O1:intake", "A", "WH1", 3)
    assert log.count() == 0
    assert ports.erp.available("A", "WH1") == 5
    assert ports.inventory.level("A", "WH1").sellable == 5
    with pytest.raises(TransientError):  # reads fail too
        await ports.inventory.stock("A", "WH1")


def test_zero_latency_calls_never_yield() -> None:
    ports, log = make()
    for n, (_, call) in enumerate(EFFECTS):
        run_now(call(ports, f"O{n}:stage"))
        run_now(call(ports, f"O{n}:stage"))  # the duplicate path too
    for read in READS:
        run_now(read(ports))
    assert log.count() == len(EFFECTS)


@pytest.mark.anyio
async def test_latency_sleeps_in_real_time() -> None:
    ports, _ = make({"latency": {"tms": {"dist": "fixed", "mean_ms": 30}}})
    started = time.perf_counter()
    await ports.tms.request_waybill("O1:waybill", "O1", "WH1", "ambient")
    assert time.perf_counter() - started >= 0.029


@pytest.mark.parametrize("dist", ["uniform", "exponential", "lognormal"])
def test_latency_distributions_have_the_configured_mean(dist: str) -> None:
    spec = Latency(dist=dist, mean_ms=20)
    draws = [spec.draw_ms((i + 0.5) / 20_000) for i in range(20_000)]
    assert min(draws) >= 0
    assert sum(draws) / len(draws) == pytest.approx(20, rel=0.03)
    assert Latency(dist=dist, mean_ms=20, max_ms=25).draw_ms(0.999999) == 25


@pytest.mark.anyio
async def test_erp_reports_short_lines_and_occupies_the_rest() -> None:
    ports, _ = make({"erp": {"stock": {"WH1": {"A": 5, "B": 1}}}})
    first = await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 3)])
    assert first.short == []
    second = await ports.erp.occupy("O2:erp_stock", "O2", [("A", "WH1", 3), ("B", "WH1", 1)])
    assert second.short == [("A", "WH1", 3)]
    assert second.occupation_id != first.occupation_id
    assert ports.erp.available("A", "WH1") == 2
    assert ports.erp.available("B", "WH1") == 0


@pytest.mark.anyio
async def test_erp_shortage_rate_makes_lines_short_whatever_the_stock() -> None:
    ports, _ = make({"erp": {"shortage_rate": 1.0}})
    answer = await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 1)])
    assert answer.short == [("A", "WH1", 1)]
    assert ports.erp.available("A", "WH1") == 1_000_000


@pytest.mark.anyio
async def test_wms_intercepts_only_dispatched_orders_not_yet_out() -> None:
    ports, _ = make()
    wms = ports.wms
    assert await wms.intercept("O1:cancel", "O1") is False  # never dispatched
    await wms.dispatch("O1:dispatch_wms", "O1", {})
    assert await wms.intercept("O1:cancel2", "O1") is True
    assert await wms.mark_outbound("O1") is False  # stopped in the warehouse
    with pytest.raises(PermanentError, match="intercepted"):
        await wms.dispatch("O1:dispatch_again", "O1", {})

    await wms.dispatch("O2:dispatch_wms", "O2", {})
    assert await wms.mark_outbound("O2") is True
    assert await wms.intercept("O2:cancel", "O2") is False  # too late: a return now
    assert await wms.mark_outbound("O3") is False


@pytest.mark.anyio
async def test_waybills_are_unique_and_stable_per_key() -> None:
    ports, _ = make()
    numbers = [await ports.tms.request_waybill(f"O{i}:waybill", f"O{i}", "WH1", "chilled_low") for i in range(50)]
    assert len(set(numbers)) == 50
    assert await ports.tms.request_waybill("O7:waybill", "O7", "WH1", "chilled_low") == numbers[7]
    with pytest.raises(PermanentError, match="zone"):
        await ports.tms.request_waybill("O99:waybill", "O99", "WH1", "lukewarm")


@pytest.mark.anyio
async def test_state_is_rebuilt_from_the_log() -> None:
    table = {"erp": {"stock": {"WH1": {"A": 5}}}}
    ports, log = make(table)
    await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 2)])
    await ports.wms.dispatch("O1:dispatch_wms", "O1", {})
    await ports.wms.mark_outbound("O1")
    waybill = await ports.tms.request_waybill("O1:waybill", "O1", "WH1", "ambient")
    await ports.inventory.reserve("O1:intake", "A", "WH1", 3)

    again = build_simulated_ports(SimSettings.from_mapping(table), VirtualClock(), log)
    assert again.erp.available("A", "WH1") == 3
    assert await again.wms.intercept("O1:cancel", "O1") is False  # still known to be out
    assert await again.tms.request_waybill("O2:waybill", "O2", "WH1", "ambient") != waybill
    assert again.inventory.level("A", "WH1").reserved == 3


@pytest.mark.anyio
async def test_fraud_score_is_deterministic_and_knows_cheats() -> None:
    ports, _ = make({"seed": 1, "risk": {"cheat_members": ["M-BAD"], "cheat_phones": ["13900000000"]}})
    risk = ports.risk
    assert await risk.fraud_score("O1", "M-BAD", "13812345678", 100) == 100
    assert await risk.fraud_score("O1", "M1", "13900000000", 100) == 100
    small = await risk.fraud_score("O1", "M1", "13812345678", 100)
    assert small == await risk.fraud_score("O2", "M1", "13812345678", 100)
    assert 0 <= small < 40
    assert await risk.fraud_score("O3", "M1", "13812345678", 600_000) == small + 30


@pytest.mark.anyio
async def test_product_catalogue() -> None:
    ports, _ = make({"product": {"tax_rates": {"BOOK": 900}, "bundles": {"GIFTBOX": [["TEA", 2, 3], ["CUP", 1, 1]]}}})
    product = ports.product
    assert await product.tax_rate_bp("BOOK") == 900
    assert await product.tax_rate_bp("A") == 1300
    assert await product.bundle_components("GIFTBOX") == [("TEA", 2, 3), ("CUP", 1, 1)]
    generated = await product.bundle_components("SET-9")
    assert generated == await product.bundle_components("SET-9")
    assert 2 <= len(generated) <= 3 and all(qty >= 1 and weight >= 1 for _, qty, weight in generated)


@pytest.mark.anyio
async def test_bad_requests_are_permanent_and_leave_nothing() -> None:
    ports, log = make()
    with pytest.raises(PermanentError, match="unknown channel 'fax'"):
        await ports.notification.send("O1:notify_paid", "fax", "13812345678", "paid", {})
    with pytest.raises(PermanentError, match="no reservation"):
        await ports.inventory.confirm("O1:intake")
    with pytest.raises(PermanentError, match="idempotency key"):
        await ports.invoice.request("", "O1", "ACME", 100)
    assert log.count() == 0


@pytest.mark.anyio
async def test_a_release_that_overtakes_its_reservation_blocks_it() -> None:
    ports, _ = make({"inventory": {"stock": {"WH1": {"A": 5}}}})
    await ports.inventory.release("O1:intake")
    assert await ports.inventory.reserve("O1:intake", "A", "WH1", 2) is False
    assert ports.inventory.level("A", "WH1").sellable == 5


_keys = st.sampled_from([f"O{i}:intake" for i in range(6)])
_ops = st.one_of(
    st.tuples(st.just("reserve"), _keys, st.sampled_from(["A", "B"]), st.integers(1, 4)),
    st.tuples(st.just("confirm"), _keys),
    st.tuples(st.just("release"), _keys),
)


@hsettings(max_examples=200, deadline=None)
@given(st.lists(_ops, max_size=40))
def test_inventory_conserves_stock(ops: list[tuple]) -> None:
    ports, _ = make({"inventory": {"stock": {"WH1": {"A": 6, "B": 3}}}})
    inventory = ports.inventory
    for op in ops:
        try:
            if op[0] == "reserve":
                run_now(inventory.reserve(op[1], op[2], "WH1", op[3]))
            else:
                run_now(getattr(inventory, op[0])(op[1]))
        except PermanentError:
            pass  # e.g. confirming what was never reserved
        for sku, total in (("A", 6), ("B", 3)):
            level = inventory.level(sku, "WH1")
            assert min(level.sellable, level.reserved, level.sold) >= 0
            assert level.sellable + level.reserved + level.sold == total


@pytest.mark.parametrize("table,key", [
    ({"latency": {"tms": {"dist": "gaussian"}}}, "downstream.latency.tms.dist"),
    ({"latency": {"fms": {}}}, "downstream.latency.fms"),
    ({"failure_rate": {"erp": 1.5}}, "downstream.failure_rate.erp"),
    ({"erp": {"stock": {"WH1": {"A": -1}}}}, "downstream.erp.stock.WH1.A"),
    ({"risk": {"cheats": []}}, "downstream.risk.cheats"),
    ({"product": {"bundles": {"BOX": [["A", 0, 1]]}}}, "downstream.product.bundles.BOX[0][1]"),
])
def test_settings_errors_name_the_key(table: dict, key: str) -> None:
    with pytest.raises(SimSettingsError) as error:
        SimSettings.from_mapping(table)
    assert str(error.value).startswith(key + ":")
    assert isinstance(error.value, ValueError)


def test_settings_defaults_per_system() -> None:
    s = SimSettings.from_mapping({"latency": {"default": {"mean_ms": 2}, "erp": {"dist": "exponential", "mean_ms": 9}},
                                  "failure_rate": {"default": 0.01, "wms": 0.2}})
    assert s.latency_for("tms").mean_ms == 2 and s.latency_for("erp").dist == "exponential"
    assert s.failure_rate_for("tms") == 0.01 and s.failure_rate_for("wms") == 0.2
    assert SimSettings.from_mapping(None) == SimSettings()


@pytest.mark.anyio
async def test_concurrent_duplicates_apply_once() -> None:
    ports, log = make({"latency": {"tms": {"dist": "uniform", "mean_ms": 2}}})
    results = []

    async def call() -> None:
        results.append(await ports.tms.request_waybill("O1:waybill", "O1", "WH1", "ambient"))

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(call)
    assert len(set(results)) == 1
    assert log.count("tms") == 1 and log.duplicates["tms"] == 19
