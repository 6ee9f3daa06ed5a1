"""Stage `erp_stock`: occupy ERP stock once per attempt; shortage modes; a new key only after a shortage."""
from __future__ import annotations

from typing import Any

import pytest

from oms_pipeline import flags
from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.adapters.simulated import EffectLog, SimSettings, build_simulated_ports
from oms_pipeline.clock import VirtualClock
from oms_pipeline.generator import generate, to_order
from oms_pipeline.order import Address, Amounts, Line, Order, decode, encode
from oms_pipeline.outcome import PermanentError
from oms_pipeline.stage import StageContext
from stages.erp_stock import SPEC, handle

STOCK = {"erp": {"stock": {"WH-BJ": {"A": 5, "B": 1}, "WH-SH": {"C": 10}}}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def make(table: dict[str, Any] | None = None, settings: dict[str, Any] | None = None,
               log: EffectLog | None = None) -> tuple[StageContext, EffectLog]:
    """A context on simulated ports; passing the previous `log` rebuilds ERP's state from it."""
    clock, log = VirtualClock(), log or EffectLog()
    await log.open()
    ports = build_simulated_ports(SimSettings.from_mapping(table or {}), clock, log)
    return StageContext("erp_stock", {**SPEC.defaults, **(settings or {})}, ports,
                        LocalCoordination(clock), clock), log


def line(sku: str, qty: int = 1, warehouse: str = "WH-BJ", **kw: Any) -> dict[str, Any]:
    return {"sku": sku, "qty": qty, "unit_price": 1000, "warehouse": warehouse, **kw}


def order(*lines: dict[str, Any], no: str = "O1") -> Order:
    o = Order(order_no=no, source="app", external_id=f"ext-{no}", kind="toc", member_id="M1",
              consignee=Address(name="张三", phone="13812345678", province="北京市", city="北京市"),
              lines=[Line(line_no=i, **raw) for i, raw in enumerate(lines, start=1)],
              amounts=Amounts(payable=1000, paid=1000))
    o.flags = flags.derive(o)
    return o


def occupied_lines(log: EffectLog) -> list[list[list[Any]]]:
    return [e.payload["lines"] for e in log.applied("erp")]


@pytest.mark.anyio
async def test_occupies_physical_own_warehouse_lines_summed_per_sku_and_warehouse() -> None:
    ctx, log = await make(STOCK)
    o = order(line("A", 2), line("A", 1), line("C", 3, "WH-SH"),
              line("GC", warehouse="", virtual=True), line("S", warehouse="", supplier="SUP-01"))
    assert (await handle(o, ctx)).kind == "next"
    assert occupied_lines(log) == [[["A", "WH-BJ", 3], ["C", "WH-SH", 3]]]
    assert log.applied("erp")[0].key == "O1:erp_stock:0"
    state = o.results["erp_stock"]
    assert state["occupations"] == [log.applied("erp")[0].result.occupation_id]
    assert state["short"] == [] and state["try"] == 0
    assert ctx.ports.erp.available("A", "WH-BJ") == 2


@pytest.mark.anyio
@pytest.mark.parametrize("o", [
    order(line("GC", warehouse="", virtual=True)),
    order(line("S", warehouse="", supplier="SUP-01")),
])
async def test_no_physical_own_lines_is_skipped(o: Order) -> None:
    ctx, log = await make()
    outcome = await handle(o, ctx)
    assert outcome.kind == "skip" and outcome.reason
    assert log.count("erp") == 0


@pytest.mark.anyio
async def test_shortage_goes_to_manual_by_default_listing_the_short_lines() -> None:
    ctx, log = await make(STOCK)
    o = order(line("A", 2), line("B", 3))
    outcome = await handle(o, ctx)
    assert outcome.kind == "manual"
    assert outcome.reason == "erp_stock: short B@WH-BJ x3"
    state = o.results["erp_stock"]
    assert state["short"] == [["B", "WH-BJ", 3]] and state["occupied"] == [["A", "WH-BJ", 2]]
    assert state["try"] == 1  # a shortage was recorded: the next attempt needs a new key


@pytest.mark.anyio
async def test_cancel_mode_hands_the_stock_out_to_the_reverse_flow() -> None:
    ctx, _ = await make(STOCK, {"on_shortage": "cancel"})
    o = order(line("A", 2), line("B", 3))
    outcome = await handle(o, ctx)
    assert outcome.kind == "cancel" and outcome.reason == "stock-out: B@WH-BJ x3"
    # What was occupied stays recorded, so the reverse flow can give it back.
    assert o.results["erp_stock"]["occupied"] == [["A", "WH-BJ", 2]]


@pytest.mark.anyio
async def test_partial_mode_records_the_short_lines_and_goes_on() -> None:
    ctx, _ = await make(STOCK, {"on_shortage": "partial"})
    o = order(line("A", 2), line("B", 3))
    outcome = await handle(o, ctx)
    assert outcome.kind == "next"
    assert o.results["erp_stock"]["short"] == [["B", "WH-BJ", 3]]


@pytest.mark.anyio
async def test_partial_mode_with_nothing_occupied_has_nothing_to_ship() -> None:
    ctx, _ = await make(STOCK, {"on_shortage": "partial"})
    outcome = await handle(order(line("B", 3)), ctx)
    assert outcome.kind == "manual" and "B@WH-BJ x3" in outcome.reason


@pytest.mark.anyio
async def test_an_unknown_mode_goes_to_manual_without_calling_erp() -> None:
    ctx, log = await make(STOCK, {"on_shortage": "ignore"})
    outcome = await handle(order(line("A")), ctx)
    assert outcome.kind == "manual" and "on_shortage" in outcome.reason
    assert log.count("erp") == 0


@pytest.mark.anyio
async def test_a_crash_replay_of_the_same_attempt_reuses_the_key() -> None:
    ctx, log = await make(STOCK)
    o = order(line("A", 2), line("B", 3))
    checkpoint = encode(o)
    first = await handle(o, ctx)
    replayed = decode(checkpoint)  # the shortage was never checkpointed
    again = await handle(replayed, ctx)
    assert again == first and replayed.results == o.results
    assert log.count("erp") == 1 and log.duplicates == {"erp": 1}
    assert ctx.ports.erp.available("A", "WH-BJ") == 3  # occupied once


@pytest.mark.anyio
async def test_a_stage_run_twice_after_success_occupies_once() -> None:
    ctx, log = await make(STOCK)
    o = order(line("A", 2))
    assert (await handle(o, ctx)).kind == "next"
    assert (await handle(o, ctx)).kind == "next"
    assert log.count("erp") == 1 and log.duplicates == {}
    assert ctx.ports.erp.available("A", "WH-BJ") == 3


@pytest.mark.anyio
async def test_a_replay_from_manual_after_restock_uses_a_new_key_for_the_short_lines_only() -> None:
    ctx, log = await make(STOCK)
    o = order(line("A", 2), line("B", 3))
    assert (await handle(o, ctx)).kind == "manual"
    parked = decode(encode(o))  # the exception centre keeps the order with its results
    # Restock: ERP now has more B (its state is rebuilt from the same effect log).
    restocked = {"erp": {"stock": {"WH-BJ": {"A": 5, "B": 10}}}}
    ctx, log = await make(restocked, log=log)
    assert (await handle(parked, ctx)).kind == "next"
    assert [e.key for e in log.applied("erp")] == ["O1:erp_stock:0", "O1:erp_stock:1"]
    assert occupied_lines(log)[1] == [["B", "WH-BJ", 3]]  # A is not occupied a second time
    state = parked.results["erp_stock"]
    assert state["short"] == [] and state["try"] == 1 and len(state["occupations"]) == 2
    assert sorted(state["occupied"]) == [["A", "WH-BJ", 2], ["B", "WH-BJ", 3]]
    assert ctx.ports.erp.available("A", "WH-BJ") == 3 and ctx.ports.erp.available("B", "WH-BJ") == 7


@pytest.mark.anyio
async def test_still_short_after_a_replay_moves_the_counter_again() -> None:
    ctx, log = await make(STOCK)
    o = order(line("B", 3))
    assert (await handle(o, ctx)).kind == "manual"
    assert (await handle(o, ctx)).kind == "manual"
    assert [e.key for e in log.applied("erp")] == ["O1:erp_stock:0", "O1:erp_stock:1"]
    assert o.results["erp_stock"]["try"] == 2


@pytest.mark.anyio
async def test_a_line_without_warehouse_is_permanent() -> None:
    ctx, log = await make()
    with pytest.raises(PermanentError, match="name no warehouse"):
        await handle(order(line("A", warehouse="")), ctx)
    assert log.count("erp") == 0


@pytest.mark.anyio
async def test_generated_orders_with_a_shortage_rate() -> None:
    ctx, log = await make({"seed": 3, "erp": {"shortage_rate": 0.2}}, {"on_shortage": "partial"})
    outcomes, partial = [], 0
    for i, request in enumerate(generate(200, seed=11)):
        o = to_order(request, f"G{i:05d}", 0.0)
        outcome = await handle(o, ctx)
        outcomes.append(outcome.kind)
        if outcome.kind == "next" and o.results["erp_stock"]["short"]:
            assert o.results["erp_stock"]["occupied"]  # partial: something ships
            partial += 1
    assert set(outcomes) == {"next", "skip", "manual"} and partial > 0
    assert log.count("erp") == outcomes.count("next") + outcomes.count("manual")
