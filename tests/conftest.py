"""Shared fixtures: a real server on a free port, and real clients talking to it over sockets."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import settings
from trio_websocket import WebSocketConnection, open_websocket_url

from trio_cable import CableApp, Channel, Config, ConnectRequest, Server, Unauthorized
from trio_cable.protocol import frames

# Property tests check results, not speed: hypothesis' default deadline (200 ms per example)
# fails them on a loaded machine ("DeadlineExceeded", then "Unreliable test timings" when
# the replay is quick).  Every @given/@settings inherits this profile.
settings.register_profile("trio_cable", deadline=None)
settings.load_profile("trio_cable")

SECRET = "s3Krit"
JSON_PROTOCOLS = ["actioncable-v1-json", "actioncable-v1-ext-json"]
MSGPACK_PROTOCOLS = ["actioncable-v1-msgpack", "actioncable-v1-ext-msgpack"]
ALL_PROTOCOLS = JSON_PROTOCOLS + MSGPACK_PROTOCOLS


# -- a small application used by the server tests ---------------------------------------------


class EchoChannel(Channel):
    """Transmits during subscribe, streams from params["stream"], echoes and broadcasts."""

    async def subscribed(self) -> None:
        if self.params.get("reject"):
            self.transmit({"before": "reject"})
            self.reject()
            return
        if self.params.get("explode"):
            raise RuntimeError("boom in subscribed")
        self.transmit({"welcome_to": self.params.get("stream", "echo"), "who": self.identifiers})
        self.stream_from(self.params.get("stream", "echo"))

    async def echo(self, data: dict[str, Any]) -> None:
        self.transmit(data)

    async def shout(self, data: dict[str, Any]) -> None:
        await self.broadcast(self.params.get("stream", "echo"), {"shout": data.get("text")})

    async def explode(self, data: dict[str, Any]) -> None:
        raise RuntimeError("boom in action")

    def receive(self, data: dict[str, Any]) -> None:
        self.transmit({"received": data})

    async def unsubscribed(self) -> None:
        UNSUBSCRIBED.append(self.identifier)


#: Identifiers whose ``unsubscribed`` ran, in order.  Emptied before every test (see
#: ``_fresh_recorders``): a call left over from an earlier test must never satisfy a later one.
UNSUBSCRIBED: list[str] = []


@pytest.fixture(autouse=True)
def _fresh_recorders() -> None:
    """Test applications record their callbacks in module-level lists; start each test empty."""
    from tests.client_support import GateChannel, SlowChannel

    UNSUBSCRIBED.clear()
    SlowChannel.intervals.clear()
    GateChannel.gate = trio.Event()
    GateChannel.passed.clear()


@pytest.fixture
def unsubscribed() -> list[str]:
    """The identifiers whose ``unsubscribed`` ran during this test, in order."""
    return UNSUBSCRIBED


async def eventually(
    predicate: Callable[[], object], timeout: float = 10.0, what: str | None = None
) -> None:
    """Wait until ``predicate()`` is true.  The timeout is a deadline for a hung test, not a
    measurement: it is generous so that a loaded machine does not fail a correct server."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"not true after {timeout} s: {what or predicate}")


def make_app() -> CableApp:
    app = CableApp()
    app.channel(EchoChannel)

    @app.connect
    async def connect(request: ConnectRequest) -> dict[str, Any]:
        if request.query.get("reject"):
            raise Unauthorized()
        user = request.query.get("user")
        return {"user": user} if user else {}

    return app


@pytest.fixture
def config() -> Config:
    return Config(
        port=0,
        secret=SECRET,
        ping_interval=3.0,
        echo_path="/echo",
        benchmark_channel=True,
        close_timeout=1.0,
        max_message_size=65536,
    )


@pytest.fixture
async def server(nursery: trio.Nursery, config: Config) -> AsyncIterator[Server]:
    srv: Server = await nursery.start(Server(config, make_app()).serve)
    yield srv


def tls_certificate(directory: Any) -> tuple[str, str, Any]:
    """A certificate for 127.0.0.1 and localhost from a throwaway CA (trustme, a dev
    dependency), written to *directory*: (cert path, key path, a client ``ssl.SSLContext``
    that trusts it)."""
    import ssl

    trustme = pytest.importorskip(
        "trustme", reason="trustme (test certificates) is a dev dependency"
    )
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return str(cert_path), str(key_path), context


def identifier(channel: str = "EchoChannel", **params: Any) -> str:
    return json.dumps({"channel": channel, **params})


# -- clients -----------------------------------------------------------------------------------


class CableClient:
    """An Action Cable client on trio-websocket that speaks JSON or msgpack."""

    def __init__(self, ws: WebSocketConnection, subprotocol: str) -> None:
        self.ws = ws
        self.subprotocol = subprotocol
        self.binary = "msgpack" in subprotocol
        self.last_position: tuple[str, str, int] | None = None

    def encode(self, obj: Any) -> str | bytes:
        if self.binary:
            return msgpack.packb(obj, use_bin_type=True)
        return json.dumps(obj)

    def decode(self, raw: str | bytes) -> Any:
        if self.binary:
            assert isinstance(raw, bytes), f"expected a binary frame, got {raw!r}"
            return msgpack.unpackb(raw, raw=False)
        assert isinstance(raw, str), f"expected a text frame, got {raw!r}"
        return json.loads(raw)

    async def send(self, obj: Any) -> None:
        await self.ws.send_message(self.encode(obj))

    async def recv(self, *, pings: bool = False, raw: bool = False, timeout: float = 5.0) -> Any:
        """The next message, pings skipped.  Unless *raw*, a stored broadcast's position
        (``stream_id``/``epoch``/``offset``, ext protocols only) is moved to ``last_position``
        so that tests can compare messages across protocols."""
        with trio.fail_after(timeout):
            while True:
                message = self.decode(await self.ws.get_message())
                if pings or message.get("type") != "ping":
                    break
        if not raw and "offset" in message:
            assert "ext" in self.subprotocol, f"position sent to a plain client: {message}"
            self.last_position = (
                message.pop("stream_id"),
                message.pop("epoch"),
                message.pop("offset"),
            )
        return message

    async def subscribe(self, ident: str, expect: str = "confirm_subscription") -> list[Any]:
        """Subscribe; return everything received up to and including the answer."""
        await self.send({"command": "subscribe", "identifier": ident})
        got = []
        while True:
            message = await self.recv()
            got.append(message)
            if message.get("type") in ("confirm_subscription", "reject_subscription"):
                assert message == {"identifier": ident, "type": expect}
                return got

    async def perform(self, ident: str, action: str, **data: Any) -> None:
        await self.send(
            {
                "command": "message",
                "identifier": ident,
                "data": json.dumps({"action": action, **data}),
            }
        )

    async def expect_silence(self, seconds: float = 0.3) -> None:
        """Nothing arrives for *seconds*.  Prefer :meth:`expect_nothing_before_echo`, which
        needs no timing; this is for what can only be observed as silence (e.g. traffic that
        crosses another node)."""
        with trio.move_on_after(seconds):
            message = await self.recv()
            raise AssertionError(f"expected nothing, got {message!r}")

    async def expect_nothing_before_echo(self, ident: str) -> None:
        """Nothing was sent to this client so far: an ``echo`` on *ident* (a subscribed
        ``EchoChannel``) is answered by the very next message.  The server handles one
        connection's commands in order, and a broadcast awaited before is already written,
        so anything owed to this client comes before that answer: no silence window to
        time, on a quiet or a loaded machine."""
        marker = os.urandom(4).hex()
        await self.perform(ident, "echo", marker=marker)
        message = await self.recv()
        assert message == {"identifier": ident, "message": {"action": "echo", "marker": marker}}, (
            f"expected nothing before the echo, got {message!r}"
        )


ClientFactory = Callable[..., Any]


@pytest.fixture
def connect(server: Server, nursery: trio.Nursery) -> ClientFactory:
    """``async with connect(subprotocol, query="", headers=None) as client`` yields a welcomed
    :class:`CableClient` (``client.welcome`` holds the welcome message).  It connects to the
    ``server`` fixture, or to the server given as ``to=``."""

    @asynccontextmanager
    async def _connect(
        subprotocol: str = "actioncable-v1-json",
        *,
        query: str = "",
        headers: list[tuple[str, str]] | None = None,
        extra_subprotocols: list[str] | None = None,
        expect_welcome: bool = True,
        path: str = "/cable",
        to: Server | None = None,
    ) -> AsyncIterator[CableClient]:
        port = (to or server).port
        url = f"ws://127.0.0.1:{port}{path}{'?' + query if query else ''}"
        async with open_websocket_url(
            url,
            subprotocols=[subprotocol, *(extra_subprotocols or [])],
            extra_headers=headers or [],
        ) as ws:
            assert ws.subprotocol == subprotocol
            client = CableClient(ws, subprotocol)
            if expect_welcome:
                welcome = await client.recv()
                assert welcome["type"] == "welcome", welcome
                client.welcome = welcome  # type: ignore[attr-defined]
            yield client

    return _connect


class RawClient:
    """A hand-driven WebSocket client on a plain Trio socket, for crafted (bad) frames."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    @classmethod
    async def open(
        cls,
        port: int,
        path: str = "/cable",
        subprotocol: str | None = "actioncable-v1-json",
        extra_headers: str = "",
    ) -> tuple[RawClient, bytes]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream)
        key = base64.b64encode(os.urandom(16)).decode()
        proto = f"Sec-WebSocket-Protocol: {subprotocol}\r\n" if subprotocol else ""
        await stream.send_all(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{proto}{extra_headers}\r\n"
            ).encode()
        )
        head = await client.read_until(b"\r\n\r\n")
        return client, head

    async def read_until(self, marker: bytes, timeout: float = 5.0) -> bytes:
        with trio.fail_after(timeout):
            while marker not in self.buffer:
                data = await self.stream.receive_some(65536)
                if not data:
                    raise EOFError(f"closed before {marker!r}; got {self.buffer!r}")
                self.buffer += data
        head, _, self.buffer = self.buffer.partition(marker)
        return head + marker

    async def send_frame(
        self,
        opcode: int,
        payload: bytes,
        *,
        fin: bool = True,
        rsv: int = 0,
        mask: bytes | None = b"abcd",
    ) -> None:
        await self.stream.send_all(frames.build_frame(opcode, payload, fin=fin, mask=mask, rsv=rsv))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_frame(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next server frame (opcode, payload), or None at EOF."""
        frame = await self.read_frame_rsv(timeout)
        return None if frame is None else frame[:2]

    async def read_frame_rsv(self, timeout: float = 5.0) -> tuple[int, bytes, int] | None:
        """The next server frame (opcode, payload, its RSV bits 0..7), or None at EOF."""
        with trio.fail_after(timeout):
            while True:
                parsed = _parse_server_frame(self.buffer)
                if parsed is not None:
                    opcode, payload, used = parsed
                    rsv = (self.buffer[0] >> 4) & 7
                    self.buffer = self.buffer[used:]
                    return opcode, payload, rsv
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                if not data:
                    return None
                self.buffer += data

    async def read_until_close(
        self, timeout: float = 5.0
    ) -> tuple[list[tuple[int, bytes]], int | None]:
        """Frames up to and including the close frame; returns (frames, close code)."""
        got = []
        while True:
            frame = await self.read_frame(timeout)
            if frame is None:
                return got, None
            got.append(frame)
            if frame[0] == frames.OP_CLOSE:
                code = int.from_bytes(frame[1][:2], "big") if len(frame[1]) >= 2 else None
                return got, code

    async def aclose(self) -> None:
        await self.stream.aclose()


def _parse_server_frame(buf: bytes) -> tuple[int, bytes, int] | None:
    if len(buf) < 2:
        return None
    opcode = buf[0] & 0x0F
    length = buf[1] & 0x7F
    assert not buf[1] & 0x80, "server frames must not be masked"
    pos = 2
    if length == 126:
        if len(buf) < 4:
            return None
        length = int.from_bytes(buf[2:4], "big")
        pos = 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length = int.from_bytes(buf[2:10], "big")
        pos = 10
    if len(buf) < pos + length:
        return None
    return opcode, buf[pos : pos + length], pos + length


@asynccontextmanager
async def client_of(
    server: Server, subprotocol: str = "actioncable-v1-ext-json", query: str = ""
) -> AsyncIterator[CableClient]:
    """A welcomed :class:`CableClient` of *server* (``client.welcome`` holds the welcome)."""
    url = f"ws://127.0.0.1:{server.port}/cable{'?' + query if query else ''}"
    async with open_websocket_url(url, subprotocols=[subprotocol]) as ws:
        client = CableClient(ws, subprotocol)
        client.welcome = await client.recv()  # type: ignore[attr-defined]
        yield client
