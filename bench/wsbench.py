"""Bench 4: websocket-bench style broadcast run against trio_cable in Action Cable mode.

Like ``websocket-bench broadcast --server-type actioncable``: clients subscribe to
BenchmarkChannel and are added ``step`` at a time; at each step ``concurrent`` broadcasts are
kept in flight, each from a random client, ``sample`` in all; a broadcast's RTT is the time
until its sender gets ``broadcastResult`` (websocket-bench's definition).  The run stops once
a step's p95 RTT exceeds 500 ms or a delivery is missing.  Besides, a tenth of the clients
time every delivery (the whole fan-out's latency), reported as *delivery* percentiles with
the client count where their p95 stayed under the limit.  Pings stay at the server default
(every 3 s), as in production.
"""

from __future__ import annotations

from typing import Any

from bench.options import Options
from bench.runner import load, log, serving
from bench.stats import summarize

LIMIT_MS = 500.0


def run(opts: Options) -> dict[str, Any]:
    """``repeats`` stepped runs; clients reached median and min-max, and every step."""
    step, steps, concurrent, sample = (100, 3, 5, 20) if opts.quick else (1000, 10, 10, 100)
    repeats = 1 if opts.quick else opts.repeats
    runs = []
    for rep in range(repeats):
        with serving("trio_cable-cable", ping_interval=3.0) as (spec, server):
            r = load(
                "wsbench", spec, server, timeout=120 + step * steps / 20,
                step=step, steps=steps, concurrent=concurrent, sample=sample, limit_ms=LIMIT_MS,
            )  # fmt: skip
        r["repeat"] = rep
        runs.append(r)
        if opts.progress:
            for row in r["steps"]:
                log(
                    f"wsbench run {rep} {row['clients']:>6} clients p95 {row['p95_ms']:.1f} ms "
                    f"delivery p95 {row['delivery_p95_ms'] or 0:.1f} ms "
                    f"cpu {row['server_cpu_us_per_recipient'] or 0:.2f} us/recipient"
                )
    by_clients: dict[int, list[dict[str, Any]]] = {}
    for r in runs:
        for row in r["steps"]:
            by_clients.setdefault(row["clients"], []).append(row)
    rows = [
        {
            "clients": clients,
            "runs": len(group),
            "p50_ms": summarize(g["p50_ms"] for g in group),
            "p95_ms": summarize(g["p95_ms"] for g in group),
            "p99_ms": summarize(g["p99_ms"] for g in group),
            "delivery_p50_ms": summarize(g["delivery_p50_ms"] for g in group),
            "delivery_p95_ms": summarize(g["delivery_p95_ms"] for g in group),
            "cpu_us": summarize(g["server_cpu_us_per_recipient"] for g in group),
            "server_util": summarize(g["server_cpu_util"] for g in group),
        }
        for clients, group in sorted(by_clients.items())
    ]
    return {
        "bench": "wsbench",
        "params": {"step": step, "steps": steps, "concurrent": concurrent, "sample": sample,
                   "limit_ms": LIMIT_MS},
        "clients_reached": summarize(r["clients_reached"] for r in runs),
        "clients_reached_delivery": summarize(r["clients_reached_delivery"] for r in runs),
        "rows": rows,
        "runs": runs,
    }  # fmt: skip
