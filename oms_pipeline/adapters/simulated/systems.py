"""One simulated class per downstream port, built by `build_simulated_ports`.

Their state (stock, dispatched orders, id counters) is rebuilt from the effect
log, so after a restart on a durable log they still answer truthfully. With the
log in its file (`retain_effects = false`) the inventory's reservations stay in
that file (reservations.py) and only its stock levels are rebuilt.
Failures and latencies are drawn from a hash of (seed, system, operation, key
or arguments, attempt number since the last success), so the same calls fail
and wait the same way in any interleaving. A failure is decided before the
effect, so a failed call has no effect. With latency 0 and failure rate 0 a
call on the in-memory log never yields to the event loop (the benchmark
measures the pipeline, not the simulator).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Awaitable, Callable, Iterator

import anyio
import msgspec

from ...order import ZONES
from ...outcome import PermanentError, TransientError
from ...ports.downstream import CHANNELS, Occupation, Ports, Reservation, StockLevel
from .effects import Effect, EffectLog, T
from .reservations import RESERVED, FileReservations, MemoryReservations, Record
from .settings import SimSettings


def _digest(*parts: Any) -> bytes:
    return hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=16).digest()


def _uniforms(*parts: Any) -> tuple[float, float]:
    """Two independent draws in the open interval (0, 1) from a hash of `parts`."""
    d = _digest(*parts)
    scale = 2.0 ** 64
    return ((int.from_bytes(d[:8], "big") + 0.5) / scale, (int.from_bytes(d[8:], "big") + 0.5) / scale)


def _hash_int(*parts: Any) -> int:
    return int.from_bytes(_digest(*parts)[:8], "big")


class _Now:
    """An awaitable that is done at once: no coroutine, no wait."""

    __slots__ = ()

    def __await__(self) -> Iterator[None]:
        return iter(())


_NOW = _Now()


class _Channel:
    """One system's link: latency and failure before the call, the effect log after."""

    def __init__(self, system: str, settings: SimSettings, clock: Any, effects: EffectLog) -> None:
        self.system = system
        self.seed = settings.seed
        self.latency = settings.latency_for(system)
        self.failure_rate = settings.failure_rate_for(system)
        self.clock = clock
        self.effects = effects
        # Attempts are only counted when something is drawn from them.
        self._drawn = self.failure_rate > 0 or (self.latency.mean_ms > 0 and self.latency.dist != "fixed")
        self._instant = not self._drawn and self.latency.mean_ms <= 0  # no wait, no failure
        self._plain = self._instant and not effects.durable  # an effect is then a plain call
        self._attempts: dict[tuple[str, Any], int] = {}

    def arrive(self, op: str, identity: Any) -> Awaitable[None]:
        """Wait the call's latency, then fail it or let it through (reads use this alone). With
        neither a latency nor failures there is nothing to wait for: no coroutine is made."""
        return _NOW if self._instant else self._arrive(op, identity)

    async def _arrive(self, op: str, identity: Any) -> None:
        if not self._drawn:
            await anyio.sleep(self.latency.mean_ms / 1000)
            return
        slot = (op, identity)
        attempt = self._attempts.get(slot, 0)
        self._attempts[slot] = attempt + 1
        u_fail, u_latency = _uniforms(self.seed, self.system, op, identity, attempt)
        if self.latency.mean_ms > 0:
            await anyio.sleep(self.latency.draw_ms(u_latency) / 1000)
        if u_fail < self.failure_rate:
            raise TransientError(f"{self.system}.{op} {identity}: simulated outage (attempt {attempt + 1})")
        self._attempts.pop(slot, None)  # counts restart after a success: memory stays bounded

    async def effect(self, op: str, key: str, payload: dict[str, Any], apply: Callable[[], T],
                     result_type: Any = Any) -> T:
        if not isinstance(key, str) or not key:
            raise PermanentError(f"{self.system}.{op}: an idempotency key is required, got {key!r}")
        if self._plain:  # nothing to wait for
            return self.effects.apply_now(self.system, op, key, payload, apply, at=self.clock.now())
        await self.arrive(op, key)
        return await self.effects.apply(self.system, op, key, payload, apply,
                                        at=self.clock.now(), result_type=result_type)


class _Ids:
    """Unique ids per system; restored from logged results so a restart never reuses one."""

    def __init__(self, prefix: str, width: int = 10) -> None:
        self.prefix, self.width, self.last = prefix, width, 0

    def next(self) -> str:
        self.last += 1
        return self.prefix + str(self.last).zfill(self.width)

    def restore(self, issued: str) -> None:
        if issued.startswith(self.prefix) and issued[len(self.prefix):].isdigit():
            self.last = max(self.last, int(issued[len(self.prefix):]))


def _mask(recipient: str) -> str:
    """Personal data stays out of the log: 13812345678 -> 138****5678."""
    if len(recipient) >= 7:
        return f"{recipient[:3]}****{recipient[-4:]}"
    return recipient[:1] + "***"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PermanentError(message)


# ---------------------------------------------------------------------------
# The simulated systems
# ---------------------------------------------------------------------------

class SimNotification:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._ids = _Ids("MSG")
        self.sent: Counter[str] = Counter()  # per channel

    async def send(self, key: str, channel: str, recipient: str, template: str,
                   params: dict[str, Any]) -> str:
        payload = {"channel": channel, "to": _mask(recipient), "template": template}
        return await self._ch.effect("send", key, payload, lambda: self._send(channel, recipient, template))

    def _send(self, channel: str, recipient: str, template: str) -> str:
        _require(channel in CHANNELS, f"notification: unknown channel {channel!r} (known: {', '.join(CHANNELS)})")
        _require(bool(recipient), "notification: empty recipient")
        _require(bool(template), "notification: empty template")
        self.sent[channel] += 1
        return self._ids.next()

    def replay(self, effect: Effect) -> None:
        self.sent[effect.payload["channel"]] += 1
        self._ids.restore(effect.result)


class SimFinance:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._vouchers, self._refunds, self._credits = _Ids("FV"), _Ids("RF"), _Ids("CN")
        self.vouchered: Counter[str] = Counter()  # order -> cents
        self.refunded: Counter[str] = Counter()
        self.credited: Counter[str] = Counter()  # settled on account: credit notes

    async def push_voucher(self, key: str, order_no: str, amount_cents: int, method: str) -> str:
        payload = {"order_no": order_no, "amount": amount_cents, "method": method}
        return await self._ch.effect("push_voucher", key, payload,
                                     lambda: self._voucher(order_no, amount_cents))

    async def refund(self, key: str, order_no: str, amount_cents: int, reason: str) -> str:
        payload = {"order_no": order_no, "amount": amount_cents, "reason": reason}
        return await self._ch.effect("refund", key, payload, lambda: self._refund(order_no, amount_cents))

    async def credit_note(self, key: str, order_no: str, amount_cents: int, reason: str) -> str:
        payload = {"order_no": order_no, "amount": amount_cents, "reason": reason}
        return await self._ch.effect("credit_note", key, payload, lambda: self._credit(order_no, amount_cents))

    def _credit(self, order_no: str, amount: int) -> str:
        _require(amount > 0, f"finance: credit amount must be positive, got {amount}")
        self.credited[order_no] += amount
        return self._credits.next()

    def _voucher(self, order_no: str, amount: int) -> str:
        _require(amount >= 0, f"finance: voucher amount must not be negative, got {amount}")
        self.vouchered[order_no] += amount
        return self._vouchers.next()

    def _refund(self, order_no: str, amount: int) -> str:
        _require(amount > 0, f"finance: refund amount must be positive, got {amount}")
        self.refunded[order_no] += amount
        return self._refunds.next()

    def replay(self, effect: Effect) -> None:
        if effect.op == "push_voucher":
            self.vouchered[effect.payload["order_no"]] += effect.payload["amount"]
            self._vouchers.restore(effect.result)
        elif effect.op == "credit_note":
            self.credited[effect.payload["order_no"]] += effect.payload["amount"]
            self._credits.restore(effect.result)
        else:
            self.refunded[effect.payload["order_no"]] += effect.payload["amount"]
            self._refunds.restore(effect.result)


class SimProduct:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._settings = settings.product
        self._seed = settings.seed

    async def tax_rate_bp(self, sku: str) -> int:
        await self._ch.arrive("tax_rate_bp", sku)
        return self._settings.tax_rates.get(sku, self._settings.default_tax_rate_bp)

    async def bundle_components(self, sku: str) -> list[tuple[str, int, int]]:
        await self._ch.arrive("bundle_components", sku)
        listed = self._settings.bundles.get(sku)
        if listed is not None:
            return list(listed)
        if not self._settings.generate_bundles:
            return []
        h = _hash_int(self._seed, "bundle", sku)
        count = 2 + h % 2
        return [(f"{sku}-C{i + 1}", 1 + (h >> (2 + i)) % 2, 1 + (h >> (8 + 4 * i)) % 5) for i in range(count)]

    def replay(self, effect: Effect) -> None:
        pass  # reads only


class SimRisk:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._settings = settings.risk
        self._seed = settings.seed

    async def fraud_score(self, order_no: str, member_id: str, phone: str, amount_cents: int) -> int:
        """100 for known cheats; else a stable per-member base plus points for large amounts."""
        await self._ch.arrive("fraud_score", order_no)
        rule = self._settings
        if member_id in rule.cheat_members or phone in rule.cheat_phones:
            return 100
        score = _hash_int(self._seed, "risk", member_id, phone) % rule.base_max
        if amount_cents >= rule.large_amount_cents:
            score += rule.large_amount_points
        return min(score, 99)

    def replay(self, effect: Effect) -> None:
        pass  # reads only


class SimPurchasing:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._ids = _Ids("PS")
        self.presales: dict[str, list[tuple[str, int]]] = {}

    async def push_presale(self, key: str, order_no: str, lines: list[tuple[str, int]]) -> str:
        payload = {"order_no": order_no, "lines": [[sku, qty] for sku, qty in lines]}
        return await self._ch.effect("push_presale", key, payload, lambda: self._push(order_no, lines))

    def _push(self, order_no: str, lines: list[tuple[str, int]]) -> str:
        _require(bool(lines), f"purchasing: presale {order_no} has no lines")
        _require(all(qty > 0 for _, qty in lines), f"purchasing: presale {order_no} has a line with qty <= 0")
        self.presales.setdefault(order_no, []).extend((sku, qty) for sku, qty in lines)
        return self._ids.next()

    def replay(self, effect: Effect) -> None:
        self.presales.setdefault(effect.payload["order_no"], []).extend(
            (sku, qty) for sku, qty in effect.payload["lines"])
        self._ids.restore(effect.result)


class SimTms:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._ids = _Ids("WB", width=12)
        self._pickups = _Ids("PU")
        self.waybills: dict[str, list[str]] = {}  # order -> waybill numbers
        self.pickups: dict[str, str] = {}  # order -> pickup id of its return

    async def request_waybill(self, key: str, order_no: str, warehouse: str, zone: str) -> str:
        payload = {"order_no": order_no, "warehouse": warehouse, "zone": zone}
        return await self._ch.effect("request_waybill", key, payload, lambda: self._issue(order_no, zone))

    async def pickup(self, key: str, order_no: str, city: str) -> str:
        return await self._ch.effect("pickup", key, {"order_no": order_no, "city": city},
                                     lambda: self._pickup(order_no))

    def _pickup(self, order_no: str) -> str:
        pickup = self._pickups.next()
        self.pickups[order_no] = pickup
        return pickup

    def _issue(self, order_no: str, zone: str) -> str:
        _require(zone in ZONES, f"tms: unknown temperature zone {zone!r} (known: {', '.join(ZONES)})")
        waybill = self._ids.next()
        self.waybills.setdefault(order_no, []).append(waybill)
        return waybill

    def replay(self, effect: Effect) -> None:
        if effect.op == "pickup":
            self.pickups[effect.payload["order_no"]] = effect.result
            self._pickups.restore(effect.result)
            return
        self.waybills.setdefault(effect.payload["order_no"], []).append(effect.result)
        self._ids.restore(effect.result)


class SimAccounts:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._ids = _Ids("AC")
        self.credited: Counter[tuple[str, str]] = Counter()  # (member, account) -> cents

    async def credit(self, key: str, member_id: str, account: str, amount: int, order_no: str) -> str:
        payload = {"member_id": member_id, "account": account, "amount": amount, "order_no": order_no}
        return await self._ch.effect("credit", key, payload, lambda: self._credit(member_id, account, amount))

    def _credit(self, member_id: str, account: str, amount: int) -> str:
        _require(account in ("points", "coupon", "balance"), f"accounts: unknown account {account!r}")
        _require(amount > 0, f"accounts: credit amount must be positive, got {amount}")
        self.credited[(member_id, account)] += amount
        return self._ids.next()

    def replay(self, effect: Effect) -> None:
        p = effect.payload
        self.credited[(p["member_id"], p["account"])] += p["amount"]
        self._ids.restore(effect.result)


class SimErp:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._settings = settings.erp
        self._seed = settings.seed
        self._ids = _Ids("OC")
        self._stock: dict[tuple[str, str], int] = {}

    def available(self, sku: str, warehouse: str) -> int:
        found = self._stock.get((sku, warehouse))
        if found is None:
            found = self._settings.stock.get(warehouse, {}).get(sku, self._settings.default_stock)
        return found

    async def occupy(self, key: str, order_no: str, lines: list[tuple[str, str, int]]) -> Occupation:
        payload = {"order_no": order_no, "lines": [list(line) for line in lines]}
        return await self._ch.effect("occupy", key, payload, lambda: self._occupy(key, order_no, lines),
                                     Occupation)

    def _occupy(self, key: str, order_no: str, lines: list[tuple[str, str, int]]) -> Occupation:
        _require(bool(lines), f"erp: occupation for {order_no} has no lines")
        _require(all(qty > 0 for _, _, qty in lines), f"erp: occupation for {order_no} has a line with qty <= 0")
        short = []
        for sku, warehouse, qty in lines:
            have = self.available(sku, warehouse)
            if qty > have or self._forced_short(key, sku, warehouse):
                short.append((sku, warehouse, qty))  # all or nothing per line
            else:
                self._stock[(sku, warehouse)] = have - qty
        return Occupation(occupation_id=self._ids.next(), short=short)

    def _forced_short(self, key: str, sku: str, warehouse: str) -> bool:
        rate = self._settings.shortage_rate
        return rate > 0 and _uniforms(self._seed, "erp-short", key, sku, warehouse)[0] < rate

    def replay(self, effect: Effect) -> None:
        # Trust the logged answer, not today's settings: the stock moved as it said.
        answer = effect.result if isinstance(effect.result, Occupation) else msgspec.convert(effect.result, Occupation)
        short = Counter(answer.short)
        for sku, warehouse, qty in effect.payload["lines"]:
            if short[(sku, warehouse, qty)]:
                short[(sku, warehouse, qty)] -= 1
            else:
                self._stock[(sku, warehouse)] = self.available(sku, warehouse) - qty
        self._ids.restore(answer.occupation_id)


class SimWms:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._ids = _Ids("WMS")
        self.dispatched: dict[str, str] = {}  # order -> WMS task id
        self.outbound: set[str] = set()
        self.intercepted: set[str] = set()
        # Where the warehouse's reports go: the OMS's report intake (set by the app), as a
        # real WMS would publish to the reports queue. None: reports are dropped.
        self.reporter: Callable[[str, str, str], Awaitable[Any]] | None = None

    async def dispatch(self, key: str, order_no: str, payload: dict[str, Any]) -> str:
        summary = {"order_no": order_no, "fields": len(payload)}
        return await self._ch.effect("dispatch", key, summary, lambda: self._dispatch(order_no))

    async def intercept(self, key: str, order_no: str) -> bool:
        return await self._ch.effect("intercept", key, {"order_no": order_no},
                                     lambda: self._intercept(order_no), bool)

    async def report(self, order_no: str, event: str, report_id: str) -> None:
        if self.reporter is not None:
            await self.reporter(order_no, event, report_id)

    async def mark_outbound(self, order_no: str) -> bool:
        """The warehouse ships the order (a simulated event, not a command from the OMS).

        False, with nothing logged, when the order was never dispatched or was
        intercepted. Logged so a restart still knows the order is out.
        """
        if order_no in self.outbound:
            return True
        if order_no not in self.dispatched or order_no in self.intercepted:
            return False
        return await self._ch.effects.apply("wms", "outbound", f"{order_no}:wms_outbound",
                                            {"order_no": order_no}, lambda: self._out(order_no),
                                            at=self._ch.clock.now(), result_type=bool)

    def _dispatch(self, order_no: str) -> str:
        _require(order_no not in self.intercepted, f"wms: order {order_no} was intercepted; it cannot be dispatched")
        task = self._ids.next()
        self.dispatched[order_no] = task
        return task

    def _intercept(self, order_no: str) -> bool:
        if order_no not in self.dispatched or order_no in self.outbound:
            return False
        self.intercepted.add(order_no)
        return True

    def _out(self, order_no: str) -> bool:
        self.outbound.add(order_no)
        return True

    def replay(self, effect: Effect) -> None:
        order_no = effect.payload["order_no"]
        if effect.op == "dispatch":
            self.dispatched[order_no] = effect.result
            self._ids.restore(effect.result)
        elif effect.op == "intercept" and effect.result:
            self.intercepted.add(order_no)
        elif effect.op == "outbound":
            self.outbound.add(order_no)


class SimSupplier:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._ids = _Ids("SUP")
        self.dispatched: dict[str, tuple[str, str]] = {}  # order -> (supplier, task id)

    async def dispatch(self, key: str, order_no: str, supplier: str, payload: dict[str, Any]) -> str:
        summary = {"order_no": order_no, "supplier": supplier, "fields": len(payload)}
        return await self._ch.effect("dispatch", key, summary, lambda: self._dispatch(order_no, supplier))

    def _dispatch(self, order_no: str, supplier: str) -> str:
        _require(bool(supplier), f"supplier: order {order_no} names no supplier")
        task = self._ids.next()
        self.dispatched[order_no] = (supplier, task)
        return task

    def replay(self, effect: Effect) -> None:
        self.dispatched[effect.payload["order_no"]] = (effect.payload["supplier"], effect.result)
        self._ids.restore(effect.result)


class SimInvoice:
    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._ids = _Ids("INV")
        self.invoiced: Counter[str] = Counter()  # order -> cents

    async def request(self, key: str, order_no: str, title: str, amount_cents: int) -> str:
        payload = {"order_no": order_no, "title": title, "amount": amount_cents}
        return await self._ch.effect("request", key, payload, lambda: self._request(order_no, title, amount_cents))

    def _request(self, order_no: str, title: str, amount: int) -> str:
        _require(bool(title), f"invoice: order {order_no} has no invoice title")
        _require(amount > 0, f"invoice: amount must be positive, got {amount}")
        self.invoiced[order_no] += amount
        return self._ids.next()

    def replay(self, effect: Effect) -> None:
        self.invoiced[effect.payload["order_no"]] += effect.payload["amount"]
        self._ids.restore(effect.result)


class SimInventory:
    """sellable/reserved/sold per (sku, warehouse); their sum never changes.

    Reservations are kept by key with their creation time (in memory, or in the
    effect log's file), the open ones for the OMS's reconciler (`open_reservations`).
    The levels are per place, as many as the catalogue has: they stay in memory.
    """

    def __init__(self, channel: _Channel, settings: SimSettings) -> None:
        self._ch = channel
        self._settings = settings.inventory
        self._levels: dict[tuple[str, str], list[int]] = {}  # [sellable, reserved, sold]
        file = channel.effects.file
        self._reservations = FileReservations(file) if file is not None else MemoryReservations()
        if self._reservations.in_file:
            self._restore_levels()

    def level(self, sku: str, warehouse: str) -> StockLevel:
        return StockLevel(*self._level(sku, warehouse))

    def levels(self) -> dict[tuple[str, str], StockLevel]:
        """Every (sku, warehouse) touched so far (the others are at their initial stock)."""
        return {place: StockLevel(*level) for place, level in self._levels.items()}

    def initial(self, sku: str, warehouse: str) -> int:
        return self._settings.stock.get(warehouse, {}).get(sku, self._settings.default_stock)

    async def stock(self, sku: str, warehouse: str) -> StockLevel:
        await self._ch.arrive("stock", (sku, warehouse))
        return self.level(sku, warehouse)

    async def open_reservations(self, created_before: float, limit: int = 500,
                                after: str = "") -> list[Reservation]:
        await self._ch.arrive("open_reservations", (created_before, after))
        return [Reservation(k, r.sku, r.warehouse, r.qty, r.created_at)
                for k, r in self._reservations.open_page(created_before, limit, after)]

    async def reserve(self, key: str, sku: str, warehouse: str, qty: int) -> bool:
        payload = {"sku": sku, "warehouse": warehouse, "qty": qty}
        return await self._ch.effect("reserve", key, payload,
                                     lambda: self._reserve(key, sku, warehouse, qty, self._ch.clock.now()), bool)

    async def confirm(self, key: str) -> None:
        await self._ch.effect("confirm", key, {}, lambda: self._confirm(key))

    async def release(self, key: str) -> None:
        await self._ch.effect("release", key, {}, lambda: self._release(key))

    async def restock(self, key: str, sku: str, warehouse: str, qty: int) -> None:
        payload = {"sku": sku, "warehouse": warehouse, "qty": qty}
        await self._ch.effect("restock", key, payload, lambda: self._restock(key, sku, warehouse, qty))

    def _level(self, sku: str, warehouse: str) -> list[int]:
        found = self._levels.get((sku, warehouse))
        if found is None:
            found = self._levels[(sku, warehouse)] = [self.initial(sku, warehouse), 0, 0]
        return found

    def _reserve(self, key: str, sku: str, warehouse: str, qty: int, at: float,
                 granted: bool | None = None) -> bool:
        _require(qty > 0, f"inventory: reservation {key} must be for a positive qty, got {qty}")
        if self._reservations.get(key) is not None:  # released before it was made: stays unreserved
            return False
        level = self._level(sku, warehouse)
        ok = level[0] >= qty if granted is None else granted
        if ok:
            level[0] -= qty
            level[1] += qty
        self._reservations.add(key, Record(sku, warehouse, qty, RESERVED if ok else "refused", at))
        return ok

    def _confirm(self, key: str) -> None:
        r = self._reservations.get(key)
        _require(r is not None, f"inventory: no reservation under key {key}")
        _require(r.state == RESERVED, f"inventory: reservation {key} is {r.state}, it cannot be confirmed")
        level = self._level(r.sku, r.warehouse)
        level[1] -= r.qty
        level[2] += r.qty
        self._reservations.settle(key, r, "sold")

    def _release(self, key: str) -> None:
        r = self._reservations.get(key)
        if r is None:
            self._reservations.add(key, Record("", "", 0, "released"))  # tombstone
            return
        _require(r.state != "sold", f"inventory: reservation {key} is sold; releasing it is a return")
        if r.state == RESERVED:
            level = self._level(r.sku, r.warehouse)
            level[1] -= r.qty
            level[0] += r.qty
        self._reservations.settle(key, r, "released")

    def _restock(self, key: str, sku: str, warehouse: str, qty: int) -> None:
        _require(qty > 0, f"inventory: restock {key} must be for a positive qty, got {qty}")
        level = self._level(sku, warehouse)
        _require(level[2] >= qty, f"inventory: restock {key}: only {level[2]} of {sku}@{warehouse} sold, not {qty}")
        level[2] -= qty
        level[0] += qty

    def _restore_levels(self) -> None:
        """Levels after a restart with the reservations in the file: what they hold now (restocks
        are replayed on top, `replay`)."""
        for sku, warehouse, state, units in self._reservations.held():
            level = self._level(sku, warehouse)
            level[0] -= units
            level[1 if state == RESERVED else 2] += units

    def replay(self, effect: Effect) -> None:
        key, p = effect.key, effect.payload
        if self._reservations.in_file and effect.op != "restock":
            return  # the reservation's state is in the file, its units in the levels already
        if effect.op == "reserve":
            self._reserve(key, p["sku"], p["warehouse"], p["qty"], effect.at, granted=bool(effect.result))
        elif effect.op == "confirm":
            self._confirm(key)
        elif effect.op == "restock":
            self._restock(key, p["sku"], p["warehouse"], p["qty"])
        else:
            self._release(key)


_CLASSES = {
    "notification": SimNotification, "finance": SimFinance, "product": SimProduct, "risk": SimRisk,
    "purchasing": SimPurchasing, "tms": SimTms, "erp": SimErp, "wms": SimWms, "supplier": SimSupplier,
    "invoice": SimInvoice, "inventory": SimInventory, "accounts": SimAccounts,
}


def build_simulated_ports(settings: SimSettings, clock: Any, effects: EffectLog) -> Ports:
    """One simulated system per port, their state rebuilt from what `effects` already holds."""
    if not effects.is_open:
        raise RuntimeError(f"effect log {effects.path} is not open: await open() before building ports")
    systems = {name: cls(_Channel(name, settings, clock, effects), settings) for name, cls in _CLASSES.items()}
    for effect in effects.stored():
        systems[effect.system].replay(effect)
    return Ports(**systems)
