"""Processes of every harness: cores, pinning, open-file limit, ports, start, wait, stop.

Every harness of bench/ (the comparative suite, avalanche, rollout, soak, fuzz) starts its
servers, load generators and helpers through this module, so that they all pin the same
way and clean up the same way:

- **Cores.** With two or more cores the server gets the first one and the load generators
  (and the orchestrator) the last one, so the client never competes with the server for
  CPU time.  :func:`cores` says which; with fewer than two, nothing is pinned.
- **Pinning and the open-file limit** of a child are set between ``fork`` and ``exec``
  (``core=`` and ``nofile=True`` of :func:`start` and :func:`open_trio`): the child never
  runs a line of its own code on the wrong core, and needs no pinning code of its own.
- **Environment.** Children run from the repository root with it on ``PYTHONPATH``
  (``python -m bench`` is a checkout-only suite, not installed), unbuffered; a
  baseline tree (``pythonpath=`` and ``cwd=``, see :mod:`bench.baseline`) goes first.
- **Ready and stop.** :func:`start` waits until the child listens on its port (or died);
  :meth:`Proc.stop` sends SIGTERM, then SIGKILL after a timeout.
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
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import trio
    from trio.abc import ReceiveStream

HOST = "127.0.0.1"
#: The repository root: the working directory and first ``PYTHONPATH`` entry of children.
ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 20.0
_LOADGEN_GRACE = 60.0
_NOFILE_CAP = 1 << 20

# The cores this process may use before it pins itself (the children inherit the mask).
_AVAILABLE = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []

Output = int | IO[Any] | None


def cores() -> tuple[int | None, int | None]:
    """(server core, client core): the first and last available core, or ``(None, None)``
    when there are fewer than two (then nothing is pinned)."""
    if len(_AVAILABLE) < 2:
        return None, None
    return _AVAILABLE[0], _AVAILABLE[-1]


def pin(core: int | None) -> None:
    """Pin the calling process to *core* (no-op for ``None`` or without affinity support)."""
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})


def pin_self() -> None:
    """Pin the calling process to the client core (the orchestrator and load generators)."""
    pin(cores()[1])


def raise_nofile(wanted: int | None = None) -> int:
    """Raise the open-files soft limit to *wanted* (default: the hard limit, capped at 2**20)
    as far as the hard limit allows; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = _NOFILE_CAP if hard == resource.RLIM_INFINITY else hard
    target = min(ceiling, wanted if wanted is not None else ceiling)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def free_port() -> int:
    """A TCP port on the loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_port(
    port: int, popen: subprocess.Popen[bytes] | None = None, timeout: float = READY_TIMEOUT
) -> None:
    """Block until something accepts on *port*; raise if *popen* exits first or on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None and popen.poll() is not None:
            raise RuntimeError(f"process exited early with code {popen.returncode}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout} s")


def listen_socket(port: int, backlog: int = 4096) -> socket.socket:
    """A non-blocking listening socket on the loopback that another server node in the same
    process may share during a handoff (``SO_REUSEPORT``)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def python(module: str, *args: str) -> list[str]:
    """``python -m MODULE ARGS`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def child_env(pythonpath: Sequence[Path | str] = (), **extra: str) -> dict[str, str]:
    """The environment of a child: this one, unbuffered, *pythonpath* then the repository
    root first on ``PYTHONPATH``, plus *extra*."""
    old = os.environ.get("PYTHONPATH", "")
    paths = [str(p) for p in pythonpath] + [str(ROOT)] + ([old] if old else [])
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(paths), **extra}


def _preexec(core: int | None, nofile: bool) -> Callable[[], None] | None:
    if core is None and not nofile:
        return None

    def setup() -> None:  # runs in the child between fork and exec
        pin(core)
        if nofile:
            raise_nofile()

    return setup


@dataclass
class Proc:
    """A child process started by :func:`start`: its name, port (if any) and ``Popen``."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit within *timeout*; the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL at once (and reap)."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(timeout=10)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(
    argv: Sequence[str],
    *,
    name: str = "",
    port: int = 0,
    core: int | None = None,
    nofile: bool = False,
    cwd: Path | str = ROOT,
    pythonpath: Sequence[Path | str] = (),
    env: dict[str, str] | None = None,
    stdin: Output = subprocess.DEVNULL,
    stdout: Output = None,
    stderr: Output = None,
    ready_timeout: float = READY_TIMEOUT,
) -> Proc:
    """Start *argv* (pinned to *core*, open-file limit raised with *nofile*); with *port*,
    return once it accepts there (the child is killed if it does not)."""
    popen = subprocess.Popen(
        list(argv), cwd=cwd, env=env or child_env(pythonpath), stdin=stdin, stdout=stdout,
        stderr=stderr, preexec_fn=_preexec(core, nofile),
    )  # fmt: skip
    proc = Proc(name or Path(argv[0]).name, popen, port)
    if port:
        try:
            wait_port(port, popen, ready_timeout)
        except BaseException:
            proc.kill()
            raise
    return proc


def start_redis(redis_server: str, directory: str | Path) -> Proc:
    """A throw-away ``redis-server`` on a free loopback port (no persistence, files in
    *directory*), ready to use; its URL is ``redis://HOST:<port>/0``."""
    port = free_port()
    return start(
        [redis_server, "--port", str(port), "--bind", HOST, "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--maxclients", "10000"],
        name="redis-server", port=port, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def open_trio(
    argv: Sequence[str],
    *,
    core: int | None = None,
    nofile: bool = False,
    cwd: Path | str = ROOT,
    stderr: Output = None,
) -> trio.Process:
    """:func:`start` for Trio orchestrators: a ``trio.Process`` with pipes on stdin and
    stdout (the JSON-lines protocol of the avalanche and soak children)."""
    import trio

    return await trio.lowlevel.open_process(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, cwd=cwd,
        env=child_env(), preexec_fn=_preexec(core, nofile),
    )  # fmt: skip


def run_json(argv: Sequence[str], *, timeout: float, core: int | None = None) -> dict[str, Any]:
    """Run *argv* to completion (pinned to *core*) and return the JSON object it printed
    last on stdout."""
    proc = subprocess.run(
        list(argv), capture_output=True, timeout=timeout + _LOADGEN_GRACE, check=False,
        cwd=ROOT, env=child_env(), preexec_fn=_preexec(core, True),
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.decode().splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.decode()[-2000:]
        raise RuntimeError(f"{' '.join(argv[1:3])} failed ({proc.returncode}): {err}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_loadgen(args: Sequence[str], *, timeout: float) -> dict[str, Any]:
    """Run ``python -m bench.loadgen ARGS`` on the client core; the JSON it prints last."""
    return run_json(python("bench.loadgen", *args), timeout=timeout, core=cores()[1])


# -- the JSON-lines protocol of the avalanche and soak children ------------------------------------


def emit(event: str, **fields: Any) -> None:
    """One JSON line on stdout for the orchestrator: ``{"event": ..., "t": monotonic, ...}``."""
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


async def json_lines(stream: ReceiveStream) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects a child writes on *stream*, one a line, until EOF (other lines are
    skipped)."""
    buffer = b""
    while chunk := await stream.receive_some(1 << 16):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if isinstance(item, dict):
                yield item
