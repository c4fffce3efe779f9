"""``trio-cable serve --workers N``: N worker processes on one port, under a supervisor.

One Python process runs on one core.  The supervisor starts N ``trio-cable serve`` worker
processes (the same command line, marked as workers by the ``_TRIO_CABLE_WORKER`` variable);
each listens on the same address with ``SO_REUSEPORT``, so the kernel spreads new
connections over them.  The workers share broadcasts, history and sessions through Redis
(``--broker redis`` is required), and answer ``/health`` and ``/metrics`` for all of them
(:mod:`trio_cable.server.cluster`).

The supervisor itself serves nothing.  It holds the port (bound with ``SO_REUSEPORT``, not
listening, so that ``--port 0`` picks one port for all and a port in use is reported at
once), and:

- forwards SIGTERM and SIGINT to every worker (each one slow-drains: see
  :func:`serve_node`), and exits when all have exited;
- restarts a worker that exits on its own, after a backoff that doubles from
  :data:`BACKOFF_BASE` to :data:`BACKOFF_CAP` seconds and starts over once a worker has run
  :data:`STABLE_AFTER` seconds;
- on SIGHUP restarts the workers one at a time: a fresh worker starts, and once it is
  serving the old one stops accepting (its listening socket closes; the kernel sends new
  connections to the others) and slow-drains; its clients resume their sessions on the
  other workers.  The next worker follows once the old one has exited.

Supervisor and worker talk over a socket pair: the worker writes ``ready`` once it serves,
and a worker whose supervisor is gone (the pair's end closes, even after ``kill -9``)
drains and exits.  Workers run in their own process group, so a Ctrl-C in a terminal
reaches the supervisor only, which forwards it once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from trio_cable.config import Config

if TYPE_CHECKING:
    from trio_cable.channels import CableApp
    from trio_cable.server import Server

log = logging.getLogger("trio_cable.supervisor")
node_log = logging.getLogger("trio_cable")

#: The environment variable that makes ``trio-cable serve`` a worker (JSON: WorkerSpec).
WORKER_ENV = "_TRIO_CABLE_WORKER"
#: Restart backoff: first delay, largest delay, and how long a worker must have run for the
#: next crash to start from the first delay again.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
STABLE_AFTER = 30.0
#: Seconds a fresh worker has to start serving.
READY_TIMEOUT = 60.0
#: What a worker is told when it is to stop accepting and slow-drain (a rolling restart).
RETIRE_SIGNAL = signal.SIGUSR1


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process is told by its supervisor."""

    group: str  # the supervisor's id: workers of independent servers may share one Redis
    index: int  # the worker's slot, 0..N-1 (a replacement takes its predecessor's)
    port: int  # the port to listen on (the supervisor resolved --port 0)
    fd: int  # the worker's end of the control socket pair

    def to_env(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_env(cls, text: str) -> WorkerSpec:
        return cls(**json.loads(text))


def worker_spec() -> WorkerSpec | None:
    """This process's spec when it is a worker, else None."""
    text = os.environ.get(WORKER_ENV)
    return WorkerSpec.from_env(text) if text else None


def reuse_port_socket(host: str, port: int, *, listen: bool) -> socket.socket:
    """A TCP socket bound to (*host*, *port*) with ``SO_REUSEPORT``; listening if *listen*.

    Bound but not listening, it receives no connections: the supervisor's reservation."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(4096)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


# -- the worker side -------------------------------------------------------------------------


async def serve_node(server: Server, spec: WorkerSpec | None = None) -> None:
    """Serve *server* until a signal: SIGTERM / SIGINT start a slow drain; a second signal
    disconnects the rest at once; a third stops without waiting.

    As worker *spec* it also tells its supervisor when it serves, publishes its metrics for
    the group, takes :data:`RETIRE_SIGNAL` as "stop accepting, then slow-drain", and drains
    when its supervisor is gone."""
    wanted = [signal.SIGINT, signal.SIGTERM] + ([RETIRE_SIGNAL] if spec else [])
    with trio.open_signal_receiver(*wanted) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            received = 0

            async def drain_then_stop() -> None:
                await server.drain()
                if server.group is not None:
                    await server.group.leave()
                nursery.cancel_scope.cancel()

            def stop(why: str, *, retire: bool = False) -> None:
                nonlocal received
                received += 1
                if received == 1:
                    if retire:
                        server.stop_accepting()
                        node_log.info("%s: not accepting any more, draining", why)
                    else:
                        node_log.info("%s: draining (send again to hurry)", why)
                    nursery.start_soon(drain_then_stop)
                elif received == 2:
                    node_log.info("%s again: disconnecting everybody now", why)
                    server.drain_now()
                else:
                    node_log.info("%s a third time: stopping", why)
                    nursery.cancel_scope.cancel()

            if spec is not None:
                control = socket.socket(fileno=spec.fd)
                control.setblocking(False)
                if server.group is not None:
                    nursery.start_soon(server.group.run)
                nursery.start_soon(_watch_supervisor, control, stop)
                with contextlib.suppress(OSError):  # a supervisor gone already: the watcher sees it
                    control.send(b"ready\n")
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == RETIRE_SIGNAL:
                    stop(f"received {name} (rolling restart)", retire=True)
                else:
                    stop(f"received {name}")


async def _watch_supervisor(control: socket.socket, stop: Callable[[str], None]) -> None:
    """Drain when the supervisor is gone (its end of the pair closes, whatever killed it)."""
    with control:
        while True:
            await trio.lowlevel.wait_readable(control)
            try:
                data = control.recv(64)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                break
    stop("the supervisor is gone")


async def run_worker(config: Config, app: CableApp, spec: WorkerSpec) -> None:
    """Serve as worker *spec*: listen with ``SO_REUSEPORT`` on the supervisor's port."""
    from trio_cable.broker.redis import RedisBroker
    from trio_cable.server import Server
    from trio_cable.server.cluster import WorkerGroup

    listener = reuse_port_socket(config.host, spec.port, listen=True)
    server = Server(config, app, listen_socket=listener, label=f"trio_cable worker {spec.index}")
    store = server.broker
    if isinstance(store, RedisBroker):  # always: Config.validate() sees to it
        server.group = WorkerGroup(
            store, spec.group, spec.index, server.metrics, server.health,
            dashboard=server.dashboard_data if config.dashboard else None,
        )  # fmt: skip
    await serve_node(server, spec)


# -- the supervisor --------------------------------------------------------------------------


class _Worker:
    """One worker process."""

    def __init__(self, index: int, process: trio.Process, control: socket.socket) -> None:
        self.index = index
        self.process = process
        self.control = control
        self.started = trio.current_time()
        self.retiring = False
        self.exited = trio.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signum)


class _Slot:
    """Worker slot *index*: the worker that holds it, and its restart backoff."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.current: _Worker | None = None
        self.lock = trio.Lock()  # one replacement of the slot's worker at a time
        self.failures = 0


class StartFailed(Exception):
    """A worker exited before it served (its own message is on stderr): ``status`` is
    its exit status."""

    def __init__(self, status: int) -> None:
        super().__init__(f"a worker exited with status {status} before it served")
        self.status = status


class Supervisor:
    """Runs ``config.workers`` workers of the command line *argv* (``serve ...``)."""

    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.group = os.urandom(6).hex()
        self.slots = [_Slot(i) for i in range(config.workers)]
        self.workers: set[_Worker] = set()  # every live worker process
        self.stopping = False
        self.rolling = False
        self._reservation = reuse_port_socket(config.host, config.port, listen=False)
        self.port = int(self._reservation.getsockname()[1])
        self._changed = trio.Event()

    @property
    def url(self) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.config.tls_cert else "ws"
        return f"{scheme}://{host}:{self.port}{self.config.path[0]}"

    async def run(self) -> int:
        """Supervise until every worker has exited after a stop signal; the exit status."""
        with self._reservation:
            handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
            with trio.open_signal_receiver(*handled) as signals:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    try:
                        await self._start_all()
                    except StartFailed as failed:
                        self._forward(signal.SIGTERM)
                        await self._all_exited()
                        nursery.cancel_scope.cancel()
                        return failed.status
                    log.info(
                        "trio_cable listening on %s (%d workers, supervisor pid %d)",
                        self.url,
                        len(self.slots),
                        os.getpid(),
                    )
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if signum == signal.SIGHUP:
                            if self.stopping or self.rolling:
                                log.info("received SIGHUP: ignored (already restarting)")
                            else:
                                log.info("received SIGHUP: restarting the workers one at a time")
                                nursery.start_soon(self._roll)
                            continue
                        if not self.stopping:
                            self.stopping = True
                            nursery.start_soon(self._stop_when_all_exited)
                        log.info("received %s: passing it to %d workers", name, len(self.workers))
                        self._forward(signum)
        return 0

    async def _start_all(self) -> None:
        for slot in self.slots:
            worker = await self._spawn(slot.index)
            if isinstance(worker, int):
                raise StartFailed(worker)
            slot.current = worker

    def _forward(self, signum: int) -> None:
        for worker in list(self.workers):
            worker.signal(signum)

    async def _all_exited(self) -> None:
        while self.workers:
            await self._changed.wait()

    async def _stop_when_all_exited(self) -> None:
        await self._all_exited()
        log.info("all workers have exited")
        self._nursery.cancel_scope.cancel()

    async def _spawn(self, index: int) -> _Worker | int:
        """Start a worker for slot *index* and wait until it serves; its exit status (or 1)
        when it exits or stalls first."""
        parent, child = socket.socketpair()
        spec = WorkerSpec(self.group, index, self.port, child.fileno())
        env = dict(os.environ, **{WORKER_ENV: spec.to_env()})
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "trio_cable", *self.argv],
                env=env,
                pass_fds=(child.fileno(),),
                process_group=0,  # a terminal's Ctrl-C is the supervisor's to forward
            )
        finally:
            child.close()
        parent.setblocking(False)
        worker = _Worker(index, process, parent)
        self.workers.add(worker)
        self._nursery.start_soon(self._watch, worker)
        with trio.move_on_after(READY_TIMEOUT):
            if await _read_ready(parent):
                log.info("worker %d (pid %d) is serving", index, worker.pid)
                return worker
        if process.returncode is None:
            log.error("worker %d (pid %d) did not start serving: killing it", index, worker.pid)
            process.kill()
        await worker.exited.wait()
        status = process.returncode or 1
        return status if status > 0 else 1

    async def _watch(self, worker: _Worker) -> None:
        """Wait for *worker* to exit; replace it when nobody asked it to."""
        status = await worker.process.wait()
        trio.lowlevel.notify_closing(worker.control)  # _read_ready may be waiting on it
        worker.control.close()
        self.workers.discard(worker)
        worker.exited.set()
        self._changed.set()
        self._changed = trio.Event()
        ran = trio.current_time() - worker.started
        slot = self.slots[worker.index]
        if self.stopping or worker.retiring:
            log.info("worker %d (pid %d) exited (status %d)", worker.index, worker.pid, status)
            return
        if slot.current is not worker:
            return  # it never served: _spawn reports it
        log.warning(
            "worker %d (pid %d) exited on its own (status %d) after %.1f s",
            worker.index,
            worker.pid,
            status,
            ran,
        )
        if ran >= STABLE_AFTER:
            slot.failures = 0
        await self._replace(slot, worker)

    async def _replace(self, slot: _Slot, dead: _Worker) -> None:
        """Start workers for *slot* until one serves, with backoff (unless it was replaced
        meanwhile, or the server is stopping)."""
        async with slot.lock:
            while slot.current is dead and not self.stopping:
                delay = min(BACKOFF_CAP, BACKOFF_BASE * 2**slot.failures)
                slot.failures += 1
                log.info("restarting worker %d in %.1f s", slot.index, delay)
                await trio.sleep(delay)
                if self.stopping:
                    return
                worker = await self._spawn(slot.index)
                if isinstance(worker, _Worker):
                    if self.stopping:
                        worker.signal(signal.SIGTERM)
                    slot.current = worker

    async def _roll(self) -> None:
        """The rolling restart (SIGHUP): each slot in turn gets a fresh worker, then its old
        one stops accepting and drains; the next slot waits until the old one has exited."""
        self.rolling = True
        try:
            for slot in self.slots:
                async with slot.lock:
                    if self.stopping:
                        return
                    old = slot.current
                    fresh = await self._spawn(slot.index)
                    if not isinstance(fresh, _Worker):
                        log.error(
                            "rolling restart stopped: the new worker %d did not serve "
                            "(status %d); the old one goes on",
                            slot.index,
                            fresh,
                        )
                        return
                    slot.current = fresh
                    if self.stopping:
                        fresh.signal(signal.SIGTERM)
                    if old is not None:
                        old.retiring = True
                        log.info("worker %d (pid %d): retiring", slot.index, old.pid)
                        old.signal(RETIRE_SIGNAL)
                if old is not None:
                    await old.exited.wait()
            log.info("rolling restart done")
        finally:
            self.rolling = False


async def _read_ready(control: socket.socket) -> bool:
    """True once the worker wrote ``ready``; False when it closed its end (exited)."""
    buf = b""
    while b"\n" not in buf:
        try:
            await trio.lowlevel.wait_readable(control)
            data = control.recv(64)
        except BlockingIOError:
            continue
        except (OSError, trio.ClosedResourceError):
            return False
        if not data:
            return False
        buf += data
    return buf.startswith(b"ready")
