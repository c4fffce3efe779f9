"""Plain HTTP for the client's fallback transports: one request per connection (h11), and a
parser for ``text/event-stream``.

Small on purpose: the server answers every long poll and ends every event stream by closing
the connection, so there is no connection pool to keep, and no dependency to add.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import h11
import trio

__all__ = ["Event", "EventStreamParser", "HTTPResponse", "open_request", "request"]


@dataclass
class HTTPResponse:
    """A response head (headers lower-cased), with the body when it was read whole."""

    status: int
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Event:
    """One server-sent event."""

    data: str
    event: str = "message"
    id: str | None = None
    retry: int | None = None


@dataclass
class EventStreamParser:
    """The ``text/event-stream`` parser of the HTML standard (section 9.2.6), fed bytes.

    ``last_event_id`` persists across events, as ``EventSource``'s does; ``retry`` is the
    last reconnection time the server set, in ms."""

    last_event_id: str = ""
    retry: int | None = None
    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _retry: int | None = None

    def feed(self, data: bytes) -> list[Event]:
        """Parse *data*; return the events it completed."""
        events: list[Event] = []
        self._buffer += data
        while True:
            cut = min(
                (i for i in (self._buffer.find(b"\n"), self._buffer.find(b"\r")) if i >= 0),
                default=-1,
            )
            if cut < 0:
                return events
            if self._buffer[cut : cut + 2] == b"\r\n":
                line, self._buffer = self._buffer[:cut], self._buffer[cut + 2 :]
            elif self._buffer[cut : cut + 1] == b"\r" and cut + 1 == len(self._buffer):
                return events  # a CR that may yet be followed by its LF
            else:
                line, self._buffer = self._buffer[:cut], self._buffer[cut + 1 :]
            event = self._line(line.decode("utf-8", "replace"))
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (a keepalive)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self.retry = self._retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        data, kind, retry = self._data, self._event, self._retry
        self._data, self._event, self._retry = [], "", None
        if not data:
            return None
        return Event("\n".join(data), kind or "message", self.last_event_id or None, retry)


def _target(url: str) -> tuple[str, int, bool, str, str]:
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    host = parts.hostname or "localhost"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    authority = parts.netloc.rpartition("@")[2]
    return host, port, secure, target, authority


class HTTPConnection:
    """One request on its own connection; read its body whole or as it arrives."""

    def __init__(self, stream: trio.abc.Stream, conn: h11.Connection) -> None:
        self.stream = stream
        self.conn = conn

    async def _next(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(65536)
            self.conn.receive_data(bytes(data))  # b"" is the end of the stream

    async def head(self) -> HTTPResponse:
        while True:
            event = await self._next()
            if isinstance(event, h11.Response):
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                return HTTPResponse(event.status_code, headers)
            if isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection before answering")

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, until its end."""
        while True:
            event = await self._next()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                return

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_request(
    url: str,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> HTTPConnection:
    """Send a request and return its connection (read the answer with ``head`` and
    ``chunks``; close it with ``aclose``)."""
    host, port, secure, target, authority = _target(url)
    stream: trio.abc.Stream
    if secure:
        stream = await trio.open_ssl_over_tcp_stream(
            host, port, ssl_context=ssl_context or ssl.create_default_context()
        )
    else:
        stream = await trio.open_tcp_stream(host, port)
    conn = h11.Connection(h11.CLIENT)
    all_headers = [("host", authority), ("user-agent", "trio_cable"), *headers]
    if method in ("POST", "PUT") or body:
        all_headers.append(("content-length", str(len(body))))
    try:
        data = conn.send(h11.Request(method=method, target=target, headers=all_headers)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await stream.send_all(data)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return HTTPConnection(stream, conn)


async def request(
    url: str,
    method: str = "GET",
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    ssl_context: ssl.SSLContext | None = None,
) -> HTTPResponse:
    """One request, its answer read whole."""
    connection = await open_request(url, method, headers, body, ssl_context=ssl_context)
    try:
        response = await connection.head()
        response.body = b"".join([chunk async for chunk in connection.chunks()])
        return response
    finally:
        await connection.aclose()
