"""``python -m bench`` / ``trio-cable bench``: run benchmarks, save results, write RESULTS.md.

Usage::

    python -m bench all [--quick] [--repeats 3] [--json]
    python -m bench echo --targets picows,trio_cable
    python -m bench profile --scenario echo-cable
    python -m bench report          # RESULTS.md and plots from the saved results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.options import PLOTS_DIR, RESULTS_DIR, Options

BENCHES = ["micro", "echo", "broadcast", "wsbench", "memory"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the benchmark command line."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("bench", choices=[*BENCHES, "all", "profile", "report"])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement (default 3)")
    p.add_argument("--targets", default="", help="comma-separated targets (default: all)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-report", action="store_true", help="do not rewrite RESULTS.md")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--scenario", action="append", help="profile scenario (repeatable): echo-raw, "
        "echo-cable, broadcast",
    )  # fmt: skip
    p.add_argument("--seconds", type=float, default=5.0, help="profile length (default 5)")
    return p


def _run_one(name: str, opts: Options, args: argparse.Namespace) -> dict[str, Any]:
    import importlib

    from bench.conditions import conditions

    if name == "profile":
        from bench import profile

        result = profile.run(opts, args.scenario, args.seconds)
    else:
        result = importlib.import_module(f"bench.{name}").run(opts)
    result["quick"] = opts.quick
    result["conditions"] = conditions()
    return result


def _medians(value: Any) -> Any:
    """Replace every ``{median, min, max, n}`` dict in *value* by its median."""
    if isinstance(value, dict):
        if "median" in value and "n" in value:
            return value["median"]
        return {k: _medians(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_medians(v) for v in value]
    return value


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """The compact part of a result for ``--json``: medians, no raw samples."""
    keep = {k: v for k, v in result.items() if k not in ("samples", "runs", "conditions")}
    return dict(_medians(keep))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    from bench.procs import pin_self, raise_nofile
    from bench.report import RESULTS_MD, save, write

    opts = Options(
        quick=args.quick,
        repeats=max(1, args.repeats),
        targets=[t for t in args.targets.split(",") if t],
        results_dir=args.results_dir,
        plots_dir=PLOTS_DIR if args.results_dir == RESULTS_DIR else args.results_dir / "plots",
        progress=not args.quiet,
    )
    pin_self()
    raise_nofile()
    names = BENCHES if args.bench == "all" else [] if args.bench == "report" else [args.bench]
    summaries = {}
    for name in names:
        result = _run_one(name, opts, args)
        save(result, opts.results_dir)
        summaries[name] = _summary(result)
    if not args.no_report:
        out = RESULTS_MD if opts.results_dir == RESULTS_DIR else opts.results_dir / "RESULTS.md"
        path = write(opts.results_dir, out, opts.plots_dir)
        if not args.quiet:
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(summaries, separators=(",", ":")))
    return 0
