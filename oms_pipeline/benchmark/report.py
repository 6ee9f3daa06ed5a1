"""The output directory: results.json (everything), summary.md (the tables), PNG plots."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

from . import plots

RESULTS, SUMMARY = "results.json", "summary.md"


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["plots"] = plots.write(results, out)
    (out / RESULTS).write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    (out / SUMMARY).write_text(markdown(results))


def main_run(results: dict[str, Any]) -> str | None:
    """The run the per-stage tables and plots describe."""
    runs = results["runs"]
    for name in ("per_stage", "memory", "embedded", "production"):
        if name in runs:
            return name
    return next(iter(runs), None)


def _gauge(g: dict[str, Any]) -> str:
    return (f"- speed gauge at start: {g['raw_chain_items_per_s']:,.0f} items/s through a raw 16-hop "
            f"`asyncio.Queue` chain ({g['us_per_hop']} µs a hop); figures of invocations with "
            f"different gauges are not comparable")


def _postgres(r: dict[str, Any]) -> list[str]:
    name = main_run(r)
    found = r["runs"][name].get("system", {}).get("postgresql") if name else None
    return ["- PostgreSQL server: " + ", ".join(f"{k} {v}" for k, v in found.items())] if found else []


def _home(machine: dict[str, Any]) -> str:
    """Where the interpreter lives: its build moves the figures (README "The interpreter")."""
    return f" ({machine['python_home']})" if machine.get("python_home") else ""


def markdown(r: dict[str, Any]) -> str:
    s = r["scenario"]
    lines = [f"# Benchmark: {s['name']}", "", s["description"], "",
             f"- command: `{r['command']}`", f"- scenario file: `{s['source']}`",
             f"- started {r['started']}, finished {r.get('finished', '')}",
             f"- machine: {r['machine']['cores']} cores, Python {r['machine']['python']}"
             f"{_home(r['machine'])}, "
             f"uvloop {r['machine']['uvloop']}, {r['machine'].get('build', 'build not recorded')}, "
             f"load average at start {_loads(r['machine']['load_average'])}",
             _gauge(r["machine"]["gauge"]),
             *_postgres(r),
             f"- load: {_load(s)}", ""]
    lines += _runs_table(r["runs"])
    c = r["comparisons"]
    for title, part in (("Pool strategies", _strategies), ("Capacity", _capacity), ("Runtime overhead", _overhead),
                        ("Pool-size advisor", _advisor), ("Peers", _peers)):
        key = {"Pool strategies": "pool_strategies", "Capacity": "capacity", "Runtime overhead": "overhead",
               "Pool-size advisor": "advisor", "Peers": "peers"}[title]
        if key in c:
            lines += [f"## {title}", "", *part(c[key], r), ""]
    name = main_run(r)
    if name and r["runs"][name].get("service_ms"):
        run = r["runs"][name]
        each = ([f"Pools and slots are each instance's; service time and utilisation the mean of the "
                 f"{run['instances']} instances; queue depth their queues together.", ""]
                if run.get("instances", 1) > 1 else [])
        lines += [f"## Stages of run `{name}`", "", *each, *_stage_table(run), ""]
    if r["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in r["notes"]), ""]
    if r.get("plots"):
        lines += ["## Plots", "", *(f"![{p}]({p})" for p in r["plots"]), ""]
    return "\n".join(lines)


def _load(s: dict[str, Any]) -> str:
    load = s["load"]
    n = round(load["rate"] * load["duration"]) if load["rate"] and load["duration"] else load["orders"]
    how = f"open loop, Poisson arrivals at {load['rate']:,.0f}/s" if load["rate"] else "one burst"
    instances = s["workload"].get("instances", 1)
    return (f"{n:,} orders, {how}, seed {s['seed']}, workload `{s['workload']['kind']}`"
            + (f", {instances} daemon instances sharing its backend" if instances > 1 else ""))


def _loads(values: Any) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _num(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:,.{digits}f}"


def _runs_table(runs: dict[str, Any]) -> list[str]:
    rows = ["## Runs", "", "Orders/s of a repeated run is its median round (every round in brackets).", "",
            "Ended: orders that ended, with those that ended other than done (in manual review, "
            "cancelled, refused) named in brackets.", "",
            "Outbox: the rows not yet published when the last order ended, and the seconds until the "
            "relay had published them all; orders/s with the outbox drained counts until then.", "",
            "| run | orders | ended | orders/s | p50 ms | p95 ms | p99 ms | CPU cores | "
            "CPU ms/order | peak RSS MB | outbox left | drained after s | orders/s, outbox drained |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        if "skipped" in run:
            continue
        lat = run.get("latency_ms", {})
        rounds = run.get("throughput_rounds", [])
        each = f" ({' / '.join(_num(t) for t in rounds)})" if len(rounds) > 1 else ""
        if run.get("instances", 1) > 1:
            name = (f"{name} ({run['instances']} instances: "
                    f"{' + '.join(_num(t) for t in run['instance_throughput'])} orders/s)")
        rows.append(f"| {name} | {run['orders']:,} | {run['finished']:,}{_other_ends(run)} | {_num(run['throughput'])}{each} | "
                    f"{_num(lat.get('p50'))} | {_num(lat.get('p95'))} | {_num(lat.get('p99'))} | "
                    f"{_num(run.get('cpu_cores'), 2)} | {_num(run.get('cpu_ms_per_order'), 3)} | "
                    f"{_num(run.get('rss_peak_mb'))} | {_num(run.get('outbox_left_at_end'), 0)} | "
                    f"{_num(run.get('outbox_drained_s'), 2)} | {_num(run.get('throughput_drained'))} |")
    for name, run in runs.items():
        if run.get("by_fifth"):
            rows += ["", f"`{name}` by fifth of its time: "
                     + " / ".join(_num(f["orders_per_s"]) for f in run["by_fifth"]) + " orders/s, "
                     + " / ".join(_num(f["cpu_ms_per_order"], 3) for f in run["by_fifth"]) + " CPU ms an order"]
    return rows + [""]


def _other_ends(run: dict[str, Any]) -> str:
    """How many orders ended other than done (manual review, cancelled, refused...): a run whose
    orders left the flow early did less work per order, so its rate is not a full run's."""
    other = {end.lstrip("@"): n for end, n in sorted(run.get("ends", {}).items()) if end != "@done" and n}
    return " (" + ", ".join(f"{end} {n:,}" for end, n in other.items()) + ")" if other else ""


def _strategies(c: dict[str, Any], r: dict[str, Any]) -> list[str]:
    out = [f"- per-stage pools (the runtime): {_num(c['per_stage_throughput'])} orders/s, "
           f"{_num(c['per_stage_orders_per_cpu_s'])} orders per CPU-second"]
    for other, what in (("shared_pool", "one shared pool of the same total size"),
                        ("per_order", "one task per order, all stages in sequence")):
        if f"{other}_throughput" in c:
            out.append(f"- {what}: {_num(c[f'{other}_throughput'])} orders/s, "
                       f"{_num(c[f'{other}_orders_per_cpu_s'])} orders per CPU-second; per-stage / {other} = "
                       f"**{_num(c[f'per_stage_over_{other}'], 3)}** in throughput, "
                       f"**{_num(c[f'per_cpu_s_per_stage_over_{other}'], 3)}** per CPU-second (p99 latency ratio "
                       f"{_num(c[f'p99_per_stage_over_{other}'], 3)})")
    return out


def _capacity(c: dict[str, Any], r: dict[str, Any]) -> list[str]:
    out = [f"- tightest resource: {c['tightest']} at {_num(c['orders_per_s'])} orders/s "
           f"(tightest stage pool alone: {c.get('tightest_stage', '')} at "
           f"{_num(c.get('tightest_stage_orders_per_s'))} orders/s)",
           f"- measured: {_num(c['measured'])} orders/s, **{_num(c['ratio'] * 100)}%** of capacity"
           + (" (open loop below capacity: the share of capacity the offered load used)"
              if r["scenario"]["load"]["rate"] else ""), "",
           "| resource | orders/s it can take |", "|---|---:|"]
    out += [f"| {k} | {_num(v)} |" for k, v in c["bounds"].items()]
    return out


def _overhead(c: dict[str, Any], r: dict[str, Any]) -> list[str]:
    out = []
    if "pipeline_orders_per_s" in c:
        out.append(f"- the runtime, 16 no-op stages, in memory: {_num(c['pipeline_orders_per_s'], 0)} orders/s "
                   f"({_num(c['pipeline_us_per_hop'], 2)} µs per hop)")
    if "raw_items_per_s" in c:
        out.append(f"- raw asyncio.Queue chain, 16 hops: {_num(c['raw_items_per_s'], 0)} items/s "
                   f"({_num(c['raw_us_per_hop'], 2)} µs per hop)")
    if "ratio" in c:
        out.append(f"- runtime / raw chain = **{_num(c['ratio'], 3)}** ({_num(c['extra_us_per_hop'], 2)} µs more "
                   "per hop: intake, routing, state transitions, batching, counters)")
    return out


def _advisor(c: dict[str, Any], r: dict[str, Any]) -> list[str]:
    out = []
    if "ratio" in c:
        out += [f"- arrival rate the pools are sized for: {_num(c['rate'])} orders/s ({c['rate_from']}); "
                f"target utilisation {c['utilisation']}, headroom {c['headroom']} x sqrt(busy slots)",
                f"- advised pools: {_num(c['advised_throughput'])} orders/s with {c['advised_slots']} io slots; "
                f"best hand-tuned (pool {c['best_hand_tuned_pool']} per io stage, {c['best_slots']} slots): "
                f"{_num(c['best_hand_tuned_throughput'])} orders/s; advised / best = **{_num(c['ratio'], 3)}**", "",
                "| io pool per stage | orders/s | p99 ms |", "|---:|---:|---:|"]
        out += [f"| {k} | {_num(v['throughput'])} | {_num(v['latency_ms']['p99'])} |" for k, v in c["grid"].items()]
        out += [f"| advised | {_num(c['advised_throughput'])} | {_num(c['advised_latency_ms']['p99'])} |", ""]
    out += [f"Proposal (`{c['snippet_file']}`):", "", "```toml", c["snippet"].rstrip(), "```"]
    return out


def _peers(c: dict[str, Any], r: dict[str, Any]) -> list[str]:
    out = []
    for peer, v in c.items():
        if "skipped" in v:
            out.append(f"- {peer}: {v['skipped']}")
        else:
            out.append(f"- {peer}: {_num(v['throughput'])} orders/s ({_num(v['cpu_ms_per_order'], 2)} CPU ms "
                       f"per order); per-stage pipeline / {peer} = **{_num(v['pipeline_over_peer'], 2)}**")
    return out


def _stage_table(run: dict[str, Any]) -> list[str]:
    rows = ["| stage | kind | pool | slots | service ms | utilisation (mean) | queue depth mean / max |",
            "|---|---|---:|---:|---:|---:|---:|"]
    stages = run["system"].get("stages", {})
    sampled = run.get("stages", {})
    for name, ms in run["service_ms"].items():
        st, sm = stages.get(name, {}), sampled.get(name, {})
        rows.append(f"| {name} | {st.get('kind', '')} | {st.get('pool', '')} | {st.get('slots', '')} | "
                    f"{_num(ms, 3)} | {_num(sm.get('util_mean'), 2)} | "
                    f"{_num(sm.get('depth_mean'))} / {sm.get('depth_max', '')} |")
    return rows
