"""Bench: permessage-deflate, what it saves and what it costs.

For a realistic JSON broadcast (a feed of chat-like records, a few KB), at 1k and 10k
connections: payload bytes on the wire per recipient, server CPU per recipient and idle
memory per connection, with and without compression, side by side in the same run with
websockets' own permessage-deflate (a compressor per connection, as it ships).

trio_cable compresses a broadcast once per audience group (``server_no_context_takeover``)
and keeps no zlib state per connection; websockets compresses per recipient with a context
per connection.  The clients (picows) offer what Chromium offers and inflate what comes.
"""

from __future__ import annotations

from typing import Any

from bench.options import Options
from bench.runner import load, log, rotate, serving
from bench.stats import ratio, summarize

TARGETS = ["trio_cable-cable", "trio_cable-deflate", "websockets", "websockets-deflate"]
SIZES = [1000, 10000]
QUICK_SIZES = [200]
PAYLOAD = 3000  # bytes of JSON in each broadcast
#: Each compressing target and the same server without compression.
PAIRS = {"trio_cable-deflate": "trio_cable-cable", "websockets-deflate": "websockets"}


def run(opts: Options) -> dict[str, Any]:
    """All targets x sizes x repeats: a broadcast run and an idle-memory run each, a fresh
    server for each (RSS does not shrink)."""
    targets = opts.pick(TARGETS)
    sizes = QUICK_SIZES if opts.quick else SIZES
    repeats = 1 if opts.quick else opts.repeats
    count, min_seconds = (3, 0.2) if opts.quick else (5, 2.0)
    settle = 0.3 if opts.quick else 1.5
    samples: list[dict[str, Any]] = []
    for rep in range(repeats):
        for target in rotate(targets, rep):
            for conns in sizes:
                with serving(target) as (spec, server):
                    b = load(
                        "broadcast", spec, server, timeout=120 + conns / 20,
                        conns=conns, count=count, warmup_count=2, duration=min_seconds,
                        payload_size=PAYLOAD,
                    )  # fmt: skip
                with serving(target) as (spec, server):
                    m = load(
                        "idle", spec, server, timeout=60 + conns / 50, conns=conns, settle=settle
                    )
                sample = {
                    "target": target, "conns": conns, "repeat": rep,
                    "cpu_us": b["server_cpu_us_per_recipient"],
                    "wire_bytes": b["wire_bytes_per_recipient"],
                    "frame_bytes": b["frame_bytes"],
                    "p50_ms": b["p50_ms"], "p99_ms": b["p99_ms"], "missed": b["missed"],
                    "bytes_per_conn": m["bytes_per_conn"],
                }  # fmt: skip
                samples.append(sample)
                if opts.progress:
                    log(
                        f"compression {target:19} {conns:>6}c "
                        f"{sample['cpu_us'] or 0:7.2f} us/recipient "
                        f"{sample['wire_bytes'] or 0:7.0f} B/recipient "
                        f"{sample['bytes_per_conn'] / 1024:6.1f} KiB/conn "
                        f"p99 {sample['p99_ms']:.1f} ms missed {sample['missed']}"
                    )
    return {"bench": "compression", "payload_bytes": PAYLOAD, "rows": aggregate(samples),
            "samples": samples}  # fmt: skip


def aggregate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (target, size), with ratios to the same server uncompressed."""
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for target, conns in dict.fromkeys((s["target"], s["conns"]) for s in samples):
        mine = [s for s in samples if s["target"] == target and s["conns"] == conns]
        rows[(target, conns)] = {
            "target": target, "conns": conns,
            "cpu_us": summarize(s["cpu_us"] for s in mine),
            "wire_bytes": summarize(s["wire_bytes"] for s in mine),
            "bytes_per_conn": summarize(s["bytes_per_conn"] for s in mine),
            "p99_ms": summarize(s["p99_ms"] for s in mine),
            "frame_bytes": mine[0]["frame_bytes"],
            "missed": sum(s["missed"] for s in mine),
        }  # fmt: skip
    for (target, conns), row in rows.items():
        plain = rows.get((PAIRS.get(target, ""), conns))
        for key in ("cpu_us", "wire_bytes", "bytes_per_conn"):
            base = plain[key]["median"] if plain else None
            row[f"{key}_vs_plain"] = ratio(row[key]["median"], base)
    return list(rows.values())
