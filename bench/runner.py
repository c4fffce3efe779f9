"""Drive a server and the load generator: one helper for every load benchmark."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bench import procs
from bench.peers import TARGETS, Target, server_command


def log(message: str) -> None:
    """Progress on stderr (stdout is kept for ``--json``)."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def serving(
    target: str, *, ping_interval: float | None = None
) -> Iterator[tuple[Target, procs.Proc]]:
    """Start the server of *target* on a free port, pinned to the server core; stop it
    afterwards.  A baseline target's server runs from its own tree."""
    spec = TARGETS[target]
    port = procs.free_port()
    cmd = server_command(
        spec.server, procs.HOST, port, ping_interval=ping_interval, compression=spec.compression
    )
    tree = spec.tree
    with procs.start(
        cmd, name=target, port=port, core=procs.cores()[0], nofile=True,
        cwd=tree or procs.ROOT, pythonpath=[tree] if tree else (),
    ) as server:  # fmt: skip
        time.sleep(0.2)  # let the first connection probe settle
        yield spec, server


def load(
    mode: str, spec: Target, server: procs.Proc, *, timeout: float, **params: Any
) -> dict[str, Any]:
    """Run the load generator in *mode* against *server*; ``params`` become ``--flags``."""
    args = [
        mode,
        "--url", f"ws://127.0.0.1:{server.port}{spec.path}",
        "--dialect", spec.dialect,
        "--server-pid", str(server.pid),
    ]  # fmt: skip
    if spec.compression:
        args.append("--compression")
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False and value is not None:
            args += [flag, str(value)]
    return procs.run_loadgen(args, timeout=timeout)


def rotate(items: list[str], k: int) -> list[str]:
    """*items* rotated by *k*: each repeat starts with a different target, against drift."""
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]
