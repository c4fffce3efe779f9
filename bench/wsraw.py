"""A minimal raw WebSocket client on Trio sockets, for the fuzz and soak campaigns.

It writes exactly the bytes it is told to (a hand-written upgrade request, masked frames built
by the pure kernel twin, or arbitrary garbage), and parses the server's frames with the same
:class:`FrameParser` the server uses (``require_mask=False``).  No library between the test and
the wire means a fuzzer can send what no well-behaved client library would.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from trio_cable import _speedups_py as kernels

OP_TEXT = kernels.OP_TEXT
OP_BINARY = kernels.OP_BINARY
OP_CLOSE = kernels.OP_CLOSE
OP_PING = kernels.OP_PING
OP_PONG = kernels.OP_PONG

_MAX_HEAD = 64 * 1024


class HandshakeRefused(Exception):
    """The server answered the upgrade request with something other than ``101``."""

    def __init__(self, status: int, head: bytes) -> None:
        super().__init__(f"handshake refused: HTTP {status}")
        self.status = status
        self.head = head


def upgrade_request(
    host: str,
    port: int,
    *,
    path: str = "/cable",
    subprotocols: list[str] | None = None,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> bytes:
    """The bytes of a WebSocket upgrade request (RFC 6455 section 4.1)."""
    key = base64.b64encode(os.urandom(16)).decode()
    target = path + (f"?{query}" if query else "")
    lines = [
        f"GET {target} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(subprotocols))
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def status_of(head: bytes) -> int:
    """The status code of an HTTP response head (0 when it is not one)."""
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def header_value(head: bytes, name: str) -> str | None:
    """A response header's value (first occurrence, case-insensitive name)."""
    wanted = name.lower().encode()
    for line in head.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key.strip().lower() == wanted:
            return value.strip().decode("latin-1")
    return None


@dataclass(eq=False)
class RawWS:
    """One client connection after (or before) its upgrade."""

    stream: trio.SocketStream
    subprotocol: str | None = None
    head: bytes = b""
    parser: kernels.FrameParser = field(
        default_factory=lambda: kernels.FrameParser(max_message_size=1 << 26, require_mask=False)
    )
    close_code: int | None = None
    closed: bool = False
    _mask: bytes = field(default_factory=lambda: os.urandom(4))

    @property
    def binary(self) -> bool:
        """Whether the negotiated subprotocol uses msgpack (binary frames)."""
        return bool(self.subprotocol and "msgpack" in self.subprotocol)

    async def send_raw(self, data: bytes) -> None:
        """Write *data* as is."""
        await self.stream.send_all(data)

    def frame(self, opcode: int, payload: bytes, fin: bool = True) -> bytes:
        """A masked client frame."""
        return kernels.build_frame(opcode, payload, fin, self._mask)

    async def send(self, opcode: int, payload: bytes) -> None:
        """Send one masked frame."""
        await self.stream.send_all(self.frame(opcode, payload))

    def encode(self, obj: Any) -> bytes:
        """Encode a command with the connection's codec."""
        if self.binary:
            return bytes(msgpack.packb(obj, use_bin_type=True))
        return json.dumps(obj, separators=(",", ":")).encode()

    async def send_command(self, obj: Any) -> None:
        """Send an Action Cable command in the negotiated codec."""
        await self.send(OP_BINARY if self.binary else OP_TEXT, self.encode(obj))

    def decode(self, opcode: int, payload: bytes) -> Any:
        """A data message's value (``None`` if it cannot be decoded)."""
        try:
            if opcode == OP_BINARY:
                return msgpack.unpackb(payload, raw=False)
            return json.loads(payload)
        except ValueError:
            return None

    async def recv(self) -> tuple[int, bytes] | None:
        """The next message or control frame; ``None`` at EOF or after the server's close.

        Pings are answered with pongs; a close frame records :attr:`close_code`.
        """
        while True:
            message = self.parser.next_message()
            if message is not None:
                opcode, payload = message
                if opcode == OP_PING:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.send(OP_PONG, payload)
                    continue
                if opcode == OP_CLOSE:
                    self.close_code, _reason = kernels.close_code_and_reason(payload)
                    self.closed = True
                    return None
                return message
            if self.closed:
                return None
            data = await self.stream.receive_some(65536)
            if not data:
                self.closed = True
                return None
            self.parser.feed(data)

    async def recv_value(self) -> Any:
        """The next decoded data message; ``None`` at close."""
        while True:
            message = await self.recv()
            if message is None:
                return None
            opcode, payload = message
            if opcode in (OP_TEXT, OP_BINARY):
                return self.decode(opcode, payload)

    async def expect(self, predicate: Any) -> Any:
        """Skip data messages until one satisfies *predicate*; ``None`` at close."""
        while True:
            value = await self.recv_value()
            if value is None and self.closed:
                return None
            if isinstance(value, dict) and predicate(value):
                return value

    async def close(self, code: int = 1000) -> None:
        """Send a close frame and close the socket (no wait for the server's answer)."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.send(OP_CLOSE, code.to_bytes(2, "big"))
        await self.aclose()

    async def aclose(self) -> None:
        """Close the socket at once (abrupt disconnect, no close frame)."""
        await trio.aclose_forcefully(self.stream)


async def read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    """Read an HTTP response head; returns ``(head, bytes after it)``; raises at EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            raise HandshakeRefused(status_of(buf), buf)
        buf += data
        if len(buf) > _MAX_HEAD:
            raise HandshakeRefused(0, buf[:200])
    head, _sep, rest = buf.partition(b"\r\n\r\n")
    return head, rest


async def connect(
    host: str,
    port: int,
    *,
    path: str = "/cable",
    subprotocols: list[str] | None = None,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> RawWS:
    """Open a TCP connection and upgrade it; raises :class:`HandshakeRefused` on a non-101."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        request = upgrade_request(
            host, port, path=path, subprotocols=subprotocols, query=query, headers=headers
        )
        await stream.send_all(request)
        head, rest = await read_head(stream)
        status = status_of(head)
        if status != 101:
            raise HandshakeRefused(status, head)
        ws = RawWS(stream, header_value(head, "Sec-WebSocket-Protocol"), head)
        if rest:
            ws.parser.feed(rest)
        return ws
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One plain HTTP/1.1 request (``Connection: close``); returns ``(status, body)``."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
            lines.append("Content-Type: application/json")
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        chunks = []
        while data := await stream.receive_some(65536):
            chunks.append(data)
    response = b"".join(chunks)
    head, _sep, rest = response.partition(b"\r\n\r\n")
    return status_of(head), rest


__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "HandshakeRefused",
    "RawWS",
    "connect",
    "header_value",
    "http_request",
    "read_head",
    "status_of",
    "upgrade_request",
]
