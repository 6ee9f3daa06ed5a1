"""The benchmark harness's smoke mode, run as CI runs it: its output parses and has every field.

No figure is checked against a number (the machine is shared and noisy); only
that the runs ended and the reports hold what the README says they hold.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib

import anyio
import asyncpg
import pytest
import redis

from oms_pipeline.benchmark import advisor, harness, report, scenario
from oms_pipeline.benchmark.command import add_arguments, overrides
from oms_pipeline.benchmark.daemon import POSTGRES_SETTINGS
from tests.conftest import require_service
from tests.support.daemon import ROOT

pytestmark = pytest.mark.slow

RUN_FIELDS = {"orders", "finished", "throughput", "latency_ms", "service_ms", "rss_peak_mb", "cpu_seconds",
              "cpu_cores", "cpu_ms_per_order", "stages", "series", "system"}


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oms_pipeline.cli", "bench", *args, "--no-progress"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)


def test_smoke_writes_json_markdown_plots_and_an_advised_config(tmp_path):
    done = bench("smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["incomplete"] == [] and results["machine"]["cores"] >= 1
    gauge = results["machine"]["gauge"]  # the speed gauge, taken before the runs
    assert gauge["raw_chain_items_per_s"] > 0 and gauge["us_per_hop"] > 0
    runs = results["runs"]
    assert {"per_stage", "shared_pool", "per_order", "noop_pipeline", "advised"} <= set(runs)
    for name in ("per_stage", "shared_pool", "per_order"):
        assert RUN_FIELDS <= set(runs[name]), name
        assert runs[name]["finished"] == runs[name]["orders"] == 300
        assert set(runs[name]["latency_ms"]) == {"p50", "p95", "p99", "mean", "max"}
    series = runs["per_stage"]["series"]
    assert len(series["t"]) == len(series["finished"]) == len(series["rss_mb"]) > 1
    assert set(series["stages"]) == {f"{'io' if i % 2 == 0 else 'cpu'}{i + 1:02d}" for i in range(16)}
    assert {"depth", "util", "busy_s", "slots"} == set(series["stages"]["io01"])

    c = results["comparisons"]
    assert {"per_stage_over_shared_pool", "per_stage_over_per_order"} <= set(c["pool_strategies"])
    assert {"orders_per_s", "tightest", "measured", "ratio", "bounds"} <= set(c["capacity"])
    assert {"pipeline_orders_per_s", "raw_items_per_s", "ratio", "extra_us_per_hop"} <= set(c["overhead"])
    assert {"pools", "grid", "best_hand_tuned_throughput", "advised_throughput", "ratio"} <= set(c["advisor"])

    advised = tomllib.loads((tmp_path / "advised_pools.toml").read_text())
    assert set(advised["stages"]) == set(c["advisor"]["pools"]) and all(
        t["pool"] >= 1 for t in advised["stages"].values())
    summary = (tmp_path / "summary.md").read_text()
    for heading in ("## Runs", "## Pool strategies", "## Capacity", "## Runtime overhead", "## Pool-size advisor"):
        assert heading in summary
    assert "speed gauge at start" in summary
    for plot in results["plots"]:
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(results["plots"]) == {"throughput.png", "latency.png", "queue_depth.png", "utilisation.png"}


def test_the_embedded_daemon_scenario_in_smoke_mode(tmp_path):
    done = bench("embedded", "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    run = results["runs"]["embedded"]
    assert RUN_FIELDS <= set(run)
    assert run["finished"] == run["orders"] == 200
    assert run["ends"] == {"@done": 200}  # the load's orders all go the whole way: a full run's work
    assert run["system"]["store"].startswith("sqlite:///")
    # the relay published every event and command before the run ended: a rate with them out
    assert run["outbox_left_at_end"] >= 0 and run["outbox_drained_s"] >= 0
    assert 0 < run["throughput_drained"] <= run["throughput"]
    assert set(run["service_ms"]) >= {"risk_check", "allocate", "dispatch_wms"}
    assert "[stages." in results["comparisons"]["advisor"]["snippet"]
    assert "## Stages of run `embedded`" in (tmp_path / "summary.md").read_text()


def test_orders_that_ended_other_than_done_are_named_in_the_runs_table():
    from oms_pipeline.benchmark import report
    run = {"orders": 10, "finished": 10, "throughput": 5.0, "ends": {"@done": 7, "@manual": 2, "@cancelled": 1}}
    row = report._runs_table({"r": run})[-2]
    assert "| 10 (cancelled 1, manual 2) |" in row
    assert "(" not in report._runs_table({"r": {**run, "ends": {"@done": 10}}})[-2].split("|")[3]


def test_the_in_memory_daemon_scenario_in_smoke_mode(tmp_path):
    done = bench("memory", "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    run = json.loads((tmp_path / "results.json").read_text())["runs"]["memory"]
    assert run["finished"] == run["orders"] == 200
    assert run["ends"] == {"@done": 200}
    assert run["system"]["store"] == "memory://"
    assert 0 < run["throughput_drained"] <= run["throughput"]
    assert "## Stages of run `memory`" in (tmp_path / "summary.md").read_text()


def test_the_plain_entry_runs_the_same_code(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "harness.py"), "--list"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert {"smoke", "seed_mix", "embedded", "production", "burst_50k"} <= {
        line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def test_every_shipped_scenario_loads_and_smoke_shrinks_it():
    for path in sorted(scenario.SCENARIO_DIR.glob("*.toml")):
        full = scenario.load(str(path))
        small = scenario.load(path.stem, smoke=True)
        assert small.load.count() <= min(full.load.count(), 300), path.stem
        assert small.compare.peers == []


def test_a_bad_scenario_key_is_refused_naming_it(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[load]\norderz = 5\n")
    with pytest.raises(scenario.ScenarioError, match="orderz"):
        scenario.load(str(bad))
    done = bench(str(bad))
    assert done.returncode == 2 and "orderz" in done.stderr


def test_set_overrides_reach_nested_keys():
    args = add_arguments(__import__("argparse").ArgumentParser()).parse_args(
        ["x", "--orders", "10", "--set", "config.stage_defaults.io.pool=64", "--set", "compare.peers=[]"])
    assert overrides(args) == {"load": {"orders": 10, "duration": 0.0}, "compare": {"peers": []},
                               "config": {"stage_defaults": {"io": {"pool": 64}}}}


def test_the_advisor_sizes_pools_by_littles_law():
    stages = {"a": {"kind": "io", "mode": "async", "slots": 4}, "b": {"kind": "cpu", "mode": "inline", "slots": 1},
              "c": {"kind": "io", "mode": "async", "slots": 32}}
    service = {"a": 0.020, "b": 0.0005, "c": 0.080}
    # a = 200 x 0.020 = 4 busy: max(4 / 0.8, 4 + 2 x 2) = 8; a = 16: max(20, 16 + 2 x 4) = 24
    assert advisor.propose(stages, service, rate=200, utilisation=0.8) == {"a": 8, "c": 24}
    assert advisor.propose(stages, service, rate=200, utilisation=0.8, headroom=0) == {"a": 5, "c": 20}
    cap = advisor.capacity(stages, service)
    assert cap["tightest"] == "stage a" and cap["orders_per_s"] == 200.0
    assert cap["bounds"]["event loop (inline cpu stages)"] == 2000.0


def test_two_production_instances_in_smoke_mode_share_one_backend_and_remove_it(tmp_path):
    for name, port in (("PostgreSQL", 5432), ("RabbitMQ", 5672), ("Redis", 6379)):
        require_service(name, "127.0.0.1", port)
    done = bench("production_2x", "--smoke", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["incomplete"] == [] and results["notes"] == []
    run = results["runs"]["production"]
    assert RUN_FIELDS <= set(run)
    assert run["finished"] == run["orders"] == 200 and sum(run["ends"].values()) == 200
    assert run["instances"] == 2 and len(run["instance_throughput"]) == 2
    assert run["outbox_left_at_end"] >= 0 and 0 < run["throughput_drained"] <= run["throughput"]
    assert all(t > 0 for t in run["instance_throughput"]) and run["instance_finished"] == [100, 100]
    series = run["series"]
    assert len(series["t"]) == len(series["finished"]) == len(series["cpu_s"]) > 1
    assert series["finished"][-1] == 200
    assert all(len(row["depth"]) == len(row["util"]) == len(series["t"]) for row in series["stages"].values())
    summary = (tmp_path / "summary.md").read_text()
    assert "production (2 instances:" in summary
    server = run["system"]["postgresql"]  # the settings the figures were measured under
    assert set(server) == set(POSTGRES_SETTINGS) and server["fsync"] in ("on", "off")
    assert f"- PostgreSQL server: fsync {server['fsync']}, synchronous_commit " in summary

    tag = run["system"]["store"].rsplit("/", 1)[1]
    assert tag.startswith("oms_bench_")
    assert not anyio.run(_databases, tag)
    assert not list(redis.Redis.from_url("redis://127.0.0.1:6379/0").scan_iter(f"{tag}:*"))
    if shutil.which("rabbitmqctl"):
        queues = subprocess.run(["rabbitmqctl", "list_queues", "-q", "name"], capture_output=True, text=True,
                                timeout=60).stdout.split()
        assert not [q for q in queues if q.startswith(tag)]


async def _databases(name: str) -> list:
    conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        return await conn.fetch("SELECT datname FROM pg_database WHERE datname = $1", name)
    finally:
        await conn.close()


def test_several_instances_are_refused_for_any_kind_but_production(tmp_path):
    for kind in ("embedded", "synthetic"):
        bad = tmp_path / f"{kind}.toml"
        bad.write_text(f'[workload]\nkind = "{kind}"\ninstances = 2\n')
        with pytest.raises(scenario.ScenarioError, match=r"workload\.instances = 2 needs kind = \"production\""):
            scenario.load(str(bad))
    done = bench(str(tmp_path / "embedded.toml"))
    assert done.returncode == 2 and "workload.instances" in done.stderr
    assert scenario.load("production_2x").workload.instances == 2
    assert scenario.load("embedded").workload.instances == 1


def test_a_run_is_reported_by_fifth_of_its_time_so_a_falling_rate_shows():
    # 10 s sampled every 0.5 s: 300 orders/s for 6 s at 1 ms of CPU each, then 150/s at 2 ms.
    t = [i / 2 for i in range(21)]
    done = [round(300 * x) if x <= 6 else 1800 + round(150 * (x - 6)) for x in t]
    cpu = [d / 1000 if x <= 6 else 1.8 + (d - 1800) * 2 / 1000 for x, d in zip(t, done)]
    fifths = harness.by_fifth({"t": t, "finished": done, "cpu_s": cpu})
    assert [f["orders_per_s"] for f in fifths] == [300.0, 300.0, 300.0, 150.0, 150.0]
    assert [f["cpu_ms_per_order"] for f in fifths] == [1.0, 1.0, 1.0, 2.0, 2.0]
    assert harness.by_fifth({"t": t[:5], "finished": done[:5], "cpu_s": cpu[:5]}) is None  # too short
    run = {"orders": 2400, "finished": 2400, "throughput": 240.0, "by_fifth": fifths}
    assert "`run` by fifth of its time: 300.0 / 300.0 / 300.0 / 150.0 / 150.0 orders/s, " \
           "1.000 / 1.000 / 1.000 / 2.000 / 2.000 CPU ms an order" in "\n".join(report._runs_table({"run": run}))


def test_instance_runs_merge_into_one_run():
    def instance(finished: int, started: float, last_end: float, latencies: list[float], depth: list[int],
                 util: list[float]) -> dict:
        return {"label": "production #0", "orders": 4, "finished": finished, "stopped": "finished",
                "ends": {"@done": finished}, "throughput": finished / (last_end - started),
                "service_ms": {"allocate": 2.0}, "system": {"stages": {}}, "rss_peak_mb": 100.0,
                "cpu_seconds": 1.5, "cpu_cores": 0.75,
                "stages": {"allocate": {"depth_mean": 1.0, "depth_max": max(depth), "util_mean": util[0]}},
                "series": {"t": [0.0, 0.1, 0.2][:len(depth)], "finished": [0, finished, finished][:len(depth)],
                           "rss_mb": [90.0, 100.0, 100.0][:len(depth)], "cpu_s": [0.0, 1.0, 1.5][:len(depth)],
                           "stages": {"allocate": {"depth": depth, "util": util, "busy_s": 0.1, "slots": 4}}},
                "outbox_left_at_end": 10, "raw": {"latencies_s": latencies, "started": started,
                                                  "last_end": last_end, "drained": last_end + 1.0}}

    a = instance(4, 10.0, 12.0, [0.1, 0.2, 0.3, 0.4], [3, 1, 0], [0.5, 0.25, 0.0])
    b = instance(4, 10.5, 14.0, [0.5, 0.6, 0.7, 0.8], [2, 0], [0.75, 0.25])
    b["service_ms"]["allocate"] = 4.0
    run = harness.merge_instances([a, b], [0.0] * 8, "production", 2)
    assert (run["orders"], run["finished"], run["ends"], run["instances"]) == (8, 8, {"@done": 8}, 2)
    assert run["elapsed_s"] == 4.0 and run["throughput"] == 2.0  # first start to last end
    assert run["outbox_drained_s"] == 1.0 and run["throughput_drained"] == 1.6  # ... to the outbox empty
    assert run["instance_throughput"] == [2.0, 8 / 7] and run["instance_finished"] == [4, 4]
    assert run["latency_ms"]["p50"] == 400.0 and run["latency_ms"]["max"] == 800.0
    assert (run["rss_peak_mb"], run["cpu_seconds"], run["cpu_cores"]) == (200.0, 3.0, 1.5)
    assert run["service_ms"] == {"allocate": 3.0}
    assert run["stages"]["allocate"] == {"depth_mean": 2.0, "depth_max": 5, "util_mean": 0.625}
    series = run["series"]
    # b stopped sampling after two: it counts with its last totals (cpu 1.0) and an empty queue
    assert series["t"] == [0.0, 0.1, 0.2] and series["finished"] == [0, 8, 8] and series["cpu_s"] == [0.0, 2.0, 2.5]
    assert series["stages"]["allocate"]["depth"] == [5, 1, 0]
    assert series["stages"]["allocate"]["util"] == [0.625, 0.25, 0.0]
    assert "raw" not in run and "label" in run
