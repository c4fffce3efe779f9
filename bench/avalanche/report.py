"""Markdown tables and PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "never"
        if value.is_integer() and abs(value) >= 100:
            return f"{int(value):,}"
        return f"{value:,.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


RESTART_COLUMNS = [
    ("row", "name"),
    ("99% back (s)", "back_99"),
    ("100% back (s)", "back_100"),
    ("downtime p99 (s)", "downtime_p99"),
    ("peak handshakes/s", "peak_handshakes_s"),
    ("peak commands/s", "peak_commands_s"),
    ("lag p99 (ms)", "lag_p99_ms"),
    ("lag max (ms)", "lag_max_ms"),
    ("full GC max (ms)", "gc_max_ms"),
    ("DB queue peak", "db_queue_peak"),
    ("DB queries", "db_calls"),
    ("timeouts", "timeouts"),
    ("retries", "retries"),
    ("refused (503)", "refused"),
    ("lost", "lost"),
    ("dup", "duplicated"),
    ("load gen CPU peak", "loadgen_cpu_peak"),
]

#: RPC mode (``--rpc``): what reached the application and what the RPC executors did.
RPC_COLUMNS = [
    ("app calls", "app_calls"),
    ("app calls/s peak", "app_calls_peak_s"),
    ("connect calls", "app_connects"),
    ("command calls", "app_commands"),
    ("disconnect calls", "app_disconnects"),
    ("RPC limit min", "rpc_limit_min"),
    ("RPC refusals", "rpc_refusals"),
]

CELEBRITY_COLUMNS = [
    ("row", "name"),
    ("50% ready (s)", "back_50"),
    ("99% ready (s)", "back_99"),
    ("100% ready (s)", "back_100"),
    ("peak handshakes/s", "peak_handshakes_s"),
    ("lag p99 (ms)", "lag_p99_ms"),
    ("lag max (ms)", "lag_max_ms"),
    ("DB queue peak", "db_queue_peak"),
    ("timeouts", "timeouts"),
    ("retries", "retries"),
    ("refused (503)", "refused"),
    ("load gen CPU peak", "loadgen_cpu_peak"),
]

SUBSCRIBE_COLUMNS = [
    ("mode", "mode"),
    ("clients", "clients"),
    ("init p50 (s)", "init_p50"),
    ("init p99 (s)", "init_p99"),
    ("all ready (s)", "back_100"),
    ("subscribes in flight (max)", "max_inflight"),
    ("timeouts", "timeouts"),
    ("lag p99 (ms)", "lag_p99_ms"),
    ("load gen CPU peak", "loadgen_cpu_peak"),
]


def rows_table(columns: list[tuple[str, str]], summaries: list[dict[str, Any]]) -> str:
    return table([c[0] for c in columns], [[s.get(key) for _, key in columns] for s in summaries])


def plot_timeseries(path: Path, title: str, xlabel: str,
                    series: dict[str, dict[str, list[float]]]) -> None:  # fmt: skip
    """Four stacked panels, one line per strategy: connections, clients ready, handshakes/s,
    loop lag (with the full garbage collections marked); in RPC mode a fifth, the calls per
    second that reached the application."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("connections", "t", "open connections (server)"),
        ("ready", "ready_t", "clients ready (all subscriptions)"),
        ("handshakes", "t", "handshake attempts / s"),
        ("app_calls", "app_t", "RPC calls / s reaching the application"),
        ("lag_ms", "t", "event-loop lag (ms, max per 0.25 s; x: full GC)"),
    ]
    if not any(s.get("app_t") for s in series.values()):
        panels = [p for p in panels if p[0] != "app_calls"]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3 * len(panels)), sharex=True)
    for ax, (key, tkey, label) in zip(axes, panels, strict=True):
        for name, s in series.items():
            if tkey not in s:
                continue
            (line,) = ax.plot(s[tkey], s[key], label=name, linewidth=1.2)
            if key == "lag_ms" and s.get("gc_t"):
                # The server's full garbage collections, to tell their pauses from overload.
                ax.scatter(s["gc_t"], s["gc_ms"], marker="x", s=18, color=line.get_color())
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(fontsize=8, ncol=2)
    axes[-1].set_xlabel(xlabel)
    axes[-1].set_yscale("symlog", linthresh=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_subscribe(path: Path, summaries: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for mode in ("concurrent", "linearized"):
        pts = sorted((s["clients"], s["back_100"]) for s in summaries if s["mode"] == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode)
    ax.set_xlabel("clients joining within 1 s")
    ax.set_ylabel("time until all subscribed (s)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_backoff(path: Path, results: dict[str, dict[str, list[Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for strategy, points in results["brooker"].items():
        xs = [p.clients for p in points]
        ax1.plot(xs, [p.calls for p in points], marker=".", label=strategy)
        ax2.plot(xs, [p.time_ms / 1000 for p in points], marker=".", label=strategy)
    ax1.set_title("work: write calls (mean)")
    ax2.set_title("completion time (s, mean)")
    ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.set_xlabel("contending clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
