"""The durable effect log: group commit, restart, and exactly-once after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from oms_pipeline.adapters.simulated import (
    EffectLog, SimSettings, build_simulated_ports, read_duplicates, read_effects,
)
from oms_pipeline.clock import VirtualClock
from oms_pipeline.ports.downstream import Occupation

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_concurrent_calls_share_few_commits(tmp_path: Path) -> None:
    path = str(tmp_path / "effects.db")
    async with EffectLog(path) as log:
        ports = build_simulated_ports(SimSettings(), VirtualClock(), log)
        waybills = {}

        async def call(i: int) -> None:
            waybills[i] = await ports.tms.request_waybill(f"O{i}:waybill", f"O{i}", "WH1", "ambient")

        async with anyio.create_task_group() as tg:
            for i in range(1000):
                tg.start_soon(call, i)
        assert log.commits <= 50, f"{log.commits} commits for 1000 calls: not grouped"
        rows = read_effects(path)  # before close: each call returned only after its commit
    assert len(rows) == 1000
    assert {(key, result) for key, _, _, result, _ in rows} == {(f"O{i}:waybill", w) for i, w in waybills.items()}


@pytest.mark.anyio
async def test_duplicates_are_counted_in_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "effects.db")
    async with EffectLog(path) as log:
        ports = build_simulated_ports(SimSettings(), VirtualClock(), log)
        first = await ports.finance.push_voucher("O1:voucher", "O1", 1999, "online")
        assert await ports.finance.push_voucher("O1:voucher", "O1", 1999, "online") == first
    assert read_duplicates(path) == {"finance": 1}
    assert [row[:4] for row in read_effects(path)] == [("O1:voucher", "finance", "push_voucher", first)]


@pytest.mark.anyio
async def test_a_reopened_log_remembers_results_and_state(tmp_path: Path) -> None:
    path = str(tmp_path / "effects.db")
    table = {"erp": {"stock": {"WH1": {"A": 5}}}}
    async with EffectLog(path) as log:
        ports = build_simulated_ports(SimSettings.from_mapping(table), VirtualClock(), log)
        occupation = await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 4), ("B", "WH9", 2)])
        await ports.wms.dispatch("O1:dispatch_wms", "O1", {"lines": 2})

    async with EffectLog(path) as log:
        ports = build_simulated_ports(SimSettings.from_mapping(table), VirtualClock(), log)
        again = await ports.erp.occupy("O1:erp_stock", "O1", [("A", "WH1", 4)])
        assert isinstance(again, Occupation) and again == occupation
        assert ports.erp.available("A", "WH1") == 1
        assert (await ports.erp.occupy("O2:erp_stock", "O2", [("A", "WH1", 1)])).occupation_id != \
            occupation.occupation_id
        assert await ports.wms.intercept("O1:cancel", "O1") is True
        assert log.duplicates == {"erp": 1}


def test_the_log_requires_open(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        build_simulated_ports(SimSettings(), VirtualClock(), EffectLog(str(tmp_path / "e.db")))


WRITER = textwrap.dedent("""
    import sys, anyio
    from oms_pipeline.adapters.simulated import EffectLog, SimSettings, build_simulated_ports
    from oms_pipeline.clock import SystemClock

    async def worker(ports, start):
        i = start
        while True:
            key = f"O{i}:waybill"
            # Every 7th key is asked twice: a replayed stage.
            for _ in range(2 if i % 7 == 0 else 1):
                await ports.tms.request_waybill(key, f"O{i}", "WH1", "ambient")
            sys.stdout.write(key + "\\n")
            sys.stdout.flush()
            i += 64

    async def main():
        log = EffectLog(sys.argv[1], retain=sys.argv[2] == "retain")
        await log.open()
        ports = build_simulated_ports(SimSettings(), SystemClock(), log)
        async with anyio.create_task_group() as tg:
            for start in range(64):
                tg.start_soon(worker, ports, start)

    anyio.run(main)
""")

READER = textwrap.dedent("""
    import json, sys
    from oms_pipeline.adapters.simulated import read_duplicates, read_effects
    rows = read_effects(sys.argv[1])
    print(json.dumps({"keys": [r[0] for r in rows], "duplicates": read_duplicates(sys.argv[1])}))
""")


@pytest.mark.parametrize("mode", ["retain", "in_file"])  # in_file: retain_effects = false, keys in the file only
def test_every_returned_call_survives_sigkill(tmp_path: Path, mode: str) -> None:
    path = str(tmp_path / "effects.db")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, path, mode], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    returned = []
    deadline = time.monotonic() + 60
    try:
        while len(returned) < 2000 and time.monotonic() < deadline:
            line = writer.stdout.readline()
            if not line:
                break
            returned.append(line.strip())
    finally:
        writer.send_signal(signal.SIGKILL)
        out, err = writer.communicate(timeout=30)
    returned += out.split()  # printed before the kill, still in the pipe
    assert writer.returncode == -signal.SIGKILL, err
    assert len(returned) >= 2000, f"the writer stalled: {err}"

    reader = subprocess.run([sys.executable, "-c", READER, path], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=60, check=True)
    stored = json.loads(reader.stdout)
    keys = stored["keys"]
    assert len(keys) == len(set(keys)), "an effect was stored twice"
    missing = set(returned) - set(keys)
    assert not missing, f"{len(missing)} calls returned but are not in the file, e.g. {sorted(missing)[:3]}"
    assert stored["duplicates"].get("tms", 0) >= 1
