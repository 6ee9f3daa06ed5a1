"""`oms`: the command line, a thin client of the daemon's HTTP API.

Exit codes: 0 ok, 1 the request failed, 2 usage or configuration error.
Errors go to stderr as one line. `routes` and `check-config` read the config
files directly and need no running daemon.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any, Iterable, Iterator

import orjson

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class Failure(Exception):
    """A request failed; the message is the one line printed."""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except Failure as exc:
        print(f"oms: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_FAIL
    except BrokenPipeError:  # `oms routes | head`: the reader has all it wanted
        sys.stderr.close()
        return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oms", description="Command line for the oms-pipeline daemon.")
    p.add_argument("--url", default=os.environ.get("OMS_URL", "http://127.0.0.1:8480"),
                   help="the daemon's API (env OMS_URL)")
    p.add_argument("--token", default=os.environ.get("OMS_TOKEN", ""), help="bearer token (env OMS_TOKEN)")
    sub = p.add_subparsers(required=True, metavar="COMMAND")

    s = sub.add_parser("submit", help="submit orders: a JSON-lines file, - for stdin, or --generate N")
    s.add_argument("file", nargs="?", help="JSON lines, one order request each; - reads stdin")
    s.add_argument("--generate", type=int, metavar="N", help="submit N generated orders")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--concurrency", type=int, default=32)
    s.set_defaults(run=cmd_submit)

    s = sub.add_parser("pay", help="send a payment notification for an order (its payable amount)")
    s.add_argument("order_no")
    s.add_argument("--payment-id", help="default: pay-ORDERNO")
    s.add_argument("--amount", type=int, help="cents; default: the order's payable")
    s.set_defaults(run=cmd_pay)

    s = sub.add_parser("cancel", help="cancel an order, whole or some lines (the reverse flow)")
    _reverse_arguments(s)
    s.add_argument("--source", default="customer_service", help="who asks (default customer_service)")
    s.set_defaults(run=cmd_cancel)

    s = sub.add_parser("return", help="after-sales: return, reject, exchange, reissue or pull-back")
    _reverse_arguments(s)
    s.add_argument("--kind", default="return", choices=("return", "reject", "exchange", "reissue", "pullback"))
    s.add_argument("--source", default="buyer")
    s.add_argument("--pickup", action="store_true", help="the carrier collects the goods")
    s.add_argument("--mode", default="new_order", choices=("new_order", "wait_stock", "cancel"),
                   help="pull-back: what becomes of it")
    s.set_defaults(run=cmd_return)

    s = sub.add_parser("can-pay", help="may the cashier take a payment for an order now (and its deadline)")
    s.add_argument("order_no")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_can_pay)

    s = sub.add_parser("order", help="one order").add_subparsers(required=True, metavar="ACTION")
    show = s.add_parser("show", help="show an order")
    show.add_argument("order_no")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=cmd_order_show)

    s = sub.add_parser("order-no", help="where an order number came from: its second of issue, and with the "
                                        "config's order_no_key the instance and sequence behind it")
    s.add_argument("order_no")
    s.add_argument("--config", help="config file (default: config/oms.toml)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_order_no)

    s = sub.add_parser("orders", help="orders").add_subparsers(required=True, metavar="ACTION")
    lst = s.add_parser("list", help="list orders by runtime state, member, status or customer tab")
    lst.add_argument("--state", help="runtime state (default: queued, unless another filter is given)")
    lst.add_argument("--member", help="only this member's orders")
    lst.add_argument("--status", help="business status(es), comma-separated (WAIT_PAY, PAID, ...)")
    lst.add_argument("--tab", help="customer tab: to_pay, to_ship, to_receive, to_review, after_sales, closed")
    lst.add_argument("--limit", type=int, default=50)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(run=cmd_orders_list)

    s = sub.add_parser("exceptions", help="the exception centre").add_subparsers(required=True, metavar="ACTION")
    s.add_parser("list", help="orders waiting for a person").set_defaults(run=cmd_exceptions_list)
    rp = s.add_parser("replay", help="run an order's failed stage again")
    rp.add_argument("order_no")
    rp.set_defaults(run=cmd_exceptions_replay)

    s = sub.add_parser("stats", help="pipeline counters")
    s.add_argument("--json", action="store_true")
    s.set_defaults(run=cmd_stats)

    s = sub.add_parser("routes", help="print every path through the stages (from the config files)")
    s.add_argument("--kind", help="only this order kind")
    s.add_argument("--config", help="config file (default: config/oms.toml)")
    s.set_defaults(run=cmd_routes)

    s = sub.add_parser("check-config", help="validate a config file and its routing table")
    s.add_argument("file")
    s.set_defaults(run=cmd_check_config)

    s = sub.add_parser("migrate", help="apply the store's database migrations (the config's store.url)")
    s.add_argument("--config", help="config file (default: config/oms.toml)")
    s.set_defaults(run=cmd_migrate)

    from .benchmark.command import add_arguments  # argparse only: the harness loads when it runs
    s = add_arguments(sub.add_parser("bench", help="run a benchmark scenario (bench/scenarios) and write "
                                                   "JSON, Markdown and PNG results"))
    s.set_defaults(run=cmd_bench)
    return p


# -- HTTP ---------------------------------------------------------------------

def request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    import urllib.error
    import urllib.request
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, _decode(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _decode(exc.read())
    except urllib.error.URLError as exc:
        raise Failure(f"cannot reach the daemon at {args.url}: {exc.reason}") from None


def _decode(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


def ok(status: int, body: Any) -> Any:
    if status >= 400:
        detail = body.get("error", body) if isinstance(body, dict) else body
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors:
            detail = f"{detail}: " + "; ".join(f"{e['path']}: {e['reason']}" for e in errors)
        raise Failure(f"HTTP {status}: {detail}")
    return body


def emit(body: Any, as_json: bool, text: str) -> int:
    print(json.dumps(body, ensure_ascii=False, indent=2) if as_json else text)
    return EXIT_OK


# -- commands -----------------------------------------------------------------

def cmd_submit(args: argparse.Namespace) -> int:
    if (args.file is None) == (args.generate is None):
        print("oms: submit takes a FILE (or -) or --generate N", file=sys.stderr)
        return EXIT_USAGE
    if args.generate is not None:
        from .generator import generate
        orders: Iterable[dict] = generate(args.generate, args.seed)
        total = args.generate
    else:
        orders = list(_read_lines(args.file))
        total = len(orders)
    created, failed = _submit_all(args, orders, total)
    print(f"submitted {total}: {created} created, {total - created - failed} already known, {failed} rejected")
    return EXIT_OK if failed == 0 else EXIT_FAIL


def _read_lines(path: str) -> Iterator[dict]:
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    with stream:
        for number, line in enumerate(stream, start=1):
            if line.strip():
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise Failure(f"{path}:{number}: not valid JSON: {exc}") from None


def _submit_all(args: argparse.Namespace, orders: Iterable[dict], total: int) -> tuple[int, int]:
    from concurrent.futures import ThreadPoolExecutor
    created = failed = done = 0
    started = time.monotonic()
    with ThreadPoolExecutor(max(1, args.concurrency)) as pool:
        for status, body in pool.map(lambda o: request(args, "POST", "/orders", o), orders):
            done += 1
            if status == 201:
                created += 1
            elif status >= 400:
                failed += 1
                print(f"\noms: rejected: {_reason(status, body)}", file=sys.stderr)
            _progress(done, total, started)
    print(file=sys.stderr)
    return created, failed


def _reason(status: int, body: Any) -> str:
    try:
        ok(status, body)
    except Failure as exc:
        return str(exc)
    return ""


def _progress(done: int, total: int, started: float) -> None:
    if done % 50 and done != total:
        return
    width = 30
    filled = width * done // max(1, total)
    rate = done / max(1e-9, time.monotonic() - started)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} orders, {rate:,.0f}/s",
          end="", file=sys.stderr, flush=True)


def cmd_pay(args: argparse.Namespace) -> int:
    amount = args.amount
    if amount is None:
        order = ok(*request(args, "GET", f"/orders/{args.order_no}"))
        amount = order["order"]["amounts"]["payable"]
    body = {"order_no": args.order_no, "payment_id": args.payment_id or f"pay-{args.order_no}",
            "amount": amount, "channel": "cli"}
    result = ok(*request(args, "POST", "/payments", body))
    if result.get("refunded"):
        print(f"{args.order_no}: cancelled; the payment ({amount} cents) is refunded")
    elif result.get("reason"):
        print(f"{args.order_no}: sent to manual review: {result['reason']}")
    else:
        print(f"{args.order_no}: {'already paid' if result['duplicate'] else 'paid'} ({amount} cents)")
    return EXIT_OK


def _reverse_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("order_no")
    s.add_argument("--reason", default="", help="why (kept on the reverse order)")
    s.add_argument("--lines", type=_lines, help="LINE:QTY,... (default: the whole order)")
    s.add_argument("--request-id", help="makes a retry the same request (default: one per call)")
    s.add_argument("--json", action="store_true")


def _lines(text: str) -> list[dict[str, int]]:
    try:
        pairs = [part.split(":") for part in text.split(",")]
        return [{"line_no": int(no), "qty": int(qty)} for no, qty in pairs]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LINE:QTY[,LINE:QTY...], e.g. 1:2,3:1") from None


def _reverse_body(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    body = {"request_id": args.request_id or f"cli-{uuid.uuid4().hex[:12]}", "source": args.source, **extra}
    if args.reason:
        body["reason"] = args.reason
    if args.lines:
        body["lines"] = args.lines
    return body


def _show_reverse(args: argparse.Namespace, body: dict[str, Any]) -> int:
    text = f"{body['order_no']}: {body['kind']} {body['reverse_no']} {body['state']}"
    if body.get("result"):
        text += f": {body['result']}"
    if body.get("refund"):
        text += f" (refund {body['refund']} cents)"
    if body.get("new_order_no"):
        text += f"; new order {body['new_order_no']}"
    return emit(body, args.json, text)


def cmd_cancel(args: argparse.Namespace) -> int:
    body = ok(*request(args, "POST", f"/orders/{args.order_no}/cancel", _reverse_body(args)))
    return _show_reverse(args, body) if body["state"] != "refused" else _refused(args, body)


def cmd_return(args: argparse.Namespace) -> int:
    extra = {"kind": args.kind, "pickup": args.pickup, "mode": args.mode}
    body = ok(*request(args, "POST", f"/orders/{args.order_no}/returns", _reverse_body(args, **extra)))
    return _show_reverse(args, body) if body["state"] != "refused" else _refused(args, body)


def _refused(args: argparse.Namespace, body: dict[str, Any]) -> int:
    if args.json:
        print(json.dumps(body, ensure_ascii=False, indent=2))
    raise Failure(f"{body['order_no']}: {body['kind']} refused: {body['result']}")


def cmd_can_pay(args: argparse.Namespace) -> int:
    body = ok(*request(args, "GET", f"/orders/{args.order_no}/can-pay"))
    deadline = body["pay_deadline"]
    until = time.strftime(" (deadline %Y-%m-%d %H:%M:%S)", time.localtime(deadline)) if deadline else ""
    return emit(body, args.json, f"{args.order_no}: {'yes' if body['can_pay'] else 'no'}, {body['reason']}{until}")


def cmd_order_show(args: argparse.Namespace) -> int:
    view = ok(*request(args, "GET", f"/orders/{args.order_no}"))
    order = view["order"]
    lines = [f"order {view['order_no']}  {view['status']}  ({view['state']} at {view['stage']})",
             f"  kind {order['kind']}  source {order['source']}  flags {order['flags']}",
             f"  payable {order['amounts']['payable']}  paid {order['amounts']['paid']}  lines {len(order['lines'])}"]
    lines += [f"  {h['stage']:<15} {h['outcome']:<8} {h['reason']}" for h in view.get("history", [])]
    return emit(view, args.json, "\n".join(lines))


def _config(path: str | None) -> Any:
    """The settings of a config file, or None once what is wrong with it is printed."""
    from . import config
    try:
        return config.load(path)
    except config.ConfigError as exc:
        print(f"oms: {exc}", file=sys.stderr)
        return None


def cmd_order_no(args: argparse.Namespace) -> int:
    """Read locally, without the daemon: the key is in the config file, as the daemon has it."""
    from . import order_no
    settings = _config(args.config)
    if settings is None:
        return EXIT_USAGE
    no = args.order_no.split("-")[0]  # a split child's number is its parent's + "-N"
    daemon = settings.daemon
    numbers = order_no.OrderNumbers(daemon.order_no_key.encode(), daemon.instance_id, order_no.InMemoryBlocks())
    try:
        instance, seq = numbers.counter_of(no)  # checks the number first
    except ValueError:
        print(f"oms: {args.order_no!r} is not an order number: {order_no.SHAPE} ({order_no.PREFIX}, the UTC "
              f"second of issue as yyMMddHHmmss, 16 digits, a check digit)", file=sys.stderr)
        return EXIT_USAGE
    issued = order_no.issued_at(no)
    body = {"order_no": args.order_no, "issued_at": issued, "instance": instance, "sequence": seq}
    when = (time.strftime("issued %Y-%m-%d %H:%M:%S UTC", time.gmtime(issued)) if issued is not None
            else "issued before numbers carried their time")
    return emit(body, args.json, f"{args.order_no}: {when}, instance {instance}, sequence {seq} "
                                 f"(decoded with the configured order_no_key)")


def cmd_orders_list(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode
    filters = {"member": args.member, "status": args.status, "tab": args.tab}
    state = args.state if args.state is not None else ("" if any(filters.values()) else "queued")
    params = {"state": state, **filters, "limit": args.limit}
    query = urlencode({k: v for k, v in params.items() if v not in (None, "")})
    body = ok(*request(args, "GET", f"/orders?{query}"))
    text = "\n".join(f"{o['order_no']}  {o['status']:<14} {o['stage']}" for o in body["items"]) or "(none)"
    return emit(body, args.json, text)


def cmd_exceptions_list(args: argparse.Namespace) -> int:
    body = ok(*request(args, "GET", "/exceptions"))
    print("\n".join(f"{o['order_no']}  {o['stage']:<15} {o['reason']}" for o in body["items"]) or "(none)")
    return EXIT_OK


def cmd_exceptions_replay(args: argparse.Namespace) -> int:
    ok(*request(args, "POST", f"/exceptions/{args.order_no}/replay"))
    print(f"{args.order_no}: replayed")
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    body = ok(*request(args, "GET", "/stats"))
    rows = [f"{name:<15} queue {s['queue']:>5}/{s['bound']:<5} busy {s['busy']:>3}/{s['pool']:<3} "
            f"next {s['processed']['next']} skip {s['processed']['skip']} retry {s['processed']['retry']}"
            for name, s in body["stages"].items()]
    head = f"orders {body['orders']}  in flight {body['in_flight']}  timers {body['timers_pending']}"
    return emit(body, args.json, "\n".join([head, *rows]))


def cmd_routes(args: argparse.Namespace) -> int:
    from . import app, config
    try:
        table = app.check(config.load(args.config))
    except config.ConfigError as exc:
        print(f"oms: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(table.describe(args.kind))
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    from . import app, config
    try:
        settings = config.load(args.file)
        app.check(settings)
    except config.ConfigError as exc:
        print(f"oms: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.file}: ok ({len(settings.stages)} stage sections, store {settings.store.url})")
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    """Schema changes are an operator's step: the daemon never migrates a shared database itself."""
    settings = _config(args.config)
    if settings is None:
        return EXIT_USAGE
    url = settings.store.url
    if url.startswith("memory://"):
        print("nothing to migrate")
        return EXIT_OK
    if not url.startswith(("postgresql://", "postgres://", "sqlite:///")):
        print(f"oms: {settings.source}: key store.url: {url!r} is not a store this build has", file=sys.stderr)
        return EXIT_USAGE
    try:
        applied = _migrate(url, settings.store.synchronous)
    except _database_errors() as exc:  # the URL may hold a password: name the error, not the URL
        print(f"oms: migrate failed: {type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_FAIL
    print("\n".join(f"applied {name}" for name in applied) or "up to date")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from .benchmark.command import run
    return run(args)


def _migrate(url: str, synchronous: str) -> list[str]:
    if url.startswith("sqlite:///"):
        from pathlib import Path

        from .adapters import sqlite_store
        path = url.removeprefix("sqlite:///")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite_store.connect(path, synchronous)
        try:
            return sqlite_store.migrate(conn)
        finally:
            conn.close()
    import asyncio

    from .adapters import postgres_store
    return asyncio.run(postgres_store.migrate(url))


def _database_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    import asyncpg
    return OSError, sqlite3.Error, asyncpg.PostgresError, asyncpg.InterfaceError


if __name__ == "__main__":
    sys.exit(main())
