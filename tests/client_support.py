"""Helpers for the client tests: a test application, a server that can be restarted on the
same port, and a TCP proxy that watches (and can disturb) the WebSocket traffic between a
client and the server."""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from tests.conftest import SECRET, EchoChannel, _parse_server_frame
from trio_cable import CableApp, Channel, Config, ConnectRequest, Server, Unauthorized
from trio_cable.protocol.frames import OP_BINARY, OP_TEXT, FrameParser

#: What the server under test supports beyond the core protocol (issue 4 adds to it).
SERVER_FEATURES: frozenset[str] = frozenset(getattr(Server, "features", frozenset()))


def needs_server(*features: str) -> Any:
    """Skip a test unless the server advertises every feature in ``Server.features``."""
    import pytest

    missing = [f for f in features if f not in SERVER_FEATURES]
    return pytest.mark.skipif(
        bool(missing), reason=f"server lacks {', '.join(missing)} (Server.features; issue 4)"
    )


class LoopLag:
    """How late this event loop runs a short timer, sampled all the time.

    A task due at time *t* runs when the loop gets to it: on a busy machine (other processes
    on the CPU, a full garbage collection, a long batch of other ready tasks) that can be
    hundreds of milliseconds later.  A time measured in a test is only as exact as the loop
    was punctual around it, and these samples say how punctual it was, and when.  Run it with
    ``nursery.start_soon(lag.run)`` and end it with ``lag.stop()``."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        #: (when the probe ran, how late it ran), in time order.
        self.samples: list[tuple[float, float]] = []
        self._scope = trio.CancelScope()

    async def run(self) -> None:
        with self._scope:
            while True:
                due = trio.current_time() + self.interval
                await trio.sleep_until(due)
                now = trio.current_time()
                self.samples.append((now, now - due))

    def stop(self) -> None:
        self._scope.cancel()

    def worst(self, start: float, end: float) -> float:
        """The worst lateness of the probe runs between *start* and *end* (0 if none)."""
        times = [t for t, _ in self.samples]
        lo, hi = bisect.bisect_left(times, start), bisect.bisect_right(times, end)
        return max((late for _, late in self.samples[lo:hi]), default=0.0)


class SlowChannel(Channel):
    """``subscribed`` takes ``params["delay"]`` seconds; records its intervals per connection."""

    intervals: list[tuple[str, float, float]] = []

    async def subscribed(self) -> None:
        start = trio.current_time()
        await trio.sleep(float(self.params.get("delay", 0.05)))
        SlowChannel.intervals.append((self.identifier, start, trio.current_time()))
        self.stream_from(str(self.params.get("stream", "slow")))


class GateChannel(Channel):
    """``subscribed`` waits until the test sets ``GateChannel.gate`` (a fresh, closed one in
    every test): a subscription that is pending for exactly as long as the test wants.
    ``passed`` counts the ``subscribed`` calls that got through (emptied per test too)."""

    gate = trio.Event()
    passed: list[str] = []

    async def subscribed(self) -> None:
        await GateChannel.gate.wait()
        self.stream_from("gate")
        GateChannel.passed.append(self.identifier)


class PlainChannel(Channel):
    """Streams from ``params["stream"]``; no transmissions of its own.  Actions ``kick``
    (server-initiated disconnect with the given advice) and ``echo``."""

    def subscribed(self) -> None:
        self.stream_from(str(self.params.get("stream", "plain")))

    def echo(self, data: dict[str, Any]) -> None:
        self.transmit(data)

    def kick(self, data: dict[str, Any]) -> None:
        # The server's own close path: disconnect message (+ advice), then the close frame.
        self.host.close(  # type: ignore[attr-defined]
            data.get("reason", "remote"),
            reconnect=bool(data.get("reconnect", True)),
            reconnect_after_ms=data.get("reconnect_after"),
        )


def client_app() -> CableApp:
    app = CableApp()
    for cls in (EchoChannel, SlowChannel, GateChannel, PlainChannel):
        app.channel(cls)

    @app.connect
    async def connect(request: ConnectRequest) -> dict[str, Any]:
        if request.query.get("reject"):
            raise Unauthorized()
        return {"user": request.query.get("user", "anon")}

    return app


def client_config(**overrides: Any) -> Config:
    settings: dict[str, Any] = {
        "port": 0,
        "secret": SECRET,
        "ping_interval": 3.0,
        "close_timeout": 1.0,
    }
    settings.update(overrides)
    return Config(**settings)


class RestartableServer:
    """A :class:`Server` that can be stopped and started again on the same port."""

    def __init__(
        self, nursery: trio.Nursery, server_kwargs: dict[str, Any] | None = None, **config: Any
    ) -> None:
        self.nursery = nursery
        self.config = config
        #: Extra keyword arguments of ``Server`` (e.g. a ``broker`` shared across restarts).
        self.server_kwargs = dict(server_kwargs or {})
        self.port = 0
        self.server: Server | None = None
        self._scope: trio.CancelScope | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/cable"

    async def start(self) -> Server:
        scope = trio.CancelScope()
        stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    srv = Server(
                        client_config(**{**self.config, "port": self.port}),
                        client_app(),
                        **self.server_kwargs,
                    )
                    await srv.serve(task_status=task_status)
            finally:
                stopped.set()

        self._stopped = stopped

        self.server = await self.nursery.start(run)
        self._scope = scope
        self.port = self.server.port
        self.starts += 1
        return self.server

    async def stop(self) -> None:
        """Drop every connection at once (no disconnect message: like a crash)."""
        assert self._scope is not None
        self._scope.cancel()
        # The listening socket closes once every connection task has ended.
        await self._stopped.wait()
        self._scope = None
        self.server = None


# -- a watching proxy ------------------------------------------------------------------------------


@dataclass
class Tap:
    """Traffic of one proxied connection, decoded (JSON or msgpack)."""

    client: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    server: list[tuple[float, dict[str, Any]]] = field(default_factory=list)


class TapProxy:
    """A TCP proxy in front of a server that decodes the Action Cable messages both ways.

    - ``refuse``: the next N handshakes get ``HTTP 503`` (with ``Retry-After: retry_after``
      when set) instead of reaching the server.
    - ``drop_subscribes``: the next N client ``subscribe`` commands are not forwarded.
    - ``freeze()``: stop forwarding anything (the TCP connections stay open: a stale peer).
    - ``kill()``: cut every proxied connection.
    - ``max_in_flight``: the most ``subscribe`` commands of one connection ever seen
      unanswered at once, measured on the wire.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refuse = 0
        self.retry_after: str | None = "1"
        self.refused_at: list[float] = []
        self.drop_subscribes = 0
        self.frozen = False
        self.taps: list[Tap] = []
        self.max_in_flight = 0
        self.on_client_message: Callable[[dict[str, Any]], None] | None = None
        self._scopes: list[trio.CancelScope] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/cable"

    async def serve(
        self, *, task_status: trio.TaskStatus[TapProxy] = trio.TASK_STATUS_IGNORED
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    def freeze(self) -> None:
        self.frozen = True

    def kill(self) -> None:
        for scope in self._scopes:
            scope.cancel()
        self._scopes.clear()

    async def _handle(self, client: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        self._scopes.append(scope)
        with scope:
            try:
                await self._proxy(client)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # either side hung up: so does the proxy
        await client.aclose()

    async def _proxy(self, client: trio.SocketStream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await client.receive_some(65536)
            if not data:
                return
            head += data
        if self.refuse > 0:
            self.refuse -= 1
            self.refused_at.append(trio.current_time())
            extra = f"Retry-After: {self.retry_after}\r\n" if self.retry_after is not None else ""
            await client.send_all(
                (
                    "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n"
                    f"Connection: close\r\n{extra}\r\nbusy"
                ).encode()
            )
            return
        upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        tap = Tap()
        self.taps.append(tap)
        pending: set[str] = set()
        request_head, _, rest = head.partition(b"\r\n\r\n")
        binary = b"msgpack" in request_head.lower()
        try:
            async with trio.open_nursery() as nursery:

                async def both_ways(pump: Any, *args: Any) -> None:
                    await pump(*args)
                    nursery.cancel_scope.cancel()  # one side ended: end the other

                head = request_head + b"\r\n\r\n"
                nursery.start_soon(
                    both_ways, self._pump_client, client, upstream, head, rest, tap, pending, binary
                )
                nursery.start_soon(
                    both_ways, self._pump_server, upstream, client, tap, pending, binary
                )
        finally:
            await upstream.aclose()

    def _decode(self, opcode: int, payload: bytes, binary: bool) -> dict[str, Any] | None:
        try:
            if opcode == OP_TEXT and not binary:
                obj = json.loads(payload)
            elif opcode == OP_BINARY and binary:
                obj = msgpack.unpackb(payload, raw=False)
            else:
                return None
        except ValueError:
            return None
        return obj if isinstance(obj, dict) else None

    async def _pump_client(
        self,
        client: trio.SocketStream,
        upstream: trio.SocketStream,
        head: bytes,
        rest: bytes,
        tap: Tap,
        pending: set[str],
        binary: bool,
    ) -> None:
        await upstream.send_all(head)
        parser = FrameParser(1 << 24)
        data = rest
        while True:
            if data:
                # Forward frame by frame, so single commands can be dropped.
                parser.feed(data)
                while (message := parser.next_message()) is not None:
                    opcode, payload = message
                    obj = self._decode(opcode, bytes(payload), binary)
                    forward = True
                    if obj is not None:
                        tap.client.append((trio.current_time(), obj))
                        if self.on_client_message is not None:
                            self.on_client_message(obj)
                        if obj.get("command") == "subscribe":
                            if self.drop_subscribes > 0:
                                self.drop_subscribes -= 1
                                forward = False
                            else:
                                pending.add(obj["identifier"])
                                self.max_in_flight = max(self.max_in_flight, len(pending))
                    if forward:
                        await self._wait_thawed()
                        await upstream.send_all(_client_frame(opcode, bytes(payload)))
            data = await client.receive_some(65536)
            if not data:
                return

    async def _pump_server(
        self,
        upstream: trio.SocketStream,
        client: trio.SocketStream,
        tap: Tap,
        pending: set[str],
        binary: bool,
    ) -> None:
        buf = b""
        head_done = False
        while True:
            data = await upstream.receive_some(65536)
            if not data:
                return
            await self._wait_thawed()
            buf += data
            if not head_done:
                if b"\r\n\r\n" not in buf:
                    continue
                head, _, buf = buf.partition(b"\r\n\r\n")
                await client.send_all(head + b"\r\n\r\n")
                head_done = True
            while (parsed := _parse_server_frame(buf)) is not None:
                opcode, payload, used = parsed
                frame, buf = buf[:used], buf[used:]
                obj = self._decode(opcode, payload, binary)
                if obj is not None:
                    tap.server.append((trio.current_time(), obj))
                    if obj.get("type") in ("confirm_subscription", "reject_subscription"):
                        pending.discard(obj.get("identifier", ""))
                await client.send_all(frame)

    async def _wait_thawed(self) -> None:
        while self.frozen:
            await trio.sleep(0.05)


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """Re-frame a client message (masked, FIN) after inspection."""
    from trio_cable.protocol.frames import build_frame

    return build_frame(opcode, payload, mask=b"\x01\x02\x03\x04")
