"""Run the daemon as an operator does: `python run_pipeline.py --config FILE` in a subprocess."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, extra: str = "", *, metrics: bool = False, store_url: str = "") -> tuple[Path, int]:
    """A config file in `tmp` using the shipped routing table; returns (path, http port).
    The store is a SQLite file in `tmp` unless `store_url` says otherwise."""
    port = free_port()
    store_url = store_url or f"sqlite:///{tmp / 'oms.sqlite3'}"
    text = f"""
[daemon]
shutdown_grace = 5.0
log_level = "info"
[store]
url = "{store_url}"
[http]
port = {port}
[metrics]
port = {free_port() if metrics else 0}
[routing]
file = "{ROOT / 'config' / 'routes.toml'}"
{extra}
"""
    path = tmp / "oms.toml"
    path.write_text(text)
    return path, port


class Daemon:
    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None) -> None:
        self.config, self.port = config, port
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None
        self.log_path = config.parent / "daemon.log"

    def start(self, timeout: float = 30) -> "Daemon":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "run_pipeline.py"), "--config", str(self.config)],
                                     cwd=self.config.parent, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def call(self, method: str, path: str, body: Any = None, headers: dict | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode()

    def get(self, path: str) -> tuple[int, Any]:
        return self.call("GET", path)

    def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        return self.call("POST", path, body)


# Every stage `checkpoint = false`: only rests, ends, pauses and status changes are written, so a
# kill (or a take-over) replays every stage since the order's last rest, each effect keyed. It is
# what the production throughput benchmark runs (bench/scenarios/production_2x_no_checkpoints.toml).
NO_CHECKPOINTS = """
[stage_defaults.io]
pool = 32
checkpoint = false
[stage_defaults.cpu]
pool = 2
checkpoint = false
"""


def production_backends(prefix: str) -> str:
    """Config text putting the broker on RabbitMQ and the counters on Redis, under the test's own
    prefix (queues, exchanges and keys of one test never meet another's); store.url is
    write_config's `store_url`."""
    return f"""
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/"
prefix = "{prefix}"
delay_tiers = [0.5, 1.0]
[coordination]
url = "redis://127.0.0.1:6379/0"
prefix = "{prefix}:"
"""
