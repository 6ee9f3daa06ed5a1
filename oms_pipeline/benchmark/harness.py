"""Runs a scenario end to end: every run it asks for, the comparisons as ratios, the report.

Each run gets a fresh event loop (uvloop, as the daemon runs) and the same
seeded arrivals, one after another, so runs compare within one invocation on
the same machine at the same time. A production workload with `instances` > 1
runs that many daemon processes on one backend, each with its share of the
orders, and merges their figures into one run.
"""
from __future__ import annotations

import bisect
import datetime as dt
import gc
import math
import multiprocessing
import os
import platform
import queue
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import anyio

from .. import compiled, config
from ..daemon import tune_gc
from . import advisor, peers, report, strategies, synthetic
from .daemon import Backend, Daemon, run_settings
from .load import arrivals
from .probe import mean, percentiles
from .scenario import ROOT, Scenario, merge, to_dict

DEFAULT_OUT = ROOT / "bench" / "out"
# The bare-runtime settings of bench/runtime_noop.py, for the overhead comparison.
NOOP_CONFIG = {"stage_defaults": {"io": {"pool": 32, "batch": 512, "queue": 2000},
                                  "cpu": {"pool": 1, "batch": 512, "queue": 2000}}}
# Seconds an instance process may take to start and build its app (all wait for the slowest),
# and to close it after its run, beyond the scenario's load.timeout; then to exit once it sent
# its run (or the parent gave up on it) before it is terminated.
INSTANCE_SETUP, INSTANCE_CLOSE, INSTANCE_EXIT = 120.0, 120.0, 30.0


class Harness:
    def __init__(self, scenario: Scenario, out: Path, *, progress: bool = False,
                 say: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> None:
        self.s = scenario
        self.out = out
        self.progress = progress
        self.say = say
        self.offsets = arrivals(scenario.load.count(), scenario.load.rate, scenario.seed)
        self.results: dict[str, Any] = {
            "scenario": to_dict(scenario), "machine": machine(),
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["oms bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else " ".join(sys.argv),
            "runs": {}, "comparisons": {}, "notes": [], "incomplete": []}

    # -- the whole scenario ----------------------------------------------------

    def run(self) -> dict[str, Any]:
        tune_gc()  # as the daemon does
        if self.s.workload.kind == "synthetic":
            self._synthetic()
        else:
            self._daemon()
        self.results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        report.write(self.results, self.out)
        return self.results

    def _synthetic(self) -> None:
        profiles = synthetic.profiles(self.s.workload)
        c = self.s.compare
        rounds = self._rounds({name: (lambda name=name: self._strategy_run(name, profiles, self.s.config, name))
                               for name in c.strategies})
        for name, run in rounds.items():
            self._record(name, run)
        per_stage = self.results["runs"].get("per_stage")
        if per_stage and len(c.strategies) > 1:
            self.results["comparisons"]["pool_strategies"] = pool_strategy_ratios(self.results["runs"])
        if per_stage and c.capacity:
            self.results["comparisons"]["capacity"] = capacity_ratio(per_stage)
        if per_stage and c.advisor:
            self.results["comparisons"]["advisor"] = self._advisor(profiles, per_stage)
        if c.noop_orders or c.raw_chain:  # last: the no-op burst's memory would stay in later runs' RSS
            self.results["comparisons"]["overhead"] = self._overhead()
        if c.peers:
            self._peers(profiles, per_stage)

    def _rounds(self, runs: dict[str, Callable[[], dict[str, Any]]]) -> dict[str, dict[str, Any]]:
        """Every run `compare.repeat` times, interleaved (a, b, a, b: the machine's drift hits all
        alike); each name's median run (by throughput), with every round's figure."""
        done: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
        for _ in range(self.s.compare.repeat):
            for name, run in runs.items():
                done[name].append(run())
                gc.collect()
        out = {}
        for name, results in done.items():
            ordered = sorted(results, key=lambda r: r["throughput"])
            out[name] = {**ordered[(len(ordered) - 1) // 2], "throughput_rounds": [r["throughput"] for r in results]}
        return out

    def _daemon(self) -> None:
        kind, n = self.s.workload.kind, self.s.workload.instances
        self.say(f"{kind}: the daemon's 16 stages, {len(self.offsets):,} orders"
                 + (f", {n} instances" if n > 1 else ""))
        result = strategies.run(self._daemon_run) if n == 1 else self._instances(n)
        if result is None:
            return
        self._record(kind, result)
        if self.s.compare.advisor:
            self.results["comparisons"]["advisor"] = self._proposal(result, kind)

    async def _daemon_run(self) -> dict[str, Any]:
        system = Daemon(self.s)
        await system.open()
        return await self._measure(system)

    def _instances(self, n: int) -> dict[str, Any] | None:
        """N daemon processes on one backend, opened and removed here; their merged run, or
        None when no instance sent one (the run is then incomplete, with a note why)."""
        run_settings(self.s, {})  # a bad config key stops here, before there is a backend to remove
        backend = Backend(self.s)
        services = strategies.run(backend.open)
        try:
            runs, failed = self._spawn(services, n)
        finally:
            strategies.run(backend.close, run_settings(self.s, services))
        kind = self.s.workload.kind
        for i, why in sorted(failed.items()):
            self.results["notes"].append(f"run {kind}: instance {i} of {n} {why}")
        done = [r for r in runs if r is not None]
        if not done:
            self.results["incomplete"].append(kind)
            return None
        merged = merge_instances(done, self.offsets, kind, n)
        if failed:
            merged["stopped"] = f"lost {len(failed)} of {n} instances"
        return merged

    def _spawn(self, services: dict[str, Any], n: int) -> tuple[list[dict[str, Any] | None], dict[int, str]]:
        """Start the instance processes (spawned: no copy of this process's loop or connections),
        collect each one's run, and make sure none outlives this call. The runs by instance (None
        for one that failed) and why each failed one did."""
        ctx = multiprocessing.get_context("spawn")
        barrier, inbox = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=run_instance, name=f"oms-bench-instance-{i}",
                             args=(self.s, services, i, n, self.offsets[i::n], barrier, inbox,
                                   self.progress and i == 0))
                 for i in range(n)]
        runs: list[dict[str, Any] | None] = [None] * n
        failed: dict[int, str] = {}
        silent: set[int] = set()  # seen dead with no run sent: failed if still nothing after one more wait
        allowed = INSTANCE_SETUP + self.s.load.timeout + INSTANCE_CLOSE
        deadline = time.monotonic() + allowed if self.s.load.timeout else math.inf
        try:
            for p in procs:
                p.start()
            while sum(r is not None for r in runs) + len(failed) < n:
                try:
                    i, outcome, payload = inbox.get(timeout=1.0)
                except queue.Empty:
                    pending = [i for i in range(n) if runs[i] is None and i not in failed]
                    for i in pending:
                        if procs[i].is_alive():
                            continue
                        if i in silent:
                            failed[i] = f"exited (code {procs[i].exitcode}) without sending its run"
                            barrier.abort()
                        silent.add(i)
                    if time.monotonic() > deadline:
                        for i in pending:
                            failed.setdefault(i, f"sent no run within {allowed:.0f} s")
                        break
                    continue
                if outcome == "ok":
                    runs[i] = payload
                else:
                    failed[i] = f"failed: {payload}"
                    barrier.abort()  # the others stop waiting for it to start
        finally:
            for p in procs:
                if p.pid is None:
                    continue
                p.join(timeout=INSTANCE_EXIT)
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=10)
                if p.is_alive():
                    p.kill()
                    p.join()
            inbox.close()
        return runs, failed

    # -- single runs ------------------------------------------------------------

    def _strategy_run(self, strategy: str, profiles: list[synthetic.Profile], overrides: dict[str, Any],
                      label: str | None = None) -> dict[str, Any]:
        settings = config.from_mapping(overrides, source=self.s.source)
        w = self.s.workload

        async def go() -> dict[str, Any]:
            per_stage = strategies.PerStage(profiles, settings, w.io_dist, self.s.seed)
            if strategy == "per_stage":
                system = per_stage
            else:
                size = sum(st["pool"] for st in per_stage.describe()["stages"].values())
                bound = sum(st["queue"] for st in per_stage.describe()["stages"].values())
                system = (strategies.SharedPool(profiles, size, bound, w.io_dist, self.s.seed)
                          if strategy == "shared_pool" else strategies.PerOrder(profiles, size, w.io_dist, self.s.seed))
            return await self._measure(system, label or strategy)

        self.say(f"{label or strategy}: {len(self.offsets):,} orders")
        return strategies.run(go)

    async def _measure(self, system: Any, label: str | None = None, offsets: list[float] | None = None) -> dict:
        return await measure(self.s, system, offsets or self.offsets, progress=self.progress, label=label)

    def _record(self, name: str, result: dict[str, Any]) -> None:
        result["cpu_ms_per_order"] = (round(result["cpu_seconds"] / result["finished"] * 1000, 3)
                                      if result.get("finished") else None)
        fifths = by_fifth(result.get("series") or {})
        if fifths:
            result["by_fifth"] = fifths
        self.results["runs"][name] = result
        if result.get("stopped") not in (None, "finished"):
            self.results["incomplete"].append(name)
            self.results["notes"].append(f"run {name} {result['stopped']}: {result['finished']} of "
                                         f"{result['orders']} orders ended")
        gc.collect()

    # -- comparisons --------------------------------------------------------------

    def _overhead(self) -> dict[str, Any]:
        c = self.s.compare
        out: dict[str, Any] = {}
        if c.noop_orders:
            self.say(f"noop pipeline: {c.noop_orders:,} orders through 16 no-op stages")
            settings = config.from_mapping(NOOP_CONFIG)
            noop = synthetic.noop_profiles(16)
            offsets = [0.0] * c.noop_orders

            async def go() -> dict[str, Any]:
                return await self._measure(strategies.PerStage(noop, settings, "fixed", self.s.seed), "noop_pipeline",
                                           offsets)

            run = strategies.run(go)
            run.pop("series", None)
            self._record("noop_pipeline", run)
            out["pipeline_orders_per_s"] = run["throughput"]
            out["pipeline_us_per_hop"] = round(1e6 / run["throughput"] / 16, 3)
        if c.raw_chain:
            self.say(f"raw asyncio.Queue chain: {c.raw_chain:,} items through 16 hops")
            raw = strategies.run(strategies.raw_chain, c.raw_chain)
            out["raw_chain"] = raw
            out["raw_items_per_s"] = raw["throughput"]
            out["raw_us_per_hop"] = raw["us_per_hop"]
        if "pipeline_orders_per_s" in out and "raw_items_per_s" in out:
            out["ratio"] = round(out["pipeline_orders_per_s"] / out["raw_items_per_s"], 3)
            out["extra_us_per_hop"] = round(out["pipeline_us_per_hop"] - out["raw_us_per_hop"], 3)
        return out

    def _advisor(self, profiles: list[synthetic.Profile], base: dict[str, Any]) -> dict[str, Any]:
        c = self.s.compare
        proposal = self._proposal(base, "per_stage")
        io = [n for n, st in base["system"]["stages"].items() if st["kind"] == "io" or st["mode"] == "process"]

        def with_pools(pools: dict[str, int], label: str) -> Callable[[], dict[str, Any]]:
            overrides = merge(self.s.config, {"stages": {n: {"pool": p} for n, p in pools.items()}})
            return lambda: _slim(self._strategy_run("per_stage", profiles, overrides, label))

        runs = {f"hand_tuned_{pool}": with_pools(dict.fromkeys(io, pool), f"hand-tuned pool {pool}")
                for pool in c.advisor_grid}
        runs["advised"] = with_pools(proposal["pools"], "advised pools")
        rounds = self._rounds(runs)
        for name, run in rounds.items():
            self._record(name, run)
        advised = rounds["advised"]
        grid = {pool: {"throughput": rounds[f"hand_tuned_{pool}"]["throughput"],
                       "latency_ms": rounds[f"hand_tuned_{pool}"]["latency_ms"]} for pool in c.advisor_grid}
        best_pool = max(grid, key=lambda p: grid[p]["throughput"])
        best = grid[best_pool]["throughput"]
        return {**proposal, "grid": {str(k): v for k, v in grid.items()},
                "best_hand_tuned_pool": best_pool, "best_hand_tuned_throughput": best,
                "advised_throughput": advised["throughput"], "advised_latency_ms": advised["latency_ms"],
                "ratio": round(advised["throughput"] / best, 3) if best else math.nan,
                "advised_slots": sum(proposal["pools"].values()), "best_slots": best_pool * len(io)}

    def _proposal(self, run: dict[str, Any], source: str) -> dict[str, Any]:
        u, beta = self.s.compare.advisor_utilisation, self.s.compare.advisor_headroom
        service = {k: v / 1000 for k, v in run["service_ms"].items()}
        rate, why = self._design_rate(run, service)
        if run.get("instances", 1) > 1:  # each instance's pools take its share
            rate, why = rate / run["instances"], f"{why}, shared by {run['instances']} instances"
        pools = advisor.propose(run["system"]["stages"], service, rate, u, beta)
        text = advisor.snippet(pools, rate, u, f"run {source} of scenario {self.s.name}", beta)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "advised_pools.toml").write_text(text)
        return {"pools": pools, "rate": rate, "rate_from": why, "utilisation": u, "headroom": beta,
                "snippet_file": "advised_pools.toml", "snippet": text}

    def _design_rate(self, run: dict[str, Any], service: dict[str, float]) -> tuple[float, str]:
        """The arrival rate the pools are sized for: the scenario's open-loop rate; for a burst,
        what the resources no pool size changes (the event loop, the process pool) can take,
        since that is the most a burst can get through; else the run's own throughput."""
        if self.s.load.rate:
            return self.s.load.rate, "the scenario's arrival rate"
        if self.s.workload.kind != "synthetic":  # real io handlers and checkpoints share the loop too
            return run["throughput"], "a burst: the run's throughput"
        bounds = advisor.capacity(run["system"]["stages"], service,
                                  run["system"].get("process_workers", 2))["bounds"]
        fixed = [v for k, v in bounds.items() if not k.startswith("stage ")]
        if fixed and min(fixed) > run["throughput"]:
            return min(fixed), "a burst: the capacity of the event loop / process pool"
        return run["throughput"], "a burst: the run's throughput"

    def _peers(self, profiles: list[synthetic.Profile], per_stage: dict[str, Any] | None) -> None:
        out = {}
        for peer in self.s.compare.peers:
            self.say(f"{peer}: {self.s.compare.peer_orders:,} orders, a chain of {len(profiles)} tasks each")
            result = peers.run(peer, self.s, profiles, self.progress)
            if "skipped" in result:
                self.results["notes"].append(f"{peer}: {result['skipped']}")
                out[peer] = {"skipped": result["skipped"]}
                continue
            self._record(peer, result)
            if per_stage:
                out[peer] = {"throughput": result["throughput"],
                             "pipeline_over_peer": round(per_stage["throughput"] / result["throughput"], 2)
                             if result["throughput"] else math.inf,
                             "cpu_ms_per_order": result["cpu_ms_per_order"]}
        self.results["comparisons"]["peers"] = out


async def measure(s: Scenario, system: Any, offsets: list[float], *, progress: bool, label: str | None = None,
                  raw: bool = False) -> dict[str, Any]:
    """`strategies.measure` with the scenario's load settings."""
    load = s.load
    return await strategies.measure(system, offsets, batch=load.batch, interval=s.sample_interval,
                                    timeout=load.timeout, stall=load.stall, progress=progress, label=label,
                                    raw=raw)


def run_instance(s: Scenario, services: dict[str, Any], i: int, n: int, offsets: list[float],
                 barrier: Any, outbox: Any, progress: bool) -> None:
    """Daemon instance i of n, in a spawned process: its run (with the raw figures the merge
    needs) or why it failed, on `outbox` as (i, "ok" | "error", payload)."""
    tune_gc()  # as the daemon does
    try:
        outbox.put((i, "ok", strategies.run(_instance_run, s, services, i, n, offsets, barrier, progress)))
    except Exception as exc:  # reported by the parent, which still removes the backend
        traceback.print_exc()
        outbox.put((i, "error", f"{type(exc).__name__}: {exc}"))


async def _instance_run(s: Scenario, services: dict[str, Any], i: int, n: int, offsets: list[float],
                        barrier: Any, progress: bool) -> dict[str, Any]:
    system = Daemon(s, services, instance=i, instances=n)
    await system.open()
    try:  # every instance's app is built before any load is driven
        await anyio.to_thread.run_sync(barrier.wait, INSTANCE_SETUP)
    except BaseException:
        await system.close()
        raise
    return await measure(s, system, offsets, progress=progress, label=system.label, raw=True)


def merge_instances(runs: list[dict[str, Any]], offsets: list[float], label: str, instances: int) -> dict[str, Any]:
    """The instances' runs as one run over all `offsets`: counts, CPU and memory summed, latency
    percentiles over every order, elapsed from the first start to the last end anywhere
    (perf_counter is system-wide), per-stage service times and utilisation averaged, queue
    depths those of the merged series (all instances' queues together)."""
    raw = [r.pop("raw") for r in runs]
    started = min(x["started"] for x in raw)
    elapsed = max(1e-9, max(x["last_end"] for x in raw) - started)
    finished = sum(r["finished"] for r in runs)
    ends: Counter[str] = Counter()
    for r in runs:
        ends.update(r["ends"])
    series = merge_series([r["series"] for r in runs])
    stages = {}
    for name in dict.fromkeys(k for r in runs for k in r["stages"]):
        depth = series["stages"].get(name, {}).get("depth", [])  # queued in all instances at once
        stages[name] = {"depth_mean": mean(depth), "depth_max": max(depth, default=0),
                        "util_mean": mean([r["stages"][name]["util_mean"] for r in runs if name in r["stages"]])}
    service = {name: mean([r["service_ms"][name] for r in runs if name in r["service_ms"]], 4)
               for name in dict.fromkeys(k for r in runs for k in r["service_ms"])}
    n = len(offsets)
    outbox: dict[str, Any] = {}
    if all("outbox_left_at_end" in r for r in runs):  # the outbox is shared: drained once all saw it empty
        outbox = {"outbox_left_at_end": max(r["outbox_left_at_end"] for r in runs),
                  "drained": max(x["drained"] for x in raw) if all(x.get("drained") for x in raw) else None}
    return {"label": label, "orders": n, "finished": finished,
            **strategies.outbox_figures(finished, started, started + elapsed, outbox),
            "stopped": next((r["stopped"] for r in runs if r["stopped"] != "finished"), "finished"),
            "ends": dict(ends), "elapsed_s": round(elapsed, 3), "throughput": round(finished / elapsed, 1),
            "offered_rate": round(n / offsets[-1], 1) if offsets and offsets[-1] > 0 else None,
            "latency_ms": {k: round(v, 2) for k, v in percentiles([v for x in raw for v in x["latencies_s"]]).items()},
            "service_ms": service, "system": runs[0]["system"],
            "rss_peak_mb": round(sum(r["rss_peak_mb"] for r in runs), 1),
            "cpu_seconds": round(sum(r["cpu_seconds"] for r in runs), 3),
            "cpu_cores": round(sum(r["cpu_cores"] for r in runs), 2), "stages": stages,
            "series": series, "instances": instances, "instance_throughput": [r["throughput"] for r in runs],
            "instance_finished": [r["finished"] for r in runs]}


def by_fifth(series: dict[str, Any]) -> list[dict[str, float | None]] | None:
    """Orders/s and CPU ms an order in each fifth of a run's time, from its samples: whether the
    rate held to the end (a run whose rate falls sustains less than its mean says). None for a
    run too short to sample ten times."""
    t, done, cpu = series.get("t") or [], series.get("finished") or [], series.get("cpu_s") or []
    if len(t) < 10 or len(done) != len(t) or len(cpu) != len(t) or t[-1] <= 0:
        return None
    marks = [0] + [max(0, bisect.bisect_right(t, t[-1] * k / 5) - 1) for k in range(1, 6)]
    out: list[dict[str, float | None]] = []
    for a, b in zip(marks, marks[1:]):
        seconds, orders = t[b] - t[a], done[b] - done[a]
        out.append({"orders_per_s": round(orders / seconds, 1) if seconds > 0 else None,
                    "cpu_ms_per_order": round((cpu[b] - cpu[a]) / orders * 1000, 3) if orders > 0 else None})
    return out


def merge_series(series: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples merged by index (the instances sample at the same interval from one start): finished,
    CPU and RSS summed, each stage's depth summed and utilisation averaged. Time is the longest
    series' (the first's when all are alike); past its last sample an instance counts with its
    last totals and an empty queue."""
    longest = max(series, key=lambda x: len(x["t"]))
    samples = range(len(longest["t"]))

    def total(key: str, k: int) -> float:
        return sum(x[key][min(k, len(x[key]) - 1)] for x in series if x[key])

    out: dict[str, Any] = {"t": list(longest["t"]),
                           "finished": [int(total("finished", k)) for k in samples],
                           "rss_mb": [round(total("rss_mb", k), 1) for k in samples],
                           "cpu_s": [round(total("cpu_s", k), 3) for k in samples], "stages": {}}
    for name in longest["stages"]:
        rows = [x["stages"][name] for x in series if name in x["stages"]]
        out["stages"][name] = {
            "depth": [sum(r["depth"][k] for r in rows if k < len(r["depth"])) for k in samples],
            "util": [mean([r["util"][k] for r in rows if k < len(r["util"])]) for k in samples],
            "busy_s": round(sum(r["busy_s"] for r in rows), 4), "slots": sum(r["slots"] for r in rows)}
    return out


def pool_strategy_ratios(runs: dict[str, Any]) -> dict[str, Any]:
    """Throughput ratios, and the same per CPU-second: on a loaded machine a run may get less than
    the core it could use, and orders per CPU-second is what a core can carry."""
    base = runs["per_stage"]
    out = {"per_stage_throughput": base["throughput"], "per_stage_orders_per_cpu_s": _per_cpu(base)}
    for other in ("shared_pool", "per_order"):
        if other in runs:
            r = runs[other]
            out[f"{other}_throughput"] = r["throughput"]
            out[f"{other}_orders_per_cpu_s"] = _per_cpu(r)
            out[f"per_stage_over_{other}"] = round(base["throughput"] / r["throughput"], 3) if r["throughput"] else None
            out[f"per_cpu_s_per_stage_over_{other}"] = (round(_per_cpu(base) / _per_cpu(r), 3)
                                                        if _per_cpu(r) else None)
            out[f"p99_per_stage_over_{other}"] = (round(base["latency_ms"]["p99"] / r["latency_ms"]["p99"], 3)
                                                  if r["latency_ms"]["p99"] else None)
    return out


def _per_cpu(run: dict[str, Any]) -> float:
    return round(run["finished"] / run["cpu_seconds"], 1) if run.get("cpu_seconds") else 0.0


def capacity_ratio(run: dict[str, Any]) -> dict[str, Any]:
    service = {k: v / 1000 for k, v in run["service_ms"].items()}
    cap = advisor.capacity(run["system"]["stages"], service, run["system"].get("process_workers", 2))
    cap["measured"] = run["throughput"]
    cap["ratio"] = round(run["throughput"] / cap["orders_per_s"], 3) if cap["orders_per_s"] else math.nan
    return cap


def _slim(run: dict[str, Any]) -> dict[str, Any]:
    """A run kept for its figures only (the advisor grid): no time series."""
    return {k: v for k, v in run.items() if k != "series"}


# The speed gauge: this many items through the raw queue chain before the runs, a fraction of a second.
GAUGE_ITEMS = 20_000


def machine() -> dict[str, Any]:
    """The machine, with a speed gauge taken when the invocation starts: the same host runs
    the same code at very different speeds from one hour to the next (a shared virtual
    machine), so figures of different invocations compare only with their gauges beside them."""
    import uvloop
    gauge = strategies.run(strategies.raw_chain, GAUGE_ITEMS)
    return {"cores": os.cpu_count(), "python": platform.python_version(), "python_home": sys.base_prefix,
            "platform": platform.platform(),
            "uvloop": uvloop.__version__, "build": compiled.describe(), "load_average": os.getloadavg(),
            "gauge": {"raw_chain_items_per_s": gauge["throughput"], "us_per_hop": gauge["us_per_hop"]}}
