"""A real ``redis-server`` for tests: on a free loopback port, in a temp dir, no persistence."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import trio

REDIS_SERVER = shutil.which("redis-server")
SKIP_REASON = "redis-server is not installed (apt-get install redis-server)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisProcess:
    """``redis-server --port N`` that tests may stop, restart (same port), pause and resume."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.directory = directory
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        assert REDIS_SERVER is not None, SKIP_REASON
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{log}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill it (SIGKILL: no goodbye to the clients, nothing saved)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a stalled Redis)."""
        assert self.proc is not None
        self.proc.send_signal(19)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(18)

    def command(self, *args: str) -> bytes:
        """Run one command with a raw socket (independent of the code under test)."""
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            data = arg.encode()
            payload += b"$%d\r\n%s\r\n" % (len(data), data)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload)
            return sock.recv(1 << 16)


class RedisProxy:
    """A TCP proxy in front of Redis whose link the test controls.

    - ``cut()`` drops every proxied connection and refuses new ones (accepted, then closed)
      until ``restore()``: unlike stopping Redis, the moment a client can get back in is the
      test's to choose.
    - ``pubsub_delay``: what Redis sends on a pub/sub connection (one that sent SUBSCRIBE)
      reaches the client that many seconds late, in order, as over a slow link; commands on
      other connections are not delayed."""

    def __init__(self, target_port: int, pubsub_delay: float = 0.0) -> None:
        self.target_port = target_port
        self.pubsub_delay = pubsub_delay
        self.port = 0
        self.refusing = False
        self._scopes: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def serve(
        self, *, task_status: trio.TaskStatus[RedisProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    def cut(self) -> None:
        self.refusing = True
        for scope in self._scopes:
            scope.cancel()

    def restore(self) -> None:
        self.refusing = False

    async def _handle(self, client: trio.SocketStream) -> None:
        if self.refusing:
            await client.aclose()
            return
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        scope = trio.CancelScope()
        self._scopes.add(scope)
        pubsub = False
        late_send, late_receive = trio.open_memory_channel[tuple[float, bytes]](float("inf"))

        async def to_redis() -> None:
            nonlocal pubsub
            while data := await client.receive_some(65536):
                pubsub = pubsub or b"subscribe" in data.lower()
                await upstream.send_all(data)

        async def from_redis() -> None:
            while data := await upstream.receive_some(65536):
                if pubsub and self.pubsub_delay:
                    late_send.send_nowait((trio.current_time() + self.pubsub_delay, data))
                else:
                    await client.send_all(data)

        async def late() -> None:
            async for due, data in late_receive:
                await trio.sleep_until(due)
                await client.send_all(data)

        async def until_either_ends(pump: Callable[[], Awaitable[None]]) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await pump()
            scope.cancel()

        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_either_ends, to_redis)
                nursery.start_soon(until_either_ends, from_redis)
                nursery.start_soon(late)
        self._scopes.discard(scope)
        await upstream.aclose()
        await client.aclose()


@pytest.fixture(name="redis")
def redis_fixture(tmp_path: Path) -> Iterator[RedisProcess]:
    """A running ``redis-server`` for one test (import this fixture where it is used)."""
    directory = tmp_path / "redis"
    directory.mkdir()
    proc = RedisProcess(directory)
    proc.start()
    yield proc
    proc.stop()
