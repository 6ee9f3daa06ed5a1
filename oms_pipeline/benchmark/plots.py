"""PNG plots of a run's results (matplotlib, optional extra `bench`).

throughput.png: orders finished per second over time, one line per run.
latency.png: p50 / p95 / p99 per run.
queue_depth.png and utilisation.png: per stage over time, for the main run.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

SKIP = ("hand_tuned_", "noop_pipeline", "advised")  # figures only: no series to plot


def available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def write(results: dict[str, Any], out: Path) -> list[str]:
    if not available():
        results["notes"].append("no plots: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    from .report import main_run
    runs = {k: v for k, v in results["runs"].items() if "series" in v and not k.startswith(SKIP)}
    made = []
    for name, draw in (("throughput.png", _throughput), ("latency.png", _latency)):
        fig = draw(plt, runs if name == "throughput.png" else results["runs"])
        if fig is not None:
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            made.append(name)
    main = main_run(results)
    if main in runs:
        for name, key, label in (("queue_depth.png", "depth", "orders queued"),
                                 ("utilisation.png", "util", "share of slot time busy")):
            fig = _per_stage(plt, runs[main], key, label, f"{label} per stage, run {main}")
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            made.append(name)
    return made


def rates(series: dict[str, Any], window: float = 1.0) -> tuple[list[float], list[float]]:
    """Orders finished per second over the last `window` seconds at each sample (a single
    sampling interval is too short: batches end in lumps)."""
    t, done = series["t"], series["finished"]
    xs, ys, j = [], [], 0
    for i in range(1, len(t)):
        while j < i - 1 and t[i] - t[j + 1] >= window:
            j += 1
        dt = t[i] - t[j]
        if dt > 0:
            xs.append(t[i])
            ys.append((done[i] - done[j]) / dt)
    return xs, ys


def _throughput(plt: Any, runs: dict[str, Any]) -> Any:
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, run in runs.items():
        ax.plot(*rates(run["series"]), label=f"{name} ({run['throughput']:,.0f}/s)", linewidth=1.2)
    ax.set(xlabel="seconds since the first arrival", ylabel="orders finished per second",
           title="Throughput over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _latency(plt: Any, runs: dict[str, Any]) -> Any:
    named = [(k, v["latency_ms"]) for k, v in runs.items() if v.get("latency_ms", {}).get("p50") is not None]
    if not named:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(named) + 3), 4.5))
    width = 0.27
    for j, q in enumerate(("p50", "p95", "p99")):
        ax.bar([i + (j - 1) * width for i in range(len(named))], [lat[q] for _, lat in named], width, label=q)
    ax.set_xticks(range(len(named)), [k for k, _ in named], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="ms from arrival to the end", title="End-to-end latency percentiles")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _per_stage(plt: Any, run: dict[str, Any], key: str, ylabel: str, title: str) -> Any:
    series = run["series"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for stage, row in series["stages"].items():
        ax.plot(series["t"], row[key], label=stage, linewidth=1)
    ax.set(xlabel="seconds since the first arrival", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    return fig
