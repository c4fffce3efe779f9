"""Plain HTTP on the WebSocket port: reading a request head with h11, and answering it.

Endpoints: ``GET /health`` (JSON status), ``GET /metrics`` (Prometheus), ``POST /_broadcast``
(publications, bearer key when configured); the SSE and long-polling endpoints are the
transports' (``transports/sse.py``, ``transports/longpoll.py``), routed by the node.  Anything
else gets a clear 404, or 426 on a WebSocket path without an upgrade; a malformed request gets
400.  Every answer closes the
connection: these endpoints serve load balancers and back ends, not browsers, and one
request per connection keeps the code and the failure modes small.
"""

from __future__ import annotations

import hmac
import json
import socket
from dataclasses import dataclass, field
from http import HTTPStatus

import h11

from trio_cable.server.sockio import recv_some, send_all

MAX_HEAD_BYTES = 16 * 1024


class BadRequest(Exception):
    """The client's HTTP is malformed or too large; answer with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Response:
    """An HTTP answer; ``body`` is sent with a Content-Length."""

    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def text(
        cls, status: int, message: str, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        return cls(status, (message + "\n").encode(), headers=headers or [])

    @classmethod
    def json(cls, status: int, obj: object) -> Response:
        return cls(status, json.dumps(obj).encode(), "application/json")


async def read_request(sock: socket.socket, conn: h11.Connection) -> h11.Request | None:
    """Read a request head; ``None`` when the client hung up before sending one.  A head
    over :data:`MAX_HEAD_BYTES` is refused with 431, however it arrived (h11's own limit
    applies to heads still incomplete, so it alone let through heads a read happened to
    complete)."""
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(exc.error_status_hint, f"malformed HTTP request: {exc}") from None
        if event is h11.NEED_DATA:
            data = await recv_some(sock, 4096)
            received += len(data)
            try:
                conn.receive_data(data)
            except RuntimeError:  # data after the peer closed: treat as closed
                return None
            continue
        if isinstance(event, h11.Request):
            # What was received beyond the head (a body, WebSocket frames) is still buffered.
            if received - len(conn.trailing_data[0]) > MAX_HEAD_BYTES:
                raise BadRequest(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
            return event
        if isinstance(event, h11.ConnectionClosed):
            return None
        raise BadRequest(400, f"unexpected HTTP event {type(event).__name__}")


async def read_body(sock: socket.socket, conn: h11.Connection, limit: int) -> bytes:
    """Read the request body, refusing more than *limit* bytes with 413.  The caller bounds
    the time it may take.  A client that asked ``Expect: 100-continue`` is told to go on
    (curl waits a second for that before it sends the body)."""
    if conn.they_are_waiting_for_100_continue:
        await send_all(
            sock, conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
        )
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(400, f"malformed HTTP body: {exc}") from None
        if event is h11.NEED_DATA:
            data = await recv_some(sock, 65536)
            if not data:
                raise BadRequest(400, "connection closed in the middle of the body")
            conn.receive_data(data)
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > limit:
                raise BadRequest(413, f"body larger than {limit} bytes")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:
            raise BadRequest(400, "unexpected end of request")


async def send_response(
    sock: socket.socket, conn: h11.Connection | None, response: Response
) -> None:
    """Write *response* and leave the connection ready to be closed."""
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("connection", "close"),
        ("server", "trio_cable"),
        *response.headers,
    ]
    data: bytes
    if conn is not None and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
        try:
            data = b"".join(
                [
                    conn.send(
                        h11.Response(
                            status_code=response.status,
                            headers=headers,
                            reason=_reason(response.status),
                        )
                    )
                    or b"",
                    conn.send(h11.Data(data=response.body)) or b"",
                    conn.send(h11.EndOfMessage()) or b"",
                ]
            )
        except h11.LocalProtocolError:
            data = _raw_response(response.status, headers, response.body)
    else:
        data = _raw_response(response.status, headers, response.body)
    try:
        await send_all(sock, data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _raw_response(status: int, headers: list[tuple[str, str]], body: bytes) -> bytes:
    # Used when h11 refuses to serialize (e.g. after the client's request was malformed).
    head = f"HTTP/1.1 {status} {_reason(status).decode()}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("latin-1") + b"\r\n" + body


def bearer_ok(authorization: str | None, key: str | None) -> bool:
    """Check ``Authorization: Bearer <key>`` in constant time (no key configured: always ok)."""
    if not key:
        return True
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())
