"""Processes: start a server pinned to one core, run the load generator pinned to another.

The server and the load generator are separate processes.  With two or more cores the
server gets core 0 and the load generator (and this orchestrator) the last core, so the
client never competes with the server for CPU time.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.peers import server_command

HOST = "127.0.0.1"
_READY_TIMEOUT = 20.0
_LOADGEN_GRACE = 60.0


# The cores this process may use before it pins itself (the children inherit the mask).
_AVAILABLE = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def cores() -> tuple[set[int] | None, set[int] | None]:
    """(server cores, client cores), or ``(None, None)`` when pinning is unavailable."""
    available = _AVAILABLE
    if len(available) < 2:
        return None, None
    return {available[0]}, {available[-1]}


def pin_self() -> None:
    """Pin the calling process to the client core (the orchestrator and load generators)."""
    _server, client = cores()
    if client is not None:
        os.sched_setaffinity(0, client)


def raise_nofile(wanted: int = 65536) -> int:
    """Raise the open-files soft limit as far as the hard limit allows; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_port() -> int:
    """A TCP port on the loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _preexec_server() -> None:
    server, _client = cores()
    if server is not None:
        os.sched_setaffinity(0, server)
    raise_nofile()


@dataclass
class ServerProc:
    """A running benchmark server: its name, port, process and ``psutil`` handle."""

    name: str
    port: int
    popen: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within a few seconds."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)

    def __enter__(self) -> ServerProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_port(port: int, popen: subprocess.Popen[bytes], timeout: float = _READY_TIMEOUT) -> None:
    """Block until something accepts on *port*, or raise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"server exited early with code {popen.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout} s")


def start_server(name: str, *, ping_interval: float | None = None) -> ServerProc:
    """Start server *name* (see :mod:`bench.peers`) on a free port, pinned to the server core."""
    port = free_port()
    cmd = server_command(name, HOST, port, ping_interval=ping_interval)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    popen = subprocess.Popen(cmd, preexec_fn=_preexec_server, env=env, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, popen)
    except BaseException:
        popen.kill()
        popen.wait()
        raise
    time.sleep(0.2)  # let the first connection probe settle
    return ServerProc(name, port, popen)


def run_loadgen(args: Sequence[str], *, timeout: float) -> dict[str, Any]:
    """Run ``python -m bench.loadgen ARGS`` and return the JSON it prints last."""
    cmd = [sys.executable, "-m", "bench.loadgen", *args]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout + _LOADGEN_GRACE, check=False)
    lines = [ln for ln in proc.stdout.decode().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.decode()[-2000:]
        raise RuntimeError(f"load generator failed ({proc.returncode}): {err}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result
