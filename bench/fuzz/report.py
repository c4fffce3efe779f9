"""The fuzz campaign's summary as a Markdown section and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown(summary: dict[str, Any]) -> str:
    """The campaign as a Markdown section."""
    lines = [
        "## Fuzz campaign",
        "",
        f"- date: {summary['date']}; {summary['minutes']:g} min asked, "
        f"{summary['wall_seconds']:.0f} s wall; compiled speedups: {summary['compiled_speedups']}",
        f"- **{summary['examples']:,} hypothesis examples ({summary['inputs']:,} inputs checked, "
        f"with the cheap mutants), {summary['failure_count']} failures "
        f"({len(summary['failures'])} distinct): {summary['verdict']}**",
        "",
        "| target | examples | inputs checked | seconds | max CPU per input | distinct outcomes "
        "| most common |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in summary["targets"].items():
        top = "; ".join(f"{label} x{n}" for label, n in t["top_outcomes"][:4])
        cpu = (f"{t['max_cpu_ms_per_input']:.1f} ms ({t['max_cpu_input_bytes']:,} B)"
               if "max_cpu_ms_per_input" in t and name != "live" else "-")  # fmt: skip
        lines.append(f"| {name} | {t['examples']:,} | {t['inputs']:,} | {t['seconds']:.0f} | "
                     f"{cpu} | {t['distinct_outcomes']} | {top} |")  # fmt: skip
    live = summary.get("live") or {}
    if live:
        lines += [
            "",
            f"Live server: {live['batches']:,} batches, {live['connections']:,} hostile "
            f"connections, {live['health_checks']:,} health checks (connect, subscribe, receive a "
            f"broadcast); server RSS {live['rss_mib_baseline']:.1f} MiB at start, "
            f"{live['rss_mib_first_quarter_median']:.1f} → "
            f"{live['rss_mib_last_quarter_median']:.1f} MiB (median of first → last quarter), "
            f"max {live['rss_mib_max']:.1f} MiB; open fds {live['fds_baseline']} at start, "
            f"at most {live['fds_max_after_batch']:.0f} after a batch; "
            f"server restarts needed: {live['server_restarts']}; exit code at the end: "
            f"{live['server_exit_code']}.",
            "",
            "Connection outcomes: "
            + ", ".join(f"{label} x{n:,}" for label, n in live["connection_outcomes"][:10]),
        ]
        if live["log_problems"]:
            lines += ["", "Server log problems: "
                      + "; ".join(f"`{k}` x{n}" for k, n in live["log_problems"])]  # fmt: skip
    if summary["failures"]:
        lines += ["", "Failures:", ""]
        for f in summary["failures"]:
            first = f["error"].splitlines()[0] if f["error"] else ""
            lines.append(f"- {f['target']} (x{f['count']}, seed {f['seed']}): `{first[:200]}`")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """The live server's RSS and open fds after every batch of hostile connections."""
    samples = (summary.get("live") or {}).get("samples") or []
    if not samples:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [s["t"] / 60 for s in samples]
    rss = [s["rss_mib"] for s in samples]
    fds = [s["fds"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    ax1.plot(ts, rss, ".", color="tab:blue", ms=3)
    ax1.set_ylabel("server RSS (MiB)")
    ax1.set_ylim(0, max(rss) * 1.2)
    ax1.grid(alpha=0.3)
    ax2.plot(ts, fds, ".", color="tab:green", ms=3)
    ax2.set_ylabel("open fds after a batch")
    ax2.set_ylim(0, max(fds) + 4)
    ax2.set_xlabel("minutes into the campaign (the live target runs in slices)")
    ax2.grid(alpha=0.3)
    live = summary["live"]
    fig.suptitle(f"fuzz, live target: {live['batches']:,} batches, {live['connections']:,} "
                 f"hostile connections")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
