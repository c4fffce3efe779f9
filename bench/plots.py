"""PNG plots of the results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _save(fig: Any, out: Path, name: str) -> Path:
    """Lay out *fig*, write it to ``out/name.png`` and let it go."""
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _err(stats: list[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    med = [s["median"] or 0.0 for s in stats]
    lo = [m - (s["min"] or m) for m, s in zip(med, stats, strict=True)]
    hi = [(s["max"] or m) - m for m, s in zip(med, stats, strict=True)]
    return med, [lo, hi]


def plot_micro(result: dict[str, Any], out: Path) -> Path:
    rows = result["rows"]
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, axes = plt.subplots(1, len(kernels), figsize=(4.2 * len(kernels), 3.8), squeeze=False)
    for ax, kernel in zip(axes[0], kernels, strict=True):
        mine = [r for r in rows if r["kernel"] == kernel]
        for impl in dict.fromkeys(r["impl"] for r in mine):
            pts = sorted((r["size"], r["gbps"]["median"]) for r in mine if r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(kernel)
        ax.set_xlabel("payload bytes")
        ax.set_ylabel("GB/s")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    return _save(fig, out, "micro")


def plot_echo(result: dict[str, Any], out: Path) -> Path:
    rows = result["rows"]
    configs = list(dict.fromkeys((r["conns"], r["size"], r["binary"]) for r in rows))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(configs) * len(targets) / 3), 4.5))
    width = 0.8 / max(1, len(targets))
    for i, target in enumerate(targets):
        xs, stats = [], []
        for j, cfg in enumerate(configs):
            for r in rows:
                if r["target"] == target and (r["conns"], r["size"], r["binary"]) == cfg:
                    xs.append(j + i * width)
                    stats.append(r["cpu_us"])
        med, err = _err(stats)
        ax.bar(xs, med, width, yerr=err, label=target, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(configs))])
    ax.set_xticklabels(
        [f"{c}c {s}B {'bin' if b else 'text'}" for c, s, b in configs], rotation=20, fontsize=8
    )
    ax.set_yscale("log")
    ax.set_ylabel("server CPU per round trip (us, log)")
    ax.set_title("Echo: server CPU per round trip (median, min-max)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out, "echo")


def plot_broadcast(result: dict[str, Any], out: Path) -> Path:
    rows = result["rows"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = sorted((r for r in rows if r["target"] == target), key=lambda r: r["conns"])
        xs = [r["conns"] for r in mine]
        med, err = _err([r["cpu_us"] for r in mine])
        ax1.errorbar(xs, med, yerr=err, marker="o", capsize=3, label=target)
        ax2.plot(xs, [r["p99_ms"]["median"] for r in mine], marker="o", label=target)
    ax1.set(xscale="log", yscale="log", xlabel="connections", ylabel="us per recipient")
    ax1.set_title("Broadcast: server CPU per recipient")
    ax2.set(xscale="log", yscale="log", xlabel="connections", ylabel="p99 latency (ms)")
    ax2.set_title("Broadcast: p99 delivery latency")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    return _save(fig, out, "broadcast")


def plot_wsbench(result: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for run in result["runs"]:
        steps = run["steps"]
        line = ax.plot(
            [s["clients"] for s in steps], [s["p95_ms"] for s in steps], marker="o",
            label=f"run {run['repeat']}: RTT p95",
        )  # fmt: skip
        if any(s.get("delivery_p95_ms") is not None for s in steps):
            ax.plot(
                [s["clients"] for s in steps], [s.get("delivery_p95_ms") for s in steps],
                marker="x", linestyle=":", color=line[0].get_color(),
                label=f"run {run['repeat']}: delivery p95",
            )  # fmt: skip
    ax.axhline(result["params"]["limit_ms"], color="red", linestyle="--", label="limit")
    ax.set(
        xlabel="clients",
        ylabel="p95 (ms)",
        title="websocket-bench style broadcast (trio_cable)",
    )
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)
    return _save(fig, out, "wsbench")


def plot_memory(result: dict[str, Any], out: Path) -> Path:
    rows = result["rows"]
    sizes = sorted({r["conns"] for r in rows})
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    width = 0.8 / max(1, len(sizes))
    for i, conns in enumerate(sizes):
        found = {r["target"]: r["bytes_per_conn"] for r in rows if r["conns"] == conns}
        empty = {"median": 0, "min": 0, "max": 0}
        stats = [found.get(t, empty) for t in targets]
        med, err = _err(stats)
        ax.bar(
            [j + i * width for j in range(len(targets))], [m / 1024 for m in med], width,
            yerr=[[e / 1024 for e in side] for side in err], capsize=2, label=f"{conns} conns",
        )  # fmt: skip
    ax.axhline(8, color="red", linestyle="--", label="8 KB target")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(targets))])
    ax.set_xticklabels(targets, rotation=20, fontsize=8)
    ax.set_ylabel("KiB per idle connection")
    ax.set_title("Server memory per idle subscribed connection")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out, "memory")


def plot_scale(result: dict[str, Any], out: Path) -> Path:
    rows = result["rows"]
    limits = result.get("limits", {})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = [
        ("Idle, default pings: event-loop lag", [("lag_p99_ms", "p99"), ("lag_max_ms", "max")],
         [limits.get("lag_p99_ms"), limits.get("lag_max_ms")]),
        ("1,000 connects/s of churn", [("churn_lag_max_ms", "lag max"),
                                       ("churn_gc_max_ms", "full-GC pause max")],
         [limits.get("churn_gc_max_ms")]),
        ("Broadcast to all", [("bcast_p50_ms", "delivery p50"), ("bcast_p99_ms", "delivery p99"),
                              ("probe_max_ms", "another client's reply, max")],
         [limits.get("probe_max_ms")]),
    ]  # fmt: skip
    for ax, (title, series, lines) in zip(axes, panels, strict=True):
        for target in dict.fromkeys(r["target"] for r in rows):
            mine = sorted((r for r in rows if r["target"] == target), key=lambda r: r["conns"])
            for key, label in series:
                pts = [(r["conns"], r[key]["median"]) for r in mine if r[key]["median"]]
                style = "--" if "@" in target else "-"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                        label=f"{target}: {label}")  # fmt: skip
        for limit in lines:
            if limit:
                ax.axhline(limit, color="red", linestyle=":", linewidth=1)
        ax.set(xscale="log", yscale="log", xlabel="connections", ylabel="ms", title=title)
        ax.legend(fontsize=6)
        ax.grid(True, alpha=0.3)
    return _save(fig, out, "scale")


PLOTTERS = {
    "micro": plot_micro,
    "echo": plot_echo,
    "broadcast": plot_broadcast,
    "wsbench": plot_wsbench,
    "memory": plot_memory,
    "scale": plot_scale,
}


def plot(result: dict[str, Any], out: Path) -> Path | None:
    """Draw the plot for *result* into *out*; ``None`` if its bench has none."""
    fn = PLOTTERS.get(result.get("bench", ""))
    if fn is None or not result.get("rows"):
        return None
    out.mkdir(parents=True, exist_ok=True)
    return fn(result, out)
