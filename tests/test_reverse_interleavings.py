"""A stateful property test: random interleavings of forward steps and reverse requests (DESIGN R-5).

The pipeline, the reverse flow, settlement, the memory store and the simulated
downstream systems are the real ones; only the stages are small test stages
whose every step waits for the test to allow it (a gate per order). Hypothesis
then chooses what happens next: an order is created (paid or not), paid, one
stage of one order runs, a cancel (whole or some units) or a return is
requested (they run in the background and wait for the forward flow like real
requests), the warehouse or carrier reports, or the relay delivers the outbox.

After every step: every status change an order made is legal for its kind;
nothing is refunded beyond what was paid; every sku's sellable + reserved +
sold equals its initial stock; a cancelled order was never dispatched unless
the dispatch was intercepted. At the end (everything allowed to finish and
every return's goods back): refunds equal the allocated amounts of what was
reversed, and what is sold is exactly what the kept orders hold.
"""
from __future__ import annotations

from collections import Counter

import anyio
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, settings, strategies as s
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from oms_pipeline import config, states
from oms_pipeline.adapters.local_coordination import LocalCoordination
from oms_pipeline.adapters.memory_store import MemoryStore
from oms_pipeline.adapters.memory_timers import MemoryTimers
from oms_pipeline.adapters.simulated import EffectLog, SimSettings, build_simulated_ports
from oms_pipeline.clock import VirtualClock
from oms_pipeline.order import Address, Amounts, Line, Order, decode
from oms_pipeline.outcome import NEXT
from oms_pipeline.pipeline import Pipeline
from oms_pipeline.relay import execute
from oms_pipeline.reverse import Reverse
from oms_pipeline.schemas import ReportIn, ReverseIn, ReverseLineIn
from oms_pipeline.settlement import cancel_everything, line_amounts, share
from oms_pipeline.stage import StageSpec
from oms_pipeline.stock import Stock
from tests.support.runtime import table

SKUS = ("A", "B")
STOCK = 1000
WH = "WH-1"


class Gates:
    """Each order passes a stage only with a permit the test hands out (or once all are open)."""

    def __init__(self) -> None:
        self.permits: Counter[str] = Counter()
        self.events: dict[str, anyio.Event] = {}
        self.open = False

    async def wait(self, no: str) -> None:
        while not self.open and self.permits[no] == 0:
            event = self.events.setdefault(no, anyio.Event())
            await event.wait()
        if not self.open:
            self.permits[no] -= 1

    def allow(self, no: str) -> None:
        self.permits[no] += 1
        self._wake(no)

    def open_all(self) -> None:
        self.open = True
        for no in list(self.events):
            self._wake(no)

    def _wake(self, no: str) -> None:
        event = self.events.pop(no, None)
        if event is not None:
            event.set()


def specs(gates: Gates) -> list[StageSpec]:
    async def step(order, ctx):
        await gates.wait(order.order_no)
        return NEXT

    async def dispatch(order, ctx):
        await gates.wait(order.order_no)
        order.results["dispatch_wms"] = await ctx.ports.wms.dispatch(ctx.key(order), order.order_no, {})
        return NEXT
    return [StageSpec("pick", "io", step), StageSpec("pack", "io", step), StageSpec("dispatch_wms", "io", dispatch)]


class World:
    """The pipeline and its neighbours, living in the portal's event loop."""

    async def main(self, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Everything runs in this task until `stop` is set (a task group cannot outlive its task)."""
        self.stop = anyio.Event()
        await self.open()
        try:
            async with anyio.create_task_group() as self.task_group:
                await self.task_group.start(self.pipeline.run)
                task_status.started()
                await self.stop.wait()
                self.task_group.cancel_scope.cancel()
        finally:
            await self.effects.close()

    async def open(self) -> None:
        self.gates = Gates()
        self.clock = VirtualClock()
        self.effects = EffectLog()
        await self.effects.open()
        sim = SimSettings.from_mapping({"inventory": {"stock": {WH: {sku: STOCK for sku in SKUS}}}})
        self.ports = build_simulated_ports(sim, self.clock, self.effects)
        settings = config.from_mapping({"stage_defaults": {"io": {"pool": 64, "batch": 1, "timeout": 1e6}}})
        by_name = {spec.name: spec for spec in specs(self.gates)}
        self.store = MemoryStore()
        self.pipeline = Pipeline(settings, by_name, table(list(by_name), ("toc",)), self.store,
                                 MemoryTimers(self.clock), LocalCoordination(self.clock), self.ports, self.clock)
        self.stock = Stock(self.ports.inventory, self.store, self.clock, settings)
        self.pipeline.cancel_commands = cancel_everything
        self.pipeline.on_start.append(self.stock.confirm)
        self.reverse = Reverse(self.pipeline, settings, None)
        self.ports.wms.reporter = self.reverse.warehouse_report
        self.paid: dict[str, int] = {}
        self.tasks = 0

    async def close(self) -> None:
        self.stop.set()

    async def turn(self) -> None:
        for _ in range(30):  # let everything that can move without a permit move
            await anyio.sleep(0)

    async def create(self, i: int, lines: list[tuple[str, int, int]], paid: bool) -> str:
        order = Order(order_no=f"{100000000000000000 + i}", source="app", external_id=f"E{i}", kind="toc",
                      member_id=f"M{i}", consignee=Address(name="n", phone="13800000000", province="p", city="c"),
                      lines=[Line(line_no=n, sku=sku, qty=qty, unit_price=price, warehouse=WH)
                             for n, (sku, qty, price) in enumerate(lines, start=1)],
                      amounts=Amounts(payable=sum(q * p for _, q, p in lines)))
        assert await self.stock.reserve(order) == ""
        await self.pipeline.submit(order, wait_pay=True)
        if paid:
            await self.pay(order.order_no)
        await self.turn()
        return order.order_no

    async def pay(self, no: str) -> None:
        stored = await self.store.get(no)
        amount = decode(stored.doc).amounts.payable

        def booked(o):
            o.amounts.paid = o.amounts.cash = amount
        if await self.pipeline.release(no, "paid", booked):
            self.paid[no] = amount
        await self.turn()

    def request(self, no: str, req: ReverseIn) -> None:
        async def send():
            for _ in range(200):
                answer = await self.reverse.request(no, req)
                if answer.body.get("state") != "requested":
                    break
                await anyio.sleep(0.001)
            self.tasks -= 1
        self.tasks += 1
        self.task_group.start_soon(send)

    async def report(self, no: str, event: str) -> None:
        """In the background, like a request: it may wait for a reverse request on the same order."""
        async def send():
            if event != "outbound" or await self.ports.wms.mark_outbound(no):
                await self.reverse.report(ReportIn(order_no=no, event=event, report_id=f"{no}-{event}"))
            self.tasks -= 1
        self.tasks += 1
        self.task_group.start_soon(send)
        await self.turn()

    async def relay(self) -> None:
        for row in await self.store.outbox_claim("test", 1000, 60.0, self.clock.now()):
            if not row.topic.startswith("order."):
                await execute(self.ports, row.topic, row.key, row.payload)
            await self.store.outbox_done([row.id])

    async def finish(self) -> None:
        self.gates.open_all()
        with anyio.fail_after(30):
            while self.tasks or self.pipeline.in_flight:
                await anyio.sleep(0.01)
            for no in list(self.paid):
                while open_ := [r.state for r in await self.store.reverse_of(no)
                                if r.state in ("waiting_goods", "intercepting")]:
                    if "waiting_goods" in open_:
                        await self.reverse.report(ReportIn(order_no=no, event="return_received",
                                                           report_id=f"{no}-in"))
                    await self.relay()  # delivers interceptions; the warehouse answers
                    await anyio.sleep(0)
            await self.relay()

    async def check(self, final: bool) -> None:
        refunds: Counter[str] = Counter()
        for e in self.effects.applied("finance"):
            refunds[e.payload["order_no"]] += e.payload["amount"]
        dispatched = {e.payload["order_no"] for e in self.effects.applied("wms") if e.op == "dispatch"}
        intercepted = {e.payload["order_no"] for e in self.effects.applied("wms") if e.op == "intercept" and e.result}
        held: Counter[str] = Counter()
        for no in [r.order_no for state in ("queued", "wait_pay", "done", "cancelled", "paused", "manual", "parked")
                   for r in await self.store.in_state(state, 10_000)]:
            order = decode((await self.store.get(no)).doc)
            self._legal(order, await self.store.events(no))
            assert refunds[no] <= self.paid.get(no, 0), (no, refunds[no])
            if order.status == states.CANCELLED:
                assert no not in dispatched or no in intercepted, no
            elif final:
                held.update(self._kept(order))
                self._refunded(order, refunds[no])
        for sku in SKUS:
            level = self.ports.inventory.level(sku, WH)
            assert level.sellable + level.reserved + level.sold == STOCK, (sku, level)
            if final:
                assert level.reserved + level.sold == held[sku], (sku, level, held[sku])

    @staticmethod
    def _legal(order: Order, events) -> None:
        for event in events:
            assert event.to_status in states.legal_targets(order, event.from_status), (order.order_no, event)

    @staticmethod
    def _kept(order: Order) -> Counter[str]:
        ledger = (order.results.get("reverse") or {}).get("lines", {})
        kept: Counter[str] = Counter()
        for line in order.lines:
            kept[line.sku] += line.qty - ledger.get(str(line.line_no), 0)
        return kept

    def _refunded(self, order: Order, refunded: int) -> None:
        paid = self.paid.get(order.order_no, 0)
        ledger = (order.results.get("reverse") or {}).get("lines", {})
        amounts = line_amounts(order)  # the allocation (these test stages do not run `allocate`)
        expected = (paid - order.amounts.payable if paid else 0) + sum(
            share(amounts[line.line_no]["payable"] - amounts[line.line_no]["freight"], line.qty, 0,
                  ledger.get(str(line.line_no), 0)) for line in order.lines)
        assert refunded == expected, (order.order_no, order.status, refunded, expected)


LINES = s.lists(s.tuples(s.sampled_from(SKUS), s.integers(1, 3), s.sampled_from([100, 999, 1500])),
                min_size=1, max_size=3)


@settings(max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck))
class Interleavings(RuleBasedStateMachine):
    orders = Bundle("orders")

    @initialize()
    def start(self) -> None:
        self.portal_cm = start_blocking_portal()
        self.portal = self.portal_cm.__enter__()
        self.world = World()
        self.running, _ = self.portal.start_task(self.world.main)
        self.count = 0

    @rule(target=orders, lines=LINES, paid=s.booleans())
    def create(self, lines, paid):
        self.count += 1
        return self.portal.call(self.world.create, self.count, lines, paid)

    @rule(no=orders)
    def pay(self, no):
        self.portal.call(self.world.pay, no)

    @rule(no=orders, steps=s.integers(1, 3))
    def forward(self, no, steps):
        for _ in range(steps):
            self.world.gates.allow(no)
        self.portal.call(self.world.turn)

    @rule(no=orders, part=s.none() | s.tuples(s.integers(1, 3), s.integers(1, 3)), key=s.integers(0, 2))
    def cancel(self, no, part, key):
        lines = [ReverseLineIn(line_no=part[0], qty=part[1])] if part else None
        self._reverse(no, ReverseIn(request_id=f"c{key}", source="buyer", lines=lines))

    @rule(no=orders, part=s.none() | s.tuples(s.integers(1, 3), s.integers(1, 3)), key=s.integers(0, 2))
    def ret(self, no, part, key):
        lines = [ReverseLineIn(line_no=part[0], qty=part[1])] if part else None
        self._reverse(no, ReverseIn(request_id=f"r{key}", kind="return", lines=lines))

    def _reverse(self, no: str, req: ReverseIn) -> None:
        order = decode(self.portal.call(self.world.store.get, no).doc)
        if req.lines and (req.lines[0].line_no > len(order.lines) or
                          req.lines[0].qty > order.lines[req.lines[0].line_no - 1].qty):
            return  # the API refuses such lines before the reverse flow sees them
        self.portal.call(self._start, no, req)

    async def _start(self, no: str, req: ReverseIn) -> None:
        self.world.request(no, req)
        await self.world.turn()

    @rule(no=orders, event=s.sampled_from(["outbound", "delivered", "rejected", "return_received"]))
    def report(self, no, event):
        self.portal.call(self.world.report, no, event)

    @rule()
    def relay(self):
        self.portal.call(self.world.relay)

    @invariant()
    def consistent(self):
        if hasattr(self, "world"):
            self.portal.call(self.world.check, False)

    def teardown(self):
        if not hasattr(self, "world"):
            return
        try:
            self.portal.call(self.world.finish)
            self.portal.call(self.world.check, True)
        finally:
            self.portal.call(self.world.close)
            self.running.result(timeout=30)
            self.portal_cm.__exit__(None, None, None)


TestInterleavings = pytest.mark.slow(Interleavings.TestCase)
