"""The README's "Try it" block, run as printed against a daemon started the way `make run` starts it.

`make run` runs `run_pipeline.py` on config/oms.toml from the repository. Here
the daemon runs on a copy of that file (and its routing table) in a temporary
directory with only the two default ports replaced by free ones, so its store
(`var/oms.sqlite3`) lands in that directory. The commands run through the
shell from the repository root as printed; the only substitutions are the
daemon's address (OMS_URL for `oms`, the port in the curl URL) and
<ORDER_NO>, which becomes an order the previous commands listed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.daemon import ROOT, Daemon, free_port

pytestmark = pytest.mark.slow

README = ROOT / "README.md"
OMS = ".venv/bin/oms"


def try_it_block() -> list[str]:
    """The commands of the "Try it" block: one per line, the curl command with its continuation lines."""
    text = README.read_text()
    match = re.search(r"^Try it\b.*?\n```sh\n(.*?)\n```", text, re.DOTALL | re.MULTILINE)
    assert match, "README.md has no 'Try it' sh block"
    commands: list[str] = []
    for line in match.group(1).splitlines():
        if line.startswith((OMS, "curl ")):
            commands.append(line)
        elif commands and commands[-1].startswith("curl "):
            commands[-1] += "\n" + line  # inside the curl command's quoted body
        else:
            assert not line.strip(), f"unexpected line in the Try it block: {line!r}"
    return commands


def test_the_try_it_block_has_the_commands_this_test_knows():
    words = [" ".join(c.split("#")[0].split()[:3]) for c in try_it_block()]
    assert words == [f"{OMS} submit --generate", f"{OMS} stats", f"{OMS} orders list", f"{OMS} pay <ORDER_NO>",
                     f"{OMS} order show", f"{OMS} order-no <ORDER_NO>", f"{OMS} exceptions list",
                     f"{OMS} routes --kind",
                     "curl -s localhost:8480/orders"], words


@pytest.fixture(scope="module")
def like_make_run(tmp_path_factory):
    """The daemon on the embedded default, as `make run` starts it, on free ports."""
    tmp = tmp_path_factory.mktemp("make-run")
    shipped = (ROOT / "config" / "oms.toml").read_text()
    # The README promises these defaults; they are the only lines changed.
    assert "port = 8480" in shipped and "port = 9480" in shipped
    port, metrics = free_port(), free_port()
    (tmp / "oms.toml").write_text(shipped.replace("port = 8480", f"port = {port}")
                                         .replace("port = 9480", f"port = {metrics}"))
    shutil.copy(ROOT / "config" / "routes.toml", tmp / "routes.toml")
    d = Daemon(tmp / "oms.toml", port).start()
    yield d
    d.stop()
    assert (tmp / "var" / "oms.sqlite3").exists()  # the store where the README says it is


def run(command: str, port: int) -> subprocess.CompletedProcess:
    if not (ROOT / OMS).exists():  # a virtual environment elsewhere: its own `oms`
        command = command.replace(OMS, str(Path(sys.executable).parent / "oms"), 1)
    env = {**os.environ, "OMS_URL": f"http://127.0.0.1:{port}"}
    env.pop("OMS_TOKEN", None)
    return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                          check=False)


def test_the_try_it_commands_work_as_printed(like_make_run):
    port = like_make_run.port
    outputs: dict[str, str] = {}
    order_no = ""
    for command in try_it_block():
        words = command.split("#")[0].split()
        name = " ".join(words[1:3] if words[0] == OMS else words[:2])
        if "<ORDER_NO>" in command:
            assert order_no, "no order listed before a command that needs one"
            command = command.replace("<ORDER_NO>", order_no)
        if command.startswith("curl "):
            assert "localhost:8480" in command
            command = command.replace("localhost:8480", f"localhost:{port}")
        done = run(command, port)
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        outputs[name] = done.stdout
        if name == "orders list":
            first = done.stdout.split("\n", 1)[0].split()
            assert first and re.fullmatch(r"[0-9]{30}", first[0]) and first[1] == "WAIT_PAY", done.stdout
            order_no = first[0]

    assert outputs["submit --generate"].startswith("submitted 200: 200 created, 0 already known, 0 rejected")
    assert outputs["stats"].startswith("orders {") and "notify_paid" in outputs["stats"]
    listed = outputs["orders list"].strip().splitlines()
    assert listed and all(re.match(r"[0-9]{30}  WAIT_PAY ", line) for line in listed)
    assert re.fullmatch(rf"{order_no}: paid \([0-9]+ cents\)\n", outputs["pay <ORDER_NO>"])
    shown = outputs["order show"]
    assert shown.startswith(f"order {order_no}  ") and "release  paid" in shown
    assert re.fullmatch(rf"{order_no}: issued 20[0-9-]{{8}} [0-9:]{{8}} UTC, instance 0, sequence [0-9]+ \(.*\)\n",
                        outputs["order-no <ORDER_NO>"]), outputs["order-no <ORDER_NO>"]
    assert outputs["exceptions list"].strip()  # "(none)" or one line per order
    assert outputs["routes --kind"].startswith("tob (") and "dispatch_wms -> @done" in outputs["routes --kind"]
    created = json.loads(outputs["curl -s"])
    assert created["created"] is True and created["status"] == "WAIT_PAY" and created["payable"] == 2 * 1990 + 600
    assert re.fullmatch(r"[0-9]{30}", created["order_no"]) and created["pay_deadline"]
    # The paragraph after the block: the same request again is 200 with the same order.
    again = run(next(c for c in try_it_block() if c.startswith("curl ")).replace("localhost:8480",
                                                                               f"localhost:{port}"), port)
    assert json.loads(again.stdout)["order_no"] == created["order_no"]
