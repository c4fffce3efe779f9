"""Bench 5: server memory per idle connection (RSS delta / connections).

Each connection is subscribed to one stream: trio_cable clients subscribe to
BenchmarkChannel (stream ``all1``); the peers' equivalent is their set of connections that a
broadcast goes to.  A fresh server per measurement, since RSS does not shrink.
"""

from __future__ import annotations

from typing import Any

from bench.options import Options
from bench.runner import load, log, rotate, serving
from bench.stats import summarize

TARGETS = ["picows", "aiohttp", "websockets", "trio-raw", "trio-websocket", "trio_cable-cable"]
SIZES = [1000, 10000]
QUICK_SIZES = [200]


def run(opts: Options) -> dict[str, Any]:
    """All targets x sizes x repeats; bytes per connection median and min-max."""
    targets = opts.pick(TARGETS)
    sizes = QUICK_SIZES if opts.quick else SIZES
    repeats = 1 if opts.quick else opts.repeats
    settle = 0.3 if opts.quick else 1.5
    samples: list[dict[str, Any]] = []
    for rep in range(repeats):
        for target in rotate(targets, rep):
            for conns in sizes:
                with serving(target) as (spec, server):
                    r = load(
                        "idle", spec, server, timeout=60 + conns / 50, conns=conns, settle=settle
                    )
                r.update(target=target, repeat=rep)
                samples.append(r)
                if opts.progress:
                    log(
                        f"memory {target:17} {conns:>6}c {r['bytes_per_conn'] / 1024:7.1f} KiB/conn"
                    )
    rows = []
    for conns in sizes:
        for target in targets:
            mine = [s for s in samples if s["conns"] == conns and s["target"] == target]
            if mine:
                rows.append({
                    "target": target, "conns": conns,
                    "bytes_per_conn": summarize(s["bytes_per_conn"] for s in mine),
                    "rss_after": summarize(s["rss_after"] for s in mine),
                })  # fmt: skip
    return {"bench": "memory", "rows": rows, "samples": samples}
