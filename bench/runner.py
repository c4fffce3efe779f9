"""Drive a server and the load generator: one helper for every load benchmark."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench.peers import TARGETS, Target
from bench.procs import ServerProc, run_loadgen, start_server


def log(message: str) -> None:
    """Progress on stderr (stdout is kept for ``--json``)."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def serving(
    target: str, *, ping_interval: float | None = None
) -> Iterator[tuple[Target, ServerProc]]:
    """Start the server of *target*; stop it afterwards."""
    spec = TARGETS[target]
    with start_server(spec.server, ping_interval=ping_interval) as server:
        yield spec, server


def load(
    mode: str, spec: Target, server: ServerProc, *, timeout: float, **params: Any
) -> dict[str, Any]:
    """Run the load generator in *mode* against *server*; ``params`` become ``--flags``."""
    args = [
        mode,
        "--url", f"ws://127.0.0.1:{server.port}{spec.path}",
        "--dialect", spec.dialect,
        "--server-pid", str(server.pid),
    ]  # fmt: skip
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return run_loadgen(args, timeout=timeout)


def rotate(items: list[str], k: int) -> list[str]:
    """*items* rotated by *k*: each repeat starts with a different target, against drift."""
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]
