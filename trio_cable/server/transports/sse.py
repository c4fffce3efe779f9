"""The Server-Sent Events transport: ``GET /events`` answered with a ``text/event-stream``.

An SSE client cannot send anything once its request is made, so the request says it all: the
subscription (``?stream=``, ``?signed_stream=``, ``?channel=`` with params, ``?identifier=``),
and, when the browser's ``EventSource`` reconnects, the position it had reached
(``Last-Event-ID``), which becomes the subscription's history request.  What follows is an
ordinary Action Cable :class:`~trio_cable.server.session.Session` on the extended protocol
(stream positions, history, resume): this module only turns the session's messages into
events and moves bytes, as the WebSocket transport moves frames.

Each message is one event (the format is anycable-go's)::

    event: welcome                 the message's "type", when it has one
    data: {"type":"welcome","sid":"..."}

    data: {"identifier":"...","message":{...},"stream_id":"chat","epoch":"e1","offset":7}
    id: 7/e1/chat                  a stored broadcast: <offset>/<epoch>/<stream>

    event: disconnect
    data: {"type":"disconnect","reason":"server_restart","reconnect":true,"reconnect_after":2100}
    retry: 2100                    the reconnect advice (a year when reconnect is false)

A client that has no position yet (no ``Last-Event-ID``) gets ``id: @<unix seconds>`` on its
confirm: should its connection drop before any broadcast reaches it, it comes back with that,
and gets the stream's history since then instead of nothing (anycable-go leaves that gap).

With ``?raw=1`` only the broadcasts' data is sent (no envelope, no protocol events), pings
become ``: ping`` comments, the confirm's id comes in an event without data (which sets
``EventSource``'s last id and dispatches nothing), and a disconnect is only its ``retry:``.

Until the subscription is answered nothing is written: the response head depends on it
(anycable-go answers 401 to a refused connection and 400 to a rejected subscription, so that
``EventSource`` gives up instead of retrying), and what the session wrote meanwhile (welcome,
confirm, history) follows the head.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import trio

from trio_cable.metrics import Metrics
from trio_cable.protocol.cable import JSON
from trio_cable.protocol.codes import DisconnectReason
from trio_cable.protocol.handshake import Request
from trio_cable.server.sockio import WOULD_BLOCK, close_socket, recv_some
from trio_cable.server.transport import Receiver, WireFormat

__all__ = [
    "BadQuery",
    "SSEContext",
    "SSETransport",
    "last_event_id",
    "refusal_event",
    "sse_format",
    "subscribe_command",
]

log = logging.getLogger("trio_cable.sse")

#: ``retry:`` for a disconnect without reconnect: a year, so that ``EventSource`` does not
#: come back (anycable-go's value).
RETRY_NEVER_MS = 31_536_000_000
_RETRY_NEVER_LINE = b"retry: %d" % RETRY_NEVER_MS
# How a rejected subscription starts, in either format (see _answer).
_REJECTED = (b"event: reject_subscription\n", b": reject_subscription\n")
_CONFIRMED = (b"event: confirm_subscription\n", b": confirm_subscription\n")
# Query parameters that are the transport's, not an application channel's params.
_RESERVED = frozenset(
    {"stream", "signed_stream", "turbo_signed_stream_name", "channel", "identifier", "raw"}
    | {"history_since", "sid", "pi", "jid", "last_event_id"}
)
_COALESCE_BYTES = 256 * 1024


class BadQuery(ValueError):
    """The request names no subscription, or names it badly (answered 400)."""


# -- events ----------------------------------------------------------------------------------


def _data_lines(text: bytes) -> list[bytes]:
    # A value may hold line breaks (a raw string broadcast): one data line per line, which
    # EventSource joins back with "\n".  Encoded JSON never does.
    if b"\n" not in text and b"\r" not in text:
        return [b"data: " + text]
    lines = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return [b"data: " + line for line in lines]


def _event_id(message: dict[str, Any]) -> bytes | None:
    offset, epoch, stream = message.get("offset"), message.get("epoch"), message.get("stream_id")
    if not isinstance(offset, int) or not isinstance(epoch, str) or not isinstance(stream, str):
        return None
    text = f"{offset}/{epoch}/{stream}"
    if "\n" in text or "\r" in text or "\0" in text or "/" in epoch:
        return None  # not a value EventSource could give back intact
    return b"id: " + text.encode()


def _retry(message: dict[str, Any]) -> bytes | None:
    if not message.get("reconnect", True):
        return _RETRY_NEVER_LINE
    after = message.get("reconnect_after")
    return b"retry: %d" % after if isinstance(after, int) and after >= 0 else None


def encode_event(payload: bytes) -> bytes:
    """An encoded Action Cable message (JSON) as one SSE event."""
    message = json.loads(payload)
    kind = message.get("type") if isinstance(message, dict) else None
    lines = [b"event: " + kind.encode()] if isinstance(kind, str) and kind.isidentifier() else []
    lines.append(b"data: " + payload)
    if kind is None:
        event_id = _event_id(message)
        if event_id is not None:
            lines.append(event_id)
    elif kind == "disconnect":
        retry = _retry(message)
        if retry is not None:
            lines.append(retry)
    return b"\n".join(lines) + b"\n\n"


def encode_raw_event(payload: bytes) -> bytes:
    """``?raw=1``: only a broadcast's data (a string as it is, anything else as JSON)."""
    message = json.loads(payload)
    if not isinstance(message, dict):
        return b""
    kind = message.get("type")
    if kind == "ping":
        return b": ping\n\n"
    if kind == "disconnect":
        retry = _retry(message)
        return retry + b"\n\n" if retry is not None else b""
    if kind == "reject_subscription":
        return b": reject_subscription\n\n"  # a comment, no event: the transport answers 400
    if kind == "confirm_subscription":
        return b": confirm_subscription\n\n"  # room for the transport's id (see write)
    if kind is not None or "message" not in message:
        return b""
    data = message["message"]
    text = data.encode() if isinstance(data, str) else json.dumps(data).encode()
    lines = _data_lines(text)
    event_id = _event_id(message)
    if event_id is not None:
        lines.append(event_id)
    return b"\n".join(lines) + b"\n\n"


# Interned, as every transport's formats are (the hub groups recipients by format identity).
_FORMATS = {
    raw: WireFormat(
        JSON, True, encode_raw_event if raw else encode_event, "sse-raw" if raw else "sse", False
    )
    for raw in (False, True)
}


def sse_format(raw: bool = False) -> WireFormat:
    """The SSE format: extended JSON (stream positions, history) made into events."""
    return _FORMATS[raw]


def refusal_event(reason: str, reconnect_after_ms: int) -> bytes:
    """The whole answer to an SSE client the server does not admit now (draining, busy):
    a disconnect event with its ``retry:``.  Sent with status 200, because ``EventSource``
    gives up for good on any other status, and reconnects when a 200 stream ends."""
    message = {
        "type": "disconnect",
        "reason": reason,
        "reconnect": True,
        "reconnect_after": reconnect_after_ms,
    }
    return encode_event(json.dumps(message).encode())


# -- the request -----------------------------------------------------------------------------


def _identifier(request: Request, jwt_param: str) -> str:
    query = request.query

    def compact(obj: dict[str, Any]) -> str:
        return json.dumps(obj, separators=(",", ":"))

    if query.get("identifier"):
        identifier = query["identifier"]
        try:
            decoded = json.loads(identifier)
        except ValueError:
            raise BadQuery("identifier is not JSON") from None
        if not isinstance(decoded, dict) or not isinstance(decoded.get("channel"), str):
            raise BadQuery("identifier must be a JSON object with a channel")
        return identifier
    if query.get("channel"):
        params = {k: v for k, v in query.items() if k not in _RESERVED and k != jwt_param}
        return compact({"channel": query["channel"], **params})
    if query.get("stream"):
        return compact({"channel": "$pubsub", "stream_name": query["stream"]})
    if query.get("signed_stream"):
        return compact({"channel": "$pubsub", "signed_stream_name": query["signed_stream"]})
    if query.get("turbo_signed_stream_name"):
        return compact(
            {
                "channel": "Turbo::StreamsChannel",
                "signed_stream_name": query["turbo_signed_stream_name"],
            }
        )
    raise BadQuery("name a subscription: stream, signed_stream, channel or identifier")


def _history(request: Request) -> dict[str, Any] | None:
    """The history to ask with the subscribe: from ``Last-Event-ID`` (where the client got
    to), else from ``?history_since=`` (unix seconds)."""
    history: dict[str, Any] = {}
    last_id = last_event_id(request)
    if last_id and last_id.startswith("@"):
        # The time of the confirm (see SSETransport.write): no broadcast came after it.  A
        # second earlier, as publication times are whole seconds on some nodes' clocks.
        if not last_id[1:].isdigit():
            raise BadQuery("Last-Event-ID is not @<unix seconds>")
        history["since"] = int(last_id[1:]) - 1
    elif last_id:
        offset, _, rest = last_id.partition("/")
        epoch, _, stream = rest.partition("/")
        if not (offset.isdigit() and epoch and stream):
            raise BadQuery("Last-Event-ID is not <offset>/<epoch>/<stream>")
        history["streams"] = {stream: {"epoch": epoch, "offset": int(offset)}}
    since = request.query.get("history_since")
    if since:
        try:
            # EventSource comes back with its first URL: the later of the two times wins.
            history["since"] = max(int(since), history.get("since", 0))
        except ValueError:
            raise BadQuery("history_since must be unix seconds") from None
    return history or None


def last_event_id(request: Request) -> str | None:
    """Where the client got to (``Last-Event-ID``, or ``?last_event_id=`` for clients that
    cannot set headers)."""
    return request.headers.get("last-event-id") or request.query.get("last_event_id") or None


def subscribe_command(request: Request, jwt_param: str = "jid") -> bytes:
    """The ``subscribe`` command an SSE request stands for (with history when it asks any);
    raises :class:`BadQuery`."""
    identifier = _identifier(request, jwt_param)
    command: dict[str, Any] = {"command": "subscribe", "identifier": identifier}
    history = _history(request)
    if history is not None:
        command["history"] = history
    return json.dumps(command).encode()


# -- the transport ---------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class SSEContext:
    """What every SSE transport of one server shares."""

    metrics: Metrics
    max_send_queue: int
    close_timeout: float


class State(Enum):
    OPEN = "open"
    CLOSING = "closing"  # nothing more is written; what was written goes out, then the end
    CLOSED = "closed"


class SSETransport:
    """One SSE client, from its request to the end of its event stream.

    The client sends nothing after its request (what it sends is discarded; its end of the
    connection closing ends the stream).  Writes are non-blocking and queued when the socket
    is full, bounded by ``max_send_queue`` (then ``too_slow``), as on WebSockets.
    """

    __slots__ = (
        "_backlog",
        "_commands",
        "_cork",
        "_ctx",
        "_done",
        "_drained",
        "_head",
        "_mark_confirm",
        "_nursery",
        "_queue",
        "_queued_bytes",
        "_receiver",
        "_tls",
        "_writer_running",
        "remote",
        "sock",
        "state",
    )

    def __init__(
        self,
        ctx: SSEContext,
        sock: socket.socket,
        commands: Sequence[bytes],
        head: list[tuple[str, str]],
        *,
        remote: str = "",
        mark_confirm: bool = False,
    ) -> None:
        """*commands* are handed to the receiver after it opened (the subscribe); *head* are
        the response's extra headers (CORS).  *mark_confirm*: the client has no position yet
        (no ``Last-Event-ID``), so the confirm carries one (see :meth:`write`)."""
        self._ctx = ctx
        self.sock = sock
        self.remote = remote
        self.state = State.OPEN
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._commands = list(commands)
        self._head = head
        self._mark_confirm = mark_confirm
        # What is written before the response head: the head's status depends on it.
        self._backlog: list[bytes] | None = []
        self._cork: list[bytes] | None = None
        self._queue: deque[bytes] | None = None
        self._queued_bytes = 0
        self._writer_running = False
        self._drained: trio.Event | None = None
        self._done = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._receiver: Receiver | None = None

    def __repr__(self) -> str:
        return f"<SSE {self.remote} {self.state.value}>"

    # -- Transport -----------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.state is State.OPEN

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def write(self, data: bytes) -> None:
        if self.state is not State.OPEN or not data:
            return
        if self._mark_confirm and data.startswith(_CONFIRMED):
            # A client without a position yet gets the time of its confirm as its event id:
            # if its connection drops before any broadcast (whose ids are positions), its
            # EventSource comes back with that, and gets what it missed since then.
            self._mark_confirm = False
            data = data[:-1] + b"id: @%d\n\n" % int(time.time())
        if self._backlog is not None:
            self._backlog.append(data)
        elif self._cork is not None:
            self._cork.append(data)
        else:
            self._send(data)

    def cork(self) -> bool:
        if self._cork is not None:
            return False
        self._cork = []
        return True

    def uncork(self) -> None:
        cork, self._cork = self._cork, None
        if cork and self.state is not State.CLOSED:
            self._send(cork[0] if len(cork) == 1 else b"".join(cork))

    def close(self, code: int) -> None:
        # *code* is a WebSocket notion; an event stream just ends (after what was written).
        if self.state is not State.OPEN:
            return
        self.state = State.CLOSING
        self._done.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = trio.current_time() + self._ctx.close_timeout

    def abort(self) -> None:
        self._lost()

    # -- writing -------------------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        queue = self._queue
        if queue:
            queue.append(data)
            self._queued_bytes += len(data)
            if self._queued_bytes > self._ctx.max_send_queue:
                self._too_slow()
            return
        try:
            sent = self.sock.send(data)
        except WOULD_BLOCK:
            sent = 0
        except OSError:
            self._lost()
            return
        if sent < len(data):
            if queue is None:
                queue = self._queue = deque()
            queue.append(data[sent:])
            self._queued_bytes += len(data) - sent
            if not self._writer_running and self._nursery is not None:
                self._writer_running = True
                self._drained = trio.Event()
                self._nursery.start_soon(self._write_backlog)

    async def _write_backlog(self) -> None:
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                await trio.lowlevel.wait_writable(self.sock)
                chunk = [queue.popleft()]
                size = len(chunk[0])
                # Not under TLS: OpenSSL wants a refused write retried with the same bytes.
                while queue and size < _COALESCE_BYTES and not self._tls:
                    size += len(queue[0])
                    chunk.append(queue.popleft())
                data = b"".join(chunk)
                try:
                    sent = self.sock.send(data)
                except WOULD_BLOCK:
                    sent = 0
                except OSError:
                    self._lost()
                    return
                self._queued_bytes -= sent
                if sent < len(data):
                    queue.appendleft(data[sent:])
        except trio.ClosedResourceError:
            return
        finally:
            self._writer_running = False
            if self._drained is not None:
                self._drained.set()
            if not queue and self._queue is queue:
                self._queue = None

    def _too_slow(self) -> None:
        log.info("%r: send queue over %d bytes: too_slow", self, self._ctx.max_send_queue)
        self._ctx.metrics.too_slow_total += 1
        notice = self._receiver.farewell(DisconnectReason.TOO_SLOW) if self._receiver else None
        if notice:
            # Best effort: the event can only follow a whole event already sent, which the
            # full queue does not say; a client that gets half of one sees a broken event
            # and reconnects all the same.
            with contextlib.suppress(OSError):
                self.sock.send(b"\n\n" + notice)
        self._lost()

    def _lost(self) -> None:
        self.state = State.CLOSED
        self._cork = None
        if self._queue:
            self._queue.clear()
        self._queued_bytes = 0
        self._done.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- the connection's life -----------------------------------------------------------

    async def run(self, receiver: Receiver) -> None:
        """Serve the stream with *receiver* until either side ends it; the socket is closed on
        return."""
        self._receiver = receiver
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await receiver.opened()
                commands, self._commands = self._commands, []
                for command in commands:
                    if self.state is not State.OPEN:
                        break
                    work = receiver.receive(command, False)
                    if work is not None:
                        await work()
                if self._answer():
                    nursery.start_soon(self._read_until_eof)
                    await self._done.wait()
                await self._flush()
                nursery.cancel_scope.cancel()
        except* OSError as group:
            log.debug("%r: socket error: %s", receiver, group.exceptions[0])
        except* Exception:
            log.exception("%r: unexpected error", receiver)
        finally:
            self.state = State.CLOSED
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self._ctx.close_timeout
                try:
                    await receiver.closing()
                    close_socket(self.sock)
                    await receiver.closed()
                finally:
                    self._receiver = None
                    self._nursery = None

    def _answer(self) -> bool:
        """Write the response head and what waited for it; True when the stream goes on."""
        backlog, self._backlog = self._backlog or [], None
        status, reason = 200, "OK"
        if any(frame.startswith(_REJECTED) for frame in backlog):
            status, reason = 400, "Bad Request"  # the subscription was rejected
        elif self.state is not State.OPEN and any(_RETRY_NEVER_LINE in f for f in backlog):
            status, reason = 401, "Unauthorized"  # refused, not to come back
        headers = [
            ("content-type", "text/event-stream; charset=utf-8"),
            ("cache-control", "no-cache, no-store"),
            ("x-accel-buffering", "no"),  # nginx: do not buffer the stream
            ("connection", "close"),
            ("server", "trio_cable"),
            *self._head,
        ]
        head = f"HTTP/1.1 {status} {reason}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        self._send(head.encode("latin-1") + b"\r\n" + b"".join(backlog))
        if status != 200 and self.state is State.OPEN:
            self.state = State.CLOSING
        return self.state is State.OPEN

    async def _read_until_eof(self) -> None:
        # The client has nothing to say; its side closing (EOF, reset) ends the stream.
        while await recv_some(self.sock, 4096):
            pass
        if self.state is State.OPEN:
            self.state = State.CLOSED
        self._done.set()

    async def _flush(self) -> None:
        """Write what is queued (at most ``close_timeout``), then end the stream."""
        self.uncork()
        if self._queue and self._drained is not None and self.state is not State.CLOSED:
            with trio.move_on_after(self._ctx.close_timeout):
                await self._drained.wait()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
