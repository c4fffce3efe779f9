"""Bench: how much one hostile connection delays everybody else's broadcasts (issue 14).

N subscribers (100 and 1,000; the load generator's picows clients on BenchmarkChannel) get a
steady feed of broadcasts, one every 50 ms, each timed from the trigger's send to every
recipient's receipt (p50 / p99 / max).  Meanwhile one attacker connection sends the worst
frames of issue 14 item 2 at the server's per-connection command rate (100 a second, the
default ``--command-rate``): 1 MiB msgpack frames of a million empty arrays (flat, or nested
one level per byte), 1 MiB of JSON ``[`` (nesting, or inside a string).  A frame the server
refuses closes the attacker's connection (``1008``), and the attacker reconnects at once to
keep its rate, as a real one would.  The same feed without an attacker, on the same server in
the same repeat, is the reference; the *added* delay is the difference, per repeat.

The server runs with every limit at its default (``--benchmark-channel`` added, logs at
warning), pinned to the server core; the load generator and the attacker share the client
core.  Issue 14 asks: delay added by the attacker <= 100 ms.

The attacker is this module run as a program (``python -m bench.hostile attack --port P
--shape S --rate R``): it prints its counts as one JSON line when it gets SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from typing import Any

from bench import procs
from bench.fuzz import shapes
from bench.options import Options
from bench.runner import log, rotate
from bench.stats import summarize

SIZES = [100, 1000]
QUICK_SIZES = [100]
NONE = "none"
ATTACKS = [NONE, "msgpack-arrays", "msgpack-nested", "json-bracket-depth", "json-bracket-string"]
QUICK_ATTACKS = [NONE, "msgpack-arrays", "json-bracket-string"]
#: Frames per second the attacker sends: the server's default ``--command-rate``.
RATE = 100.0
#: Seconds between broadcasts (well within the trigger's own command rate).
INTERVAL = 0.05
COUNT, QUICK_COUNT = 100, 20
#: Seconds the attacker runs before the feed starts (its first connections and frames).
SETTLE = 1.0
#: Issue 14's bound on the delay one attacker may add to other clients' broadcasts.
LIMIT_MS = 100.0
SERVER_FLAGS = ["--benchmark-channel", "--log-level", "warning"]


def run(opts: Options) -> dict[str, Any]:
    """Every size x attack x repeat; a fresh server per size and repeat, the attacks (and
    the reference without one) on it in rotated order."""
    sizes = QUICK_SIZES if opts.quick else SIZES
    attacks = QUICK_ATTACKS if opts.quick else ATTACKS
    repeats = 1 if opts.quick else opts.repeats
    count = QUICK_COUNT if opts.quick else COUNT
    samples: list[dict[str, Any]] = []
    for rep in range(repeats):
        for conns in sizes:
            port = procs.free_port()
            cmd = procs.python("trio_cable", "serve", "--host", procs.HOST, "--port", str(port),
                               *SERVER_FLAGS)  # fmt: skip
            with procs.start(cmd, name="trio_cable", port=port, core=procs.cores()[0],
                             nofile=True) as server:  # fmt: skip
                for attack in rotate(attacks, rep):
                    sample = measure(server, conns, attack, count)
                    sample["repeat"] = rep
                    samples.append(sample)
                    if opts.progress:
                        a = sample["attacker"]
                        log(
                            f"hostile {conns:>5}c {attack:20} p50 {sample['p50_ms']:6.1f} ms "
                            f"p99 {sample['p99_ms']:6.1f} ms max {sample['max_ms']:6.1f} ms "
                            f"missed {sample['missed']}"
                            + (f"; attacker {a['frames']} frames ({a['rate']:.0f}/s), "
                               f"{a['connections']} connections" if a else "")
                        )  # fmt: skip
    rows = aggregate(samples)
    return {
        "bench": "hostile", "rate": RATE, "interval_s": INTERVAL, "count": count,
        "limit_ms": LIMIT_MS, "server_flags": SERVER_FLAGS,
        "holds": all(r["added_max_ms"]["median"] <= LIMIT_MS for r in rows if r["attack"] != NONE),
        "rows": rows, "samples": samples,
    }  # fmt: skip


def measure(server: procs.Proc, conns: int, attack: str, count: int) -> dict[str, Any]:
    """One feed of *count* broadcasts to *conns* subscribers, with *attack* running."""
    attacker = None
    if attack != NONE:
        attacker = procs.start(
            procs.python("bench.hostile", "attack", "--port", str(server.port), "--shape", attack,
                         "--rate", str(RATE)),
            name="attacker", core=procs.cores()[1], stdout=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(SETTLE)
    try:
        result = procs.run_loadgen(
            [
                "broadcast", "--url", f"ws://{procs.HOST}:{server.port}/cable",
                "--dialect", "cable", "--server-pid", str(server.pid), "--conns", str(conns),
                "--count", str(count), "--warmup-count", "2", "--duration", "0",
                "--interval", str(INTERVAL),
            ],
            timeout=120 + conns / 20,
        )  # fmt: skip
    finally:
        stats = None
        if attacker is not None:
            attacker.stop(timeout=10)
            assert attacker.popen.stdout is not None
            lines = attacker.popen.stdout.read().decode().splitlines()
            stats = json.loads(lines[-1]) if lines else {"error": "no report"}
    time.sleep(0.5)  # the load generator's connections close
    keep = ("p50_ms", "p95_ms", "p99_ms", "max_ms", "samples", "broadcasts", "delivered",
            "missed", "seconds", "server_cpu_s")  # fmt: skip
    return {"conns": conns, "attack": attack, **{k: result.get(k) for k in keep},
            "attacker": stats}  # fmt: skip


def aggregate(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (size, attack): medians (min-max) over the repeats, and the delay added
    to the reference of the same server and repeat."""
    rows = []
    for conns, attack in dict.fromkeys((s["conns"], s["attack"]) for s in samples):
        mine = [s for s in samples if s["conns"] == conns and s["attack"] == attack]
        row: dict[str, Any] = {"conns": conns, "attack": attack,
                               "missed": sum(s["missed"] or 0 for s in mine)}  # fmt: skip
        for key in ("p50_ms", "p99_ms", "max_ms", "server_cpu_s"):
            row[key] = summarize(s[key] for s in mine)
        if attack != NONE:
            for key in ("p50_ms", "p99_ms", "max_ms"):
                added = []
                for s in mine:
                    ref = next(r for r in samples if r["conns"] == conns and r["attack"] == NONE
                               and r["repeat"] == s["repeat"])  # fmt: skip
                    added.append(s[key] - ref[key])
                row[f"added_{key}"] = summarize(added)
            row["frames_per_s"] = summarize(s["attacker"]["rate"] for s in mine)
            row["attacker_closes"] = sum((Counter(s["attacker"]["closes"]) for s in mine),
                                         Counter())  # fmt: skip
        rows.append(row)
    return rows


# -- the attacker (a child process) ---------------------------------------------------------------

_MASK = b"\x5a\x11\xc3\x7e"


def _frame(shape: str) -> tuple[bytes, str]:
    """The masked frame of *shape*, built once (any mask will do), and its subprotocol."""
    try:
        from trio_cable import _speedups as kernels
    except ImportError:  # the pure twin: slower to build, the same bytes
        from trio_cable import _speedups_py as kernels  # type: ignore[no-redef]
    build, opcode, subprotocol = shapes.AMPLIFIERS[shape]
    return bytes(kernels.build_frame(opcode, build(), True, _MASK)), subprotocol


async def attack(port: int, shape: str, rate: float) -> dict[str, Any]:
    """Send *shape* frames at *rate* per second on one connection at a time, reconnecting
    whenever the server closes it, until SIGTERM; return the counts."""
    import signal

    import trio

    from bench import wsraw

    frame, subprotocol = _frame(shape)
    stats: dict[str, Any] = {"shape": shape, "frames": 0, "connections": 0, "refused": 0,
                             "broken_sends": 0, "closes": Counter()}  # fmt: skip
    started: list[float] = []  # when the first frame went out

    async def connection(ws: wsraw.RawWS, due: list[float]) -> None:
        async def reader() -> None:
            try:
                while await ws.recv() is not None:
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            stats["closes"][str(ws.close_code)] += 1
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            while True:
                await trio.sleep_until(due[0])
                # On schedule, without bursts to catch up on time spent reconnecting.
                due[0] = max(due[0] + 1 / rate, trio.current_time() - 1 / rate)
                try:
                    await ws.stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    stats["broken_sends"] += 1
                    break
                stats["frames"] += 1
                if not started:
                    started.append(trio.current_time())
            nursery.cancel_scope.cancel()
        await ws.aclose()

    async def attacker() -> None:
        due = [trio.current_time()]
        while True:
            try:
                ws = await wsraw.connect(procs.HOST, port, subprotocols=[subprotocol])
            except wsraw.HandshakeRefused:
                stats["refused"] += 1  # admission control (503): try again shortly
                await trio.sleep(0.05)
                continue
            except OSError:
                await trio.sleep(0.05)
                continue
            stats["connections"] += 1
            with trio.move_on_after(5):
                await ws.expect(lambda m: m.get("type") == "welcome")
            await connection(ws, due)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attacker)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
    seconds = trio.current_time() - started[0] if started else 0.0
    stats["seconds"] = round(seconds, 2)
    stats["rate"] = stats["frames"] / seconds if seconds else 0.0
    return stats


def attack_main(argv: list[str]) -> int:
    """``python -m bench.hostile attack --port P --shape S [--rate R]``."""
    import trio

    parser = argparse.ArgumentParser(prog="python -m bench.hostile")
    parser.add_argument("mode", choices=["attack"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--shape", choices=sorted(shapes.AMPLIFIERS), required=True)
    parser.add_argument("--rate", type=float, default=RATE)
    args = parser.parse_args(argv)
    stats = trio.run(attack, args.port, args.shape, args.rate)
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(attack_main(sys.argv[1:]))
