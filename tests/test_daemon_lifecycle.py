"""The daemon as an operator runs it: SIGTERM drain, a second SIGTERM, SIGHUP reload, sd_notify."""
from __future__ import annotations

import signal
import socket
import time

import pytest

from oms_pipeline.generator import generate
from tests.support.daemon import Daemon, write_config

pytestmark = pytest.mark.slow

# Orders that need no payment and pass audit: they run the whole path by themselves.
PLAIN = {"kind": "tob", "source": "sales_plan", "payment_method": "none", "remark": "",
         "delivery_promise": "standard", "presale": False}


def plain_orders(n: int, seed: int = 7) -> list[dict]:
    return [{**r, **PLAIN} for r in generate(n, seed)]


def terminal_count(d: Daemon) -> int:
    orders = d.get("/stats")[1]["orders"]
    return sum(orders.get(s, 0) for s in ("done", "cancelled", "split"))


def wait_all_terminal(d: Daemon, n: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        orders = d.get("/stats")[1]["orders"]
        if not any(orders.get(s) for s in ("queued", "parked", "wait_pay")) and sum(orders.values()) >= n:
            return orders
        time.sleep(0.2)
    raise AssertionError(f"not all terminal: {d.get('/stats')[1]['orders']}")


SLOW_WMS = '[downstream.latency.wms]\ndist = "fixed"\nmean_ms = {ms}\n'


def test_sigterm_lets_in_flight_work_finish_then_exits_0(tmp_path):
    config, port = write_config(tmp_path, "[downstream]\nseed = 1\n" + SLOW_WMS.format(ms=300))
    d = Daemon(config, port).start()
    for order in plain_orders(20):
        assert d.post("/orders", order)[0] == 201
    time.sleep(0.5)  # some orders are now waiting on the slow WMS
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(20) == 0
    assert time.monotonic() - started < 5 + 2  # within the grace period
    log = d.log()
    assert '"event":"drain"' in log and '"event":"stopped"' in log
    # Whatever did not finish resumes after a restart; nothing is lost.
    d = Daemon(config, port).start()
    try:
        orders = wait_all_terminal(d, 20)
        assert orders.get("manual", 0) == 0
    finally:
        d.stop()


def test_second_sigterm_aborts_at_once_and_work_resumes_after_restart(tmp_path):
    config, port = write_config(tmp_path, "[downstream]\nseed = 1\n" + SLOW_WMS.format(ms=4000))
    config.write_text(config.read_text().replace("shutdown_grace = 5.0", "shutdown_grace = 60.0"))
    d = Daemon(config, port).start()
    for order in plain_orders(5):
        assert d.post("/orders", order)[0] == 201
    time.sleep(1.0)
    d.signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    d.signal(signal.SIGTERM)
    assert d.wait(10) == 1
    assert time.monotonic() - started < 3
    assert '"event":"abort"' in d.log()
    config.write_text(config.read_text().replace("mean_ms = 4000", "mean_ms = 1"))
    d = Daemon(config, port).start()
    try:
        wait_all_terminal(d, 5)
    finally:
        d.stop()


def test_sighup_applies_new_pool_sizes_and_refuses_a_bad_file(tmp_path):
    config, port = write_config(tmp_path)
    d = Daemon(config, port).start()
    try:
        original = config.read_text()
        config.write_text(original + "\n[stages.audit]\npool = 7\nqueue = 50\n")
        d.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while d.get("/stats")[1]["stages"]["audit"]["pool"] != 7 and time.monotonic() < deadline:
            time.sleep(0.1)
        audit = d.get("/stats")[1]["stages"]["audit"]
        assert (audit["pool"], audit["bound"]) == (7, 50)
        config.write_text(original + "\n[stages.audit]\npool = 0\n")
        d.signal(signal.SIGHUP)
        time.sleep(1.0)
        assert d.get("/stats")[1]["stages"]["audit"]["pool"] == 7
        assert '"event":"reload_refused"' in d.log() and "stages.audit.pool" in d.log()
        assert d.get("/healthz")[0] == 200  # still serving
        for order in plain_orders(10):  # and still working, on the new pools
            assert d.post("/orders", order)[0] == 201
        wait_all_terminal(d, 10)
    finally:
        d.stop()


def test_systemd_notify_ready_watchdog_status_and_stopping(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    config, port = write_config(tmp_path)
    d = Daemon(config, port, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"}).start()
    messages: list[str] = []

    def until(field: str) -> None:
        while not any(field in m for m in messages):
            messages.append(sock.recv(4096).decode())

    try:
        until("READY=1")
        until("WATCHDOG=1")
        until("STATUS=")
        d.signal(signal.SIGTERM)
        until("STOPPING=1")
        assert d.wait(20) == 0
    finally:
        d.stop()
        sock.close()
    ready = next(m for m in messages if "READY=1" in m)
    assert f"MAINPID={d.proc.pid}" in ready


def test_a_bad_config_exits_2_naming_the_key(tmp_path):
    config, port = write_config(tmp_path, "[stages.fill]\npool = -3\n")
    import subprocess
    import sys
    from tests.support.daemon import ROOT
    done = subprocess.run([sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(config)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "key stages.fill.pool" in done.stderr
