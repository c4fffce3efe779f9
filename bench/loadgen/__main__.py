"""``python -m bench.loadgen MODE ...``: run one load, print one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Coroutine
from typing import Any

import uvloop


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen")
    p.add_argument("mode", choices=["echo", "broadcast", "wsbench", "idle"])
    p.add_argument("--url", required=True)
    p.add_argument("--dialect", choices=["raw", "cable"], default="raw")
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--conns", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--binary", action="store_true")
    p.add_argument("--duration", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--warmup-count", type=int, default=2)
    p.add_argument("--step", type=int, default=1000)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--concurrent", type=int, default=10)
    p.add_argument("--sample", type=int, default=100)
    p.add_argument("--limit-ms", type=float, default=500.0)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--compression", action="store_true", help="offer permessage-deflate")
    p.add_argument("--payload-size", type=int, default=0, help="broadcast: a JSON payload")
    p.add_argument("--interval", type=float, default=0.0,
                   help="broadcast: seconds between broadcasts (0: back to back)")  # fmt: skip
    return p


def _job(a: argparse.Namespace) -> Coroutine[Any, Any, dict[str, Any]]:
    if a.mode == "echo":
        from bench.loadgen.echo import run_echo

        return run_echo(
            a.url, a.dialect, a.conns, a.size, a.binary, a.duration, a.warmup, a.server_pid
        )
    if a.mode == "broadcast":
        from bench.loadgen.fanout import run_broadcast

        return run_broadcast(
            a.url, a.dialect, a.conns, a.count, a.warmup_count, a.duration, a.server_pid,
            compression=a.compression, payload_size=a.payload_size, interval=a.interval,
        )  # fmt: skip
    if a.mode == "wsbench":
        from bench.loadgen.wsbench import run_wsbench

        return run_wsbench(a.url, a.step, a.steps, a.concurrent, a.sample, a.limit_ms, a.server_pid)
    from bench.loadgen.idle import run_idle

    return run_idle(a.url, a.dialect, a.conns, a.settle, a.server_pid, a.compression)


def main(argv: list[str] | None = None) -> int:
    # Pinned to the client core, open-file limit raised: by bench.procs, before exec.
    args = _parser().parse_args(argv)
    result = uvloop.run(_job(args))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
