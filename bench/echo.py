"""Bench 2: echo round trips per second and server CPU per round trip.

1 and 100 connections, 64 B and 16 KiB, text and binary, each connection keeping one
message in flight.  trio_cable runs twice: its raw ``/echo`` endpoint and Action Cable
(``BenchmarkChannel`` ``echo`` action, text only; *size* is the action's payload string).
"""

from __future__ import annotations

from typing import Any

from bench.options import Options
from bench.runner import load, log, rotate, serving
from bench.stats import ratio, summarize

TARGETS = [
    "picows", "aiohttp", "websockets", "trio-raw", "trio-websocket", "trio_cable",
    "trio_cable-cable",
]  # fmt: skip
CONFIGS = [
    (conns, size, binary) for conns in (100, 1) for size in (64, 16384) for binary in (False, True)
]
QUICK_CONFIGS = [(100, 64, False), (1, 16384, True)]
BASELINES = ("picows", "websockets")


def run(opts: Options) -> dict[str, Any]:
    """All targets x configs x repeats; medians, min-max and ratios to the baselines."""
    targets = opts.pick(TARGETS)
    configs = QUICK_CONFIGS if opts.quick else CONFIGS
    repeats = 1 if opts.quick else opts.repeats
    duration, warmup = (0.5, 0.2) if opts.quick else (2.0, 0.5)
    samples: list[dict[str, Any]] = []
    for rep in range(repeats):
        for target in rotate(targets, rep):
            with serving(target) as (spec, server):
                for conns, size, binary in configs:
                    if binary and spec.dialect == "cable":
                        continue
                    r = load(
                        "echo", spec, server, timeout=30 + duration,
                        conns=conns, size=size, binary=binary, duration=duration, warmup=warmup,
                    )  # fmt: skip
                    r.update(target=target, repeat=rep)
                    samples.append(r)
                    if opts.progress:
                        log(
                            f"echo {target:17} {conns:>3}c {size:>5}B "
                            f"{'bin ' if binary else 'text'} {r['rps']:>9.0f} rt/s "
                            f"{r['server_cpu_us_per_rt'] or 0:7.1f} us/rt"
                        )
    return {"bench": "echo", "rows": aggregate(samples, targets), "samples": samples}


def aggregate(samples: list[dict[str, Any]], targets: list[str]) -> list[dict[str, Any]]:
    """One row per (target, config): medians with min-max, ratios to picows and websockets."""
    keys = sorted({(s["conns"], s["size"], s["binary"]) for s in samples}, reverse=True)
    rows = []
    for conns, size, binary in keys:
        group = [
            s for s in samples if (s["conns"], s["size"], s["binary"]) == (conns, size, binary)
        ]
        cpu_median: dict[str, float | None] = {}
        for target in targets:
            mine = [s for s in group if s["target"] == target]
            if not mine:
                continue
            cpu = summarize(s["server_cpu_us_per_rt"] for s in mine)
            cpu_median[target] = cpu["median"]
            rows.append({
                "target": target, "conns": conns, "size": size, "binary": binary,
                "rps": summarize(s["rps"] for s in mine),
                "cpu_us": cpu,
                "server_util": summarize(s["server_cpu_util"] for s in mine),
                "bad_replies": sum(s["bad_replies"] for s in mine),
            })  # fmt: skip
        for row in rows:
            if (row["conns"], row["size"], row["binary"]) == (conns, size, binary):
                for base in BASELINES:
                    row[f"vs_{base}"] = ratio(row["cpu_us"]["median"], cpu_median.get(base))
    return rows
