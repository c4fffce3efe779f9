"""``python -m bench fuzz [--minutes M]``: run the campaign, write its results."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

from bench import output
from bench.deps import require

#: The length of a full campaign (shorter ones are quick: they never replace the committed one).
FULL_MINUTES = 10.0
FULL = {"minutes": FULL_MINUTES, "batch": 32}
QUICK = {"minutes": 0.12, "batch": 8}  # the smoke test's sizes


def main(argv: list[str] | None = None) -> int:
    """``python -m bench fuzz [--minutes M]``; returns 0 when the campaign found nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m bench fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, help="campaign length (default 10)")
    parser.add_argument("--no-live", action="store_true", help="skip the live-server target")
    parser.add_argument("--batch", type=int, help="hostile connections per batch (default 32)")
    parser.add_argument("--quick", action="store_true", help="a few seconds, batches of 8")
    output.add_arguments(parser)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the summary (no samples)")
    args = parser.parse_args(argv)
    quick = output.sizes(args, FULL, QUICK, "campaign")
    require("hypothesis")
    require("matplotlib")
    if not args.no_live:
        require("psutil")
    from bench.fuzz.campaign import run_campaign
    from bench.fuzz.report import markdown, plot

    json_path, md_path, png_path = output.files(output.choose(args, "fuzz", quick=quick), "fuzz")

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # run the clean-up: stop the live server

    signal.signal(signal.SIGTERM, on_term)
    summary = run_campaign(args.minutes, live=not args.no_live, progress=not args.quiet,
                           live_batch=args.batch)  # fmt: skip
    summary["quick"] = quick
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    md_path.write_text(markdown(summary))
    plot(summary, png_path)
    if not args.quiet:
        print(markdown(summary), file=sys.stderr)
        print(f"wrote {json_path}, {md_path} and {png_path}", file=sys.stderr)
    if args.json:
        brief = {k: v for k, v in summary.items() if k not in ("conditions",)}
        if brief.get("live"):
            brief["live"] = {k: v for k, v in brief["live"].items() if k != "samples"}
        print(json.dumps(brief, default=str))
    return 0 if not summary["failures"] else 1
