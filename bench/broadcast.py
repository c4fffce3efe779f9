"""Bench 3: broadcast fan-out to 1k / 4k / 10k connections.

Server CPU per recipient, delivered messages per second, p50 / p99 latency.  Peers are
asked with a ``!b`` text message and broadcast it (98 B) to every connection; trio_cable
through BenchmarkChannel's ``broadcast`` action (the frame each recipient gets is the Action
Cable data message, about 120 B).  Broadcasts go one after another, each until every
recipient has it.
"""

from __future__ import annotations

from typing import Any

from bench.options import Options
from bench.runner import load, log, rotate, serving
from bench.stats import ratio, summarize

TARGETS = ["picows", "aiohttp", "websockets", "trio-raw", "trio-websocket", "trio_cable-cable"]
SIZES = [1000, 4000, 10000]
QUICK_SIZES = [200]


def run(opts: Options) -> dict[str, Any]:
    """All targets x sizes x repeats, a fresh server per target and repeat."""
    targets = opts.pick(TARGETS)
    sizes = QUICK_SIZES if opts.quick else SIZES
    repeats = 1 if opts.quick else opts.repeats
    count, min_seconds = (3, 0.2) if opts.quick else (5, 2.0)
    samples: list[dict[str, Any]] = []
    for rep in range(repeats):
        for target in rotate(targets, rep):
            with serving(target) as (spec, server):
                for conns in sizes:
                    r = load(
                        "broadcast", spec, server, timeout=120 + conns / 50,
                        conns=conns, count=count, warmup_count=2, duration=min_seconds,
                    )  # fmt: skip
                    r.update(target=target, repeat=rep)
                    samples.append(r)
                    if opts.progress:
                        log(
                            f"broadcast {target:17} {conns:>6}c "
                            f"{r['server_cpu_us_per_recipient'] or 0:7.2f} us/recipient "
                            f"{r['delivered_per_s']:>9.0f} msg/s p50 {r['p50_ms']:.1f} ms "
                            f"p99 {r['p99_ms']:.1f} ms missed {r['missed']}"
                        )
    return {"bench": "broadcast", "rows": aggregate(samples, targets), "samples": samples}


def aggregate(samples: list[dict[str, Any]], targets: list[str]) -> list[dict[str, Any]]:
    """One row per (target, size); the CPU ratio to picows at the same size."""
    rows = []
    for conns in sorted({s["conns"] for s in samples}):
        per_target = {}
        for target in targets:
            mine = [s for s in samples if s["conns"] == conns and s["target"] == target]
            if not mine:
                continue
            per_target[target] = {
                "target": target, "conns": conns,
                "cpu_us": summarize(s["server_cpu_us_per_recipient"] for s in mine),
                "delivered_per_s": summarize(s["delivered_per_s"] for s in mine),
                "p50_ms": summarize(s["p50_ms"] for s in mine),
                "p99_ms": summarize(s["p99_ms"] for s in mine),
                "frame_bytes": mine[0]["frame_bytes"],
                "missed": sum(s["missed"] for s in mine),
            }  # fmt: skip
        picows = per_target.get("picows", {}).get("cpu_us", {}).get("median")
        for row in per_target.values():
            row["vs_picows"] = ratio(row["cpu_us"]["median"], picows)
            rows.append(row)
    return rows
