"""The WebSocket transport: frames in, frames out, for one client after its handshake.

Reading: every complete frame of a received chunk is parsed (by ``_speedups``) and handed to
the receiver before the transport goes back to the scheduler, in arrival order.  An idle
connection parks its socket in the server's read reactor (``reactor.py``), which reads and
handles frames synchronously; the connection's own task wakes only for work that must await.

Writing is non-blocking: a frame goes straight to the kernel when the socket is writable and
is queued only when it is not; then a writer task drains the queue, coalescing queued frames
into one ``send``.  The queue is bounded in bytes; a client that lets it overflow is dropped
as ``too_slow``.  While *corked* (the hub's end-of-tick coalescing), writes collect in one
buffer that goes out in one ``send``.

The close handshake (RFC 6455 section 7) is the transport's too: :meth:`close` writes the
close frame after everything written before it and gives the client ``close_timeout`` to
answer; a client's close frame is answered and ends the connection.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from functools import partial

import trio

from trio_cable.metrics import Metrics
from trio_cable.protocol.cable import JSON, MSGPACK, Codec
from trio_cable.protocol.codes import COMPRESSED, CloseCode, DisconnectReason, FrameRefusal
from trio_cable.protocol.deflate import DeflateParams, InflateError, compressor, inflate
from trio_cable.protocol.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameParser,
    build_close,
    build_frame,
    close_code_and_reason,
    validate_utf8,
)
from trio_cable.server.admission import TokenBucket
from trio_cable.server.reactor import Reactor
from trio_cable.server.sockio import WOULD_BLOCK, WOULD_BLOCK_READ, close_socket
from trio_cable.server.transport import Receiver, WireFormat, Work

__all__ = ["State", "WebSocketContext", "WebSocketTransport", "wire_format"]

log = logging.getLogger("trio_cable.websocket")

# How many reads in a row, and how many bytes of messages, may be handled without yielding
# to other tasks: a client that floods us (or sends messages that are costly to decode) must
# not starve everybody else.
_READS_PER_CHECKPOINT = 16
_BYTES_PER_CHECKPOINT = 256 * 1024
# What _read_loop's recv gave instead of a byte count.
_WOULD_BLOCK = -1
_WANTS_WRITE = -2  # TLS must write before it can read
# Largest single send when draining a backlog (coalescing many small frames into one call).
_COALESCE_BYTES = 256 * 1024

# One interned format per (codec, extended): the hub and the ping ticker group by identity.
_FORMATS: dict[tuple[Codec, bool], WireFormat] = {
    (codec, extended): WireFormat(
        codec,
        extended,
        partial(build_frame, OP_BINARY if codec.binary else OP_TEXT),
        f"websocket-{'ext-' if extended else ''}{codec.name}",
    )
    for codec in (JSON, MSGPACK)
    for extended in (False, True)
}


def wire_format(codec: Codec, extended: bool) -> WireFormat:
    """The WebSocket format of a subprotocol: text frames for JSON, binary for msgpack."""
    return _FORMATS[(codec, extended)]


class _DeflatingFramer:
    """Frames a message for a connection that negotiated permessage-deflate: deflated (RSV1
    set) when it is at least the threshold long, else as a plain frame.  Called once per
    broadcast per audience group, like any framing function, so a broadcast is compressed
    once for every recipient of its group."""

    __slots__ = ("_compress", "_metrics", "_opcode", "_threshold")

    def __init__(self, opcode: int, params: DeflateParams, metrics: Metrics) -> None:
        self._opcode = opcode
        self._compress = compressor(params).compress
        self._threshold = params.threshold
        self._metrics = metrics

    def __call__(self, payload: bytes) -> bytes:
        if len(payload) < self._threshold:
            return build_frame(self._opcode, payload)
        # Deflated even when that makes it longer (random bytes grow by a few bytes): the
        # threshold alone decides, so a threshold of 0 compresses everything, which peers
        # that mishandle uncompressed messages on a compressed connection need.
        data = self._compress(payload)
        m = self._metrics
        m.compressed_frames_total += 1
        m.compression_saved_bytes_total += len(payload) - len(data)
        return build_frame(self._opcode, data, True, None, 4)  # RSV1


class State(Enum):
    OPEN = "open"  # handshake done, messages flow
    CLOSING = "closing"  # a close frame went out (or came in): nothing more is written
    CLOSED = "closed"  # close handshake finished, or the socket is gone


class PartialMessages:
    """The unfinished messages of every connection: how many bytes they hold together
    (bounded server-wide) and since when each has been waiting for its end.

    A client that sends the first fragments of a message, or the first half of a big frame,
    and never the rest, would otherwise hold that memory for as long as it stays connected;
    a hundred of them, a hundred megabytes."""

    __slots__ = ("_since", "bytes", "max_bytes", "timeout")

    def __init__(self, max_bytes: int, timeout: float) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        #: Bytes held by unfinished messages, all connections together.
        self.bytes = 0
        self._since: dict[WebSocketTransport, float] = {}

    def __len__(self) -> int:
        return len(self._since)

    def update(self, transport: WebSocketTransport, old: int, new: int) -> bool:
        """*transport* now holds *new* bytes of unfinished messages (it held *old*); True
        when that takes the server over its budget."""
        self.bytes += new - old
        if new == 0:
            self._since.pop(transport, None)
        elif transport not in self._since:
            self._since[transport] = trio.current_time()
        return new > old and self.bytes > self.max_bytes

    def expired(self, now: float) -> list[WebSocketTransport]:
        """The connections whose unfinished message is older than the timeout."""
        horizon = now - self.timeout
        return [t for t, since in self._since.items() if since < horizon]


@dataclass(eq=False, slots=True)
class WebSocketContext:
    """What every WebSocket transport of one server shares: settings, metrics, the read
    reactor (None: Trio's ``wait_readable`` path) and one receive buffer.

    One receive buffer serves every connection: reads copy into the frame parser before any
    await, so sharing it is safe and saves 256 KiB per connection."""

    metrics: Metrics
    reactor: Reactor | None
    max_message_size: int
    max_send_queue: int
    close_timeout: float
    partial: PartialMessages
    recv_buffer: bytearray
    recv_view: memoryview
    #: The compressing formats of this server, interned like the plain ones (they count
    #: into this server's metrics, so they are per server, not per process).
    _deflating: dict[tuple[Codec, bool, DeflateParams], WireFormat] = field(default_factory=dict)

    def wire_format(
        self, codec: Codec, extended: bool, deflate: DeflateParams | None = None
    ) -> WireFormat:
        """The format of a subprotocol, compressed with *deflate* when it was negotiated."""
        if deflate is None:
            return _FORMATS[(codec, extended)]
        key = (codec, extended, deflate)
        found = self._deflating.get(key)
        if found is None:
            plain = _FORMATS[(codec, extended)]
            opcode = OP_BINARY if codec.binary else OP_TEXT
            found = self._deflating[key] = WireFormat(
                codec,
                extended,
                _DeflatingFramer(opcode, deflate, self.metrics),
                f"{plain.name}-deflate{deflate.window_bits}",
            )
        return found

    @classmethod
    def create(
        cls,
        metrics: Metrics,
        reactor: Reactor | None,
        *,
        max_message_size: int,
        max_send_queue: int,
        close_timeout: float,
        message_timeout: float = 30.0,
        max_partial_memory: int = 64 << 20,
        recv_buffer_size: int = 256 * 1024,
    ) -> WebSocketContext:
        buffer = bytearray(recv_buffer_size)
        return cls(
            metrics,
            reactor,
            max_message_size,
            max_send_queue,
            close_timeout,
            PartialMessages(max_partial_memory, message_timeout),
            buffer,
            memoryview(buffer),
        )


class WebSocketTransport:
    """A client's WebSocket, from the end of the HTTP handshake to the closed socket.

    Thousands of these live at once, so the idle state is kept small: slots, and the send
    queue and its event exist only while they are in use.
    """

    __slots__ = (
        "_budget",
        "_cork",
        "_ctx",
        "_drained",
        "_in_reactor",
        "_initial",
        "_nursery",
        "_parked_task",
        "_parser",
        "_partial",
        "_pending",
        "_queue",
        "_queued_bytes",
        "_receiver",
        "_writer_running",
        "remote",
        "sock",
        "state",
        "tls",
    )

    def __init__(
        self,
        ctx: WebSocketContext,
        sock: socket.socket,
        budget: TokenBucket,
        initial_data: bytes = b"",
        *,
        remote: str = "",
        compression: bool = False,
    ) -> None:
        """*budget* is the connection's command budget: ping frames spend it too, so a ping
        flood gets no pongs, not our CPU.  *initial_data* is what arrived with the HTTP
        request, after its head.  *compression*: permessage-deflate was negotiated, so
        client messages may come compressed (the receiver's wire format compresses what
        goes out)."""
        self._ctx = ctx
        self.sock = sock
        self.remote = remote
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.state = State.OPEN
        self._budget = budget
        self._receiver: Receiver | None = None
        self._parser = FrameParser(ctx.max_message_size, compression=compression)
        self._partial = 0  # bytes the parser holds of an unfinished message (see PartialMessages)
        self._initial = initial_data
        self._queue: deque[bytes] | None = None  # only while the socket is backpressured
        self._queued_bytes = 0
        self._writer_running = False
        self._drained: trio.Event | None = None
        # While set, every write joins it (see cork()), so this socket's frames keep order.
        self._cork: list[bytes] | None = None
        self._nursery: trio.Nursery | None = None
        # The read fast path (see reactor.py): the parked task, if any, and what the reactor
        # could not finish synchronously, handed to the task: the receiver's work, or a
        # control frame that needs the task (a close).
        self._in_reactor = False
        self._parked_task: trio.lowlevel.Task | None = None
        self._pending: Work | tuple[int, bytes] | None = None

    def __repr__(self) -> str:
        return f"<WebSocket {self.remote} {self.state.value}>"

    # -- Transport -----------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.state is State.OPEN

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def write(self, data: bytes) -> None:
        if self.state is not State.OPEN:
            return  # nothing may follow our close frame (RFC 6455 5.5.1)
        if self._cork is not None:
            self._cork.append(data)
            return
        self._send(data)

    def cork(self) -> bool:
        if self._cork is not None:
            return False
        self._cork = []
        return True

    def uncork(self) -> None:
        cork = self._cork
        if cork is None:
            return
        self._cork = None
        if not cork or self.state is State.CLOSED:
            return  # closing or closed: nothing (more) joined it
        if len(cork) == 1:
            self._send(cork[0])
        else:
            self._ctx.metrics.coalesced_frames_total += len(cork) - 1
            self._send(b"".join(cork))

    def close(self, code: int) -> None:
        if self.state is not State.OPEN:
            return
        self.write(build_close(code))
        self.state = State.CLOSING
        # The whole connection gets close_timeout to finish the close handshake.
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = trio.current_time() + self._ctx.close_timeout

    def abort(self) -> None:
        self._lost()

    # -- writing -------------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        queue = self._queue
        if queue:
            queue.append(frame)
            self._queued_bytes += len(frame)
            if self._queued_bytes > self._ctx.max_send_queue:
                self._too_slow()
            return
        try:
            sent = self.sock.send(frame)
        except WOULD_BLOCK:
            sent = 0
        except OSError:
            self._lost()
            return
        if sent < len(frame):
            self._queue_rest(frame[sent:])

    def _queue_rest(self, rest: bytes) -> None:
        """The socket took part of a frame: queue the rest and start the writer."""
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        queue.append(rest)
        self._queued_bytes += len(rest)
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writer_running or self._nursery is None:
            return
        self._writer_running = True
        self._drained = trio.Event()
        self._nursery.start_soon(self._write_backlog)

    async def _write_backlog(self) -> None:
        queue = self._queue
        assert queue is not None
        try:
            while queue:
                await trio.lowlevel.wait_writable(self.sock)
                # Coalesce: one syscall for as many queued frames as fit in the batch.  Not
                # under TLS: OpenSSL wants a write it refused retried with the same bytes.
                chunk = [queue.popleft()]
                size = len(chunk[0])
                while queue and size < _COALESCE_BYTES and not self.tls:
                    size += len(queue[0])
                    chunk.append(queue.popleft())
                data = chunk[0] if len(chunk) == 1 else b"".join(chunk)
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
                self._queue = None  # back to the small idle state

    async def _flush(self) -> None:
        """Wait until the queue is written, at most ``close_timeout``."""
        self.uncork()
        if self._queue and self._drained is not None and self.state is not State.CLOSED:
            with trio.move_on_after(self._ctx.close_timeout):
                await self._drained.wait()

    def _too_slow(self) -> None:
        max_queue = self._ctx.max_send_queue
        log.info("%r: send queue over %d bytes: too_slow", self, max_queue)
        self._ctx.metrics.too_slow_total += 1
        self._cork = None
        self._queue = None
        self._queued_bytes = 0
        # Best effort: the socket is full, so the notice may not fit; the client then sees
        # the TCP connection end and reconnects anyway.
        notice = None
        if self._receiver is not None:
            notice = self._receiver.farewell(DisconnectReason.TOO_SLOW)
        for frame in (notice, build_close(CloseCode.POLICY_VIOLATION, "too slow")):
            if frame is None:
                continue
            try:
                self.sock.send(frame)
            except OSError:
                break
        self._lost()

    def _lost(self) -> None:
        """The socket is unusable: stop everything this connection does."""
        self.state = State.CLOSED
        self._cork = None
        if self._queue:
            self._queue.clear()
        self._queued_bytes = 0
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- the connection's life -----------------------------------------------------------

    async def run(self, receiver: Receiver) -> None:
        """Serve the connection with *receiver* until it closes; the socket is closed on
        return.  Errors end this connection only: a lost socket quietly, a bug with its
        traceback in the log."""
        self._receiver = receiver
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await receiver.opened()
                await self._read_loop()
                await self._flush()
                nursery.cancel_scope.cancel()
        except* OSError as group:
            log.debug("%r: socket error: %s", receiver, group.exceptions[0])
        except* Exception:
            # A bug must cost one connection, never the server.
            log.exception("%r: unexpected error", receiver)
        finally:
            self.state = State.CLOSED
            if self._partial:
                self._ctx.partial.update(self, self._partial, 0)
                self._partial = 0
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self._ctx.close_timeout
                if self._in_reactor and self._ctx.reactor is not None:
                    self._ctx.reactor.unregister(self)
                    self._in_reactor = False
                try:
                    await receiver.closing()
                    close_socket(self.sock)
                    await receiver.closed()
                finally:
                    # No reference cycles outlive a connection (receiver <-> transport, the
                    # nursery's scopes and tasks): a closed connection is freed by reference
                    # counting, and the collector never has to find it.
                    self._receiver = None
                    self._nursery = None
                    self._pending = None
                    self._parked_task = None

    async def _read_loop(self) -> None:
        sock = self.sock
        parser = self._parser
        buf = self._ctx.recv_buffer
        view = self._ctx.recv_view
        if self._initial:
            parser.feed(self._initial)
            self._initial = b""
            if await self._drain_parser():
                return
        reads = 0
        parkable = self._ctx.reactor is not None and not self.tls
        while True:
            # Wait outside the except clauses: a coroutine suspended inside one keeps the
            # exception and its traceback alive, two objects per idle connection for the
            # garbage collector to walk.
            try:
                n = sock.recv_into(buf)
            except WOULD_BLOCK_READ:
                n = _WOULD_BLOCK
            except ssl.SSLWantWriteError:
                n = _WANTS_WRITE
            except OSError:
                self.state = State.CLOSED
                return
            if n == _WOULD_BLOCK:
                reads = 0
                if not parkable:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                # Park: the socket waits in the reactor until it hands work back.  (Written
                # out here rather than as a coroutine of its own: one object less per idle
                # connection for the garbage collector.)
                if not self._in_reactor:
                    assert self._ctx.reactor is not None
                    self._ctx.reactor.register(self)
                    self._in_reactor = True
                self._parked_task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_park)
                # Woken: finish what the reactor handed over, then what it left parsed.
                if self._pending is not None and await self._resume_pending():
                    return
                if await self._drain_parser():
                    return
                continue
            if n == _WANTS_WRITE:
                await trio.lowlevel.wait_writable(sock)
                continue
            if n == 0:  # EOF without a close handshake
                self.state = State.CLOSED
                return
            # The buffer is shared by every connection: feed() copies before any await.
            parser.feed(view[:n])
            if await self._drain_parser():
                return
            if parser.pending != self._partial:
                self._track_partial()
            reads += 1
            if reads >= _READS_PER_CHECKPOINT:
                reads = 0
                await trio.lowlevel.checkpoint()

    async def _drain_parser(self) -> bool:
        """Handle every complete frame in the parser; True when the connection is done."""
        parser = self._parser
        handled = 0
        while True:
            try:
                message = parser.next_message()
            except FrameError as exc:
                self._ctx.metrics.invalid_requests_total += 1
                log.info("%r: protocol error %d: %s", self, exc.code, exc.reason)
                if self.state is State.OPEN:
                    self.write(build_close(exc.code, exc.reason[:100]))
                    self.state = State.CLOSING
                # Nothing more can be parsed: give the close frame a moment, then hang up.
                await self._flush()
                return True
            if message is None:
                return False
            if await self._handle_frame(*message):
                return True
            handled += len(message[1])
            if handled >= _BYTES_PER_CHECKPOINT:
                handled = 0
                await trio.lowlevel.checkpoint()

    async def _handle_frame(self, opcode: int, payload: bytes) -> bool:
        """Handle one message or control frame; True when the connection is done."""
        if opcode in (OP_TEXT, OP_BINARY):
            if self.state is not State.OPEN:
                return False  # after we sent close, data is discarded (RFC 6455 1.4)
            assert self._receiver is not None
            work = self._receiver.receive(payload, opcode == OP_BINARY)
            if work is not None:
                await work()
        elif opcode == OP_PING:
            # Pings share the command budget: a ping flood gets no pongs, not our CPU.
            if self.state is State.OPEN and self._budget.take(trio.current_time()):
                self.write(build_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            if self.state is State.OPEN:
                client_code, _reason = close_code_and_reason(payload)
                self.write(build_close(client_code))
                self.state = State.CLOSING
            return True
        elif opcode & COMPRESSED:
            # Compressed messages always come here (the reactor hands them over): inflating
            # may cost a millisecond, which the task's checkpoints keep fair.
            if self.state is not State.OPEN:
                return False
            inflated = self._inflate(opcode ^ COMPRESSED, payload)
            if inflated is None:
                await self._flush()
                return True
            return await self._handle_frame(opcode ^ COMPRESSED, inflated)
        # OP_PONG: nothing to do; liveness of ext clients is tracked by command pongs.
        return False

    def _inflate(self, opcode: int, payload: bytes) -> bytes | None:
        """A compressed client message, inflated and (text) validated; None when it was
        refused: then the close frame is written and the connection is closing."""
        try:
            inflated = inflate(payload, self._ctx.max_message_size)
            if opcode == OP_TEXT and not validate_utf8(inflated):
                raise InflateError(CloseCode.INVALID_PAYLOAD, FrameRefusal.TEXT_UTF8)
        except InflateError as exc:
            self._ctx.metrics.invalid_requests_total += 1
            log.info("%r: compressed message refused %d: %s", self, exc.code, exc.reason)
            self.write(build_close(exc.code, exc.reason))
            self.state = State.CLOSING
            return None
        self._ctx.metrics.compressed_messages_total += 1
        return inflated

    async def _resume_pending(self) -> bool:
        """Finish what the reactor handed over; True when the connection is done."""
        pending, self._pending = self._pending, None
        if isinstance(pending, tuple):
            return await self._handle_frame(*pending)
        if pending is not None:
            await pending()
        return False

    def _track_partial(self) -> None:
        """The parser's unfinished message grew or ended: tell the server-wide account, and
        close this connection when it takes the server over its budget."""
        pending = self._parser.pending
        over = self._ctx.partial.update(self, self._partial, pending)
        self._partial = pending
        if over and self.state is State.OPEN:
            log.info(
                "%r: unfinished messages over %d bytes server-wide: closing",
                self,
                self._ctx.partial.max_bytes,
            )
            self.write(build_close(CloseCode.TRY_AGAIN_LATER, "server busy"))
            self.state = State.CLOSING
            self._lost_later()

    def message_timeout(self) -> None:
        """This connection's unfinished message waited too long for its end (the node's
        ticker calls this)."""
        if self.state is State.OPEN:
            log.info("%r: an unfinished message waited too long: closing", self)
            self.write(build_close(CloseCode.POLICY_VIOLATION, "message timeout"))
            self.state = State.CLOSING
        self._lost_later()

    def _lost_later(self) -> None:
        """Give the close frame ``close_timeout`` to go out, then drop the connection (the
        client is not going to finish its message, so no close handshake is waited for)."""
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = min(
                self._nursery.cancel_scope.deadline,
                trio.current_time() + self._ctx.close_timeout,
            )

    # -- the read fast path (reactor) ------------------------------------------------------

    def _abort_park(self, _raise_cancel: object) -> trio.lowlevel.Abort:
        """A parked task is cancelled: the reactor must not wake it any more."""
        self._parked_task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _unpark(self) -> None:
        task, self._parked_task = self._parked_task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def on_readable(self, hangup: bool = False) -> None:
        """Called by the reactor: read and handle what arrived, synchronously, while that is
        possible; otherwise wake the connection's task with the rest.  *hangup*: the client's
        FIN came with this edge, so the socket must be read to its end now."""
        if self._parked_task is None:
            return  # the task is busy and will read until the socket is empty
        sock = self.sock
        parser = self._parser
        buf = self._ctx.recv_buffer
        view = self._ctx.recv_view
        handled = 0
        for _ in range(_READS_PER_CHECKPOINT):
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return  # stay parked: all handled
            except OSError:
                break  # the task finds the error again and ends
            if n == 0:
                break
            parser.feed(view[:n])
            while True:
                try:
                    message = parser.next_message()
                except FrameError:
                    self._unpark()  # the dead parser raises it again for the task
                    return
                if message is None:
                    break
                if not self._handle_now(*message):
                    self._unpark()
                    return
                handled += len(message[1])
                if handled >= _BYTES_PER_CHECKPOINT:
                    # Enough for one turn: the task goes on with the rest, yielding between.
                    self._unpark()
                    return
            if parser.pending != self._partial:
                self._track_partial()
            if n < len(buf) and not hangup:
                # A short read emptied the socket: with edge-triggered epoll, anything that
                # arrives from now on is a new edge, so the recv that would only say EAGAIN
                # can be skipped (one system call less per message of a small echo).  Not
                # after a hangup: the FIN that came with the data is no new edge, and the
                # end of the stream would be missed until the keepalive found it.
                return
        # End of stream, an error, or the read budget is spent: the task takes over (edge-
        # triggered epoll will not tell us again about data already waiting).
        self._unpark()

    def _handle_now(self, opcode: int, payload: bytes) -> bool:
        """Handle a frame without awaiting if possible; False hands the rest to the task
        (as ``_pending``)."""
        if opcode in (OP_TEXT, OP_BINARY):
            if self.state is not State.OPEN:
                return True  # discarded, as in _handle_frame
            assert self._receiver is not None
            work = self._receiver.receive(payload, opcode == OP_BINARY)
            if work is None:
                return True
            self._pending = work
            return False
        if opcode == OP_PING:
            if self.state is State.OPEN and self._budget.take(trio.current_time()):
                self.write(build_frame(OP_PONG, payload))
            return True
        if opcode == OP_PONG:
            return True
        self._pending = (opcode, payload)
        return False
