"""``python -m bench avalanche|celebrity|subscribe|backoff`` (also ``python -m bench.avalanche``).

Each command prints a markdown table, writes ``<scenario>.json`` (summary and time series),
``<scenario>.md`` and PNG plots to ``--out DIR`` (default a fresh ``./bench-out/<time>-<scenario>``;
``--update-results``: the committed ``bench/avalanche/results``, refused with ``--quick``), and
with ``--json`` prints the summary as the last line of output.  Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import output, procs
from bench.deps import require

SCENARIOS = ("avalanche", "restart", "celebrity", "subscribe", "backoff")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("scenario", choices=SCENARIOS, help="avalanche (= restart), celebrity, ...")
    p.add_argument("--quick", action="store_true", help="CI size: hundreds of clients, seconds")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    output.add_arguments(p)
    p.add_argument("--clients", type=int, help="clients (restart/celebrity; subscribe: max load)")
    p.add_argument("--runs", type=int, help="backoff: runs per point (default 100, quick 20)")
    p.add_argument("--rows", help="restart: comma-separated rows (naive,jitter,linearized,"
                   "drain,resume,jwt,defaults; default all)")  # fmt: skip
    p.add_argument("--rpc", action="store_true", help="restart/celebrity: the application "
                   "answers over AnyCable HTTP RPC from a process of its own (trio_cable.rpc "
                   "under uvicorn); results as <scenario>-rpc.*; restart rows default to "
                   "naive,drain,resume,defaults")  # fmt: skip
    p.add_argument("--loadgens", type=int, help="load-generator processes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _clean(value: Any) -> Any:
    """JSON-safe: inf/nan become null."""
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class _Progress:
    """rich progress bars on stderr (or nothing with --quiet)."""

    def __init__(self, quiet: bool) -> None:
        self.bar: Any = None
        if not quiet:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def task(self, name: str, total: int) -> Any:
        if self.bar is None:
            return lambda *a: None
        task_id = self.bar.add_task(name, total=total)

        def update(phase: str, done: int, total_: int) -> None:
            self.bar.update(task_id, description=f"{name}: {phase}", completed=done, total=total_)

        return update

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text)


def _run_trials(specs: list[Any], out: Path, progress: _Progress) -> list[dict[str, Any]]:
    import trio

    from bench.avalanche.analysis import series, summarize
    from bench.avalanche.trial import run_trial

    results = []
    for spec in specs:
        update = progress.task(spec.name, spec.clients)
        started = time.monotonic()
        raw = trio.run(run_trial, spec, out / "raw", update)
        summary = {"name": spec.name, **summarize(raw)}
        summary["wall_s"] = time.monotonic() - started
        results.append({"summary": summary, "series": series(raw)})
        progress.log(
            f"{spec.name}: 100% back {summary['back_100']:.1f} s, lost {summary['lost']}, "
            f"timeouts {summary['timeouts']}"
        )
    return results


def _conditions(scale: Any) -> dict[str, Any]:
    import platform

    server_core, client_core = procs.cores()
    return {
        "cpus": os.cpu_count(),
        "server_core": server_core,
        "client_core": client_core,
        "python": platform.python_version(),
        "cost": scale.cost,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def run_restart(args: argparse.Namespace, scale: Any, progress: _Progress) -> dict[str, Any]:
    from bench.avalanche import report
    from bench.avalanche.scenarios import restart_specs

    clients = args.clients or scale.clients
    rows = args.rows.split(",") if args.rows else None
    specs = restart_specs(scale, clients, rows, rpc=args.rpc)
    results = _run_trials(specs, args.out, progress)
    summaries = [r["summary"] for r in results]
    md = report.rows_table(_columns(report.RESTART_COLUMNS, args.rpc), summaries)
    report.plot_timeseries(
        args.out / f"{args.name}.png",
        f"server restart, {clients:,} clients x {scale.subs} subscriptions"
        + (", application over RPC" if args.rpc else ""),
        "seconds since the restart",
        {r["summary"]["name"]: r["series"] for r in results},
    )
    return {"table": md, "rows": summaries, "series": {r["summary"]["name"]: r["series"]
            for r in results}}  # fmt: skip


def run_celebrity(args: argparse.Namespace, scale: Any, progress: _Progress) -> dict[str, Any]:
    from bench.avalanche import report
    from bench.avalanche.scenarios import celebrity_specs

    clients = args.clients or scale.celebrity_clients
    results = _run_trials(celebrity_specs(scale, clients, rpc=args.rpc), args.out, progress)
    summaries = [r["summary"] for r in results]
    report.plot_timeseries(
        args.out / f"{args.name}.png",
        f"celebrity: {clients:,} clients join within 1 s"
        + (", application over RPC" if args.rpc else ""),
        "seconds since the first client started",
        {r["summary"]["name"]: r["series"] for r in results},
    )
    columns = _columns(report.CELEBRITY_COLUMNS, args.rpc)
    return {"table": report.rows_table(columns, summaries), "rows": summaries}


def _columns(columns: list[tuple[str, str]], rpc: bool) -> list[tuple[str, str]]:
    from bench.avalanche import report

    return [*columns, *report.RPC_COLUMNS] if rpc else columns


def run_subscribe(args: argparse.Namespace, scale: Any, progress: _Progress) -> dict[str, Any]:
    from bench.avalanche import report
    from bench.avalanche.scenarios import subscribe_specs

    loads = scale.subscribe_loads
    if args.clients:
        loads = (*tuple(n for n in loads if n < args.clients), args.clients)
    results = _run_trials(subscribe_specs(scale, loads), args.out, progress)
    summaries = []
    for r in results:
        s = r["summary"]
        mode, _, _n = s["name"].partition(" ")
        s["mode"] = mode
        summaries.append(s)
    report.plot_subscribe(args.out / "subscribe.png", summaries)
    return {"table": report.rows_table(report.SUBSCRIBE_COLUMNS, summaries), "rows": summaries}


def run_backoff(args: argparse.Namespace, scale: Any, progress: _Progress) -> dict[str, Any]:
    from bench.avalanche import report
    from bench.avalanche.backoff_sim import REFERENCE_100, STRATEGIES, run_all

    counts = scale.backoff_clients
    if args.clients:
        counts = tuple(sorted({*(n for n in counts if n <= args.clients), args.clients}))
    runs = args.runs or scale.backoff_runs
    update = progress.task("backoff simulation", 2 * len(STRATEGIES))
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        update("simulating", done, 2 * len(STRATEGIES))

    results = run_all(counts, runs, processes=min(2, os.cpu_count() or 1), progress=step)
    report.plot_backoff(args.out / "backoff.png", results)
    at = 100 if 100 in counts else counts[-1]
    lines = []
    summary: dict[str, Any] = {}
    for impl in ("brooker", "trio_cable"):
        rows = []
        for strategy in STRATEGIES:
            p = next(p for p in results[impl][strategy] if p.clients == at)
            ref = REFERENCE_100.get(strategy) if at == 100 else None
            rows.append([
                strategy, p.calls, p.calls_sd, ref[0] if ref else "-",
                p.time_ms / 1000, p.time_sd / 1000, ref[1] if ref else "-",
            ])  # fmt: skip
            if impl == "brooker":
                summary[strategy] = {"calls": round(p.calls, 1), "time_ms": round(p.time_ms, 1)}
            else:
                summary.setdefault("trio_cable", {})[strategy] = {
                    "calls": round(p.calls, 1), "time_ms": round(p.time_ms, 1)}  # fmt: skip
        lines.append(f"**{impl}** strategies, {at} clients, {runs} runs (mean, sd):\n")
        headers = ["strategy", "calls", "sd", "reference", "completion (s)", "sd", "reference"]
        lines.append(report.table(headers, rows))
        lines.append("")
    curves = {
        impl: {s: [[p.clients, p.calls, p.time_ms] for p in pts] for s, pts in by.items()}
        for impl, by in results.items()
    }
    return {"table": "\n".join(lines), "summary": summary, "curves": curves, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    output.check(args, quick=args.quick)
    require("matplotlib")
    if not args.quiet:
        require("rich")
    from bench.avalanche.scenarios import FULL, QUICK

    scale = QUICK if args.quick else FULL
    if args.loadgens:
        from dataclasses import replace

        scale = replace(scale, loadgens=args.loadgens)
    scenario = "restart" if args.scenario == "avalanche" else args.scenario
    if args.rpc and scenario not in ("restart", "celebrity"):
        raise output.UsageError("--rpc goes with avalanche (restart) and celebrity")
    # What the files are called: RPC results never replace the in-process ones.
    args.name = f"{scenario}-rpc" if args.rpc else scenario
    if args.rpc:
        require("uvicorn")
    args.out = output.choose(args, args.name, quick=args.quick) or output.AVALANCHE_RESULTS_DIR
    if not args.quiet:
        print(f"{scenario}: writing to {args.out}", file=sys.stderr)
    if scenario != "backoff":
        procs.pin_self()  # the orchestrator stays off the server core
    runner = {"restart": run_restart, "celebrity": run_celebrity, "subscribe": run_subscribe,
              "backoff": run_backoff}[scenario]  # fmt: skip
    with _Progress(args.quiet) as progress:
        result = runner(args, scale, progress)
    result["conditions"] = _conditions(scale)
    result["quick"] = args.quick
    result["rpc"] = args.rpc
    (args.out / f"{args.name}.json").write_text(json.dumps(_clean(result), indent=1))
    (args.out / f"{args.name}.md").write_text(result["table"] + "\n")
    print(result["table"])
    if args.json:
        compact = result.get("summary") or {"rows": result["rows"]}
        print(json.dumps(_clean({"scenario": scenario, "quick": args.quick, "rpc": args.rpc,
                                 **compact})))  # fmt: skip
    return 0
