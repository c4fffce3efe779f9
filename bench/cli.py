"""``python -m bench``: run the comparative benchmarks, save results, write RESULTS.md.

Usage::

    python -m bench all [--quick] [--repeats 3] [--json] [--out DIR | --update-results]
    python -m bench echo --targets picows,trio_cable
    python -m bench echo --baseline main      # trio_cable of revision main side by side
    python -m bench profile --scenario echo-cable
    python -m bench scale [--sizes 1000,5000,18000] [--duration 60] [--baseline REF]
    python -m bench report [--from DIR]       # RESULTS.md and plots from saved results
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from bench import output
from bench.deps import require, require_tool
from bench.options import Options

BENCHES = ["micro", "echo", "broadcast", "wsbench", "memory", "compression", "hostile"]
#: Benchmarks run only when named (not by ``all``): scale takes minutes per size.
ALONE = ["scale"]
#: The benchmarks that run a baseline revision next to the current checkout (bench.baseline).
COMPARED = ("echo", "broadcast", "memory", "scale")
#: The optional packages of each benchmark's own process and its load generator.
_NEEDS = {
    "micro": ("websockets",),
    "echo": ("picows", "uvloop", "psutil"),
    "broadcast": ("picows", "uvloop", "psutil"),
    "wsbench": ("picows", "uvloop", "psutil"),
    "memory": ("picows", "uvloop", "psutil"),
    "compression": ("picows", "uvloop", "psutil", "websockets"),
    "hostile": ("picows", "uvloop", "psutil"),
    "profile": ("picows", "uvloop", "psutil"),
    "scale": ("picows", "uvloop", "psutil"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the benchmark command line."""
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("bench", choices=[*BENCHES, *ALONE, "all", "profile", "report"])
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats per measurement (default 3)")
    p.add_argument("--targets", default="", help="comma-separated targets (default: all); "
                   "trio_cable@REF / trio_cable-cable@REF run revision REF's server")  # fmt: skip
    p.add_argument("--baseline", "--compare-ref", action="append", default=[], metavar="REF",
                   help="run every trio_cable target of revision REF too, side by side "
                   "(echo, broadcast, memory, scale); repeatable")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.add_argument("--sizes", default="", help="scale: comma-separated connection counts "
                   "(default 1000,5000,18000; --quick: 200,600)")  # fmt: skip
    p.add_argument("--duration", type=float, default=None, help="scale: seconds of each "
                   "phase (steady, churn; default 60, --quick: 3)")  # fmt: skip
    output.add_arguments(p)
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        metavar="DIR",
        help="report: the results to read (default: the committed bench/results)",
    )
    p.add_argument("--no-report", action="store_true", help="do not write RESULTS.md")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument(
        "--scenario", action="append", help="profile scenario (repeatable): echo-raw, "
        "echo-cable, broadcast",
    )  # fmt: skip
    p.add_argument("--seconds", type=float, default=5.0, help="profile length (default 5)")
    return p


def _run_one(name: str, opts: Options, args: argparse.Namespace) -> dict[str, Any]:
    from bench.baseline import compare, describe
    from bench.conditions import conditions
    from bench.runner import log

    if name == "profile":
        from bench import profile

        result = profile.run(opts, args.scenario, args.seconds)
    else:
        result = importlib.import_module(f"bench.{name}").run(opts)
    result["quick"] = opts.quick
    result["conditions"] = conditions()
    if opts.baselines:
        result["baseline"] = compare(result)
        if opts.progress:
            for row in result["baseline"]:
                log(f"{name} baseline: {describe(row)}")
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


def _targets(args: argparse.Namespace, opts: Options, names: list[str]) -> None:
    """Resolve the baselines (``--baseline REF``, ``<target>@REF``) to prepared trees and
    check that every chosen target's packages are installed."""
    from bench import baseline, peers
    from bench.runner import log

    refs = list(args.baseline)
    for i, name in enumerate(opts.targets):
        base, ref = baseline.split(name)
        if ref is None:
            continue
        if base not in peers.TARGETS or peers.TARGETS[base].server != "trio_cable":
            raise output.UsageError(f"{name}: only trio_cable targets can run another revision")
        refs.append(ref)
        opts.targets[i] = f"{base}@{ref}"  # renamed to the short sha below
    shorts: dict[str, str] = {}
    for ref in dict.fromkeys(refs):
        prepared = baseline.prepare(ref, log=log if opts.progress else None)
        peers.add_baseline(prepared.short, prepared.tree)
        shorts[ref] = prepared.short
    opts.baselines = [shorts[ref] for ref in dict.fromkeys(args.baseline)]
    opts.targets = [
        f"{b}@{shorts[r]}" if r is not None else b for b, r in map(baseline.split, opts.targets)
    ]
    for name in names:
        default = getattr(importlib.import_module(f"bench.{name}"), "TARGETS", [])
        for target in opts.pick(list(default)):
            require(*peers.TARGETS[target].needs, purpose=f"the {target} target")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    report_only = args.bench == "report"
    if args.source is not None and not report_only:
        raise output.UsageError("--from goes with report")
    if report_only and args.update_results and args.source is not None:
        raise output.UsageError("report --update-results rewrites bench/RESULTS.md from the "
                                "committed bench/results only (no --from)")  # fmt: skip
    # A scale run with shorter phases than the full one's is quick too (never committed).
    short = args.duration is not None and args.duration < 60
    output.check(args, quick=args.quick or short, why_quick="a --quick or --duration < 60 run")
    names = BENCHES if args.bench == "all" else [] if report_only else [args.bench]
    if (args.baseline or "@" in args.targets) and not set(names) & set(COMPARED):
        raise output.UsageError(f"a baseline revision runs in {', '.join(COMPARED)} (and all)")
    for name in names:
        require(*_NEEDS.get(name, ()), purpose=f"the {name} benchmark")
    if args.bench == "profile":
        require_tool("py-spy")
    if not args.no_report:
        require("matplotlib")
    if (args.sizes or args.duration is not None) and names != ["scale"]:
        raise output.UsageError("--sizes and --duration go with scale")
    try:
        sizes = [int(n) for n in args.sizes.split(",") if n]
    except ValueError:
        raise output.UsageError(f"--sizes {args.sizes}: comma-separated integers") from None
    opts = Options(
        quick=args.quick, repeats=max(1, args.repeats),
        targets=[t for t in args.targets.split(",") if t], progress=not args.quiet,
        sizes=sizes, duration=args.duration,
    )  # fmt: skip
    _targets(args, opts, [n for n in names if n != "micro"])
    opts.write_to(output.choose(args, args.bench, quick=args.quick or short,
                                why_quick="a --quick or --duration < 60 run"))  # fmt: skip

    from bench.procs import pin_self, raise_nofile
    from bench.report import save, write

    pin_self()
    raise_nofile()
    summaries = {}
    for name in names:
        result = _run_one(name, opts, args)
        save(result, opts.results_dir)
        summaries[name] = _summary(result)
    if not args.no_report:
        source = (args.source or output.RESULTS_DIR) if report_only else opts.results_dir
        path = write(source, opts.results_md, opts.plots_dir)
        if not args.quiet:
            print(f"wrote {path}", file=sys.stderr)
    elif not args.quiet and names:
        print(f"wrote {opts.results_dir}", file=sys.stderr)
    if args.json:
        print(json.dumps(summaries, separators=(",", ":")))
    return 0
