"""One WebSocket connection: a nursery, a reader task, and a writer task only when needed.

The reader parses every complete frame of a received chunk before it goes back to the
scheduler, and handles Action Cable commands strictly in arrival order (that is what makes
"linearized" subscriptions hold on the server side).  Writes are non-blocking: a frame goes
straight to the kernel when the socket is writable and is queued only when it is not; then a
writer task drains the queue, coalescing queued frames into one ``send``.  The queue is
bounded in bytes; a client that lets it overflow is disconnected as ``too_slow``.
"""

from __future__ import annotations

import inspect
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable
from enum import Enum
from typing import TYPE_CHECKING, Any

import trio

from trio_cable.broker import HistoryEntry, HistoryUnavailable
from trio_cable.channels import Channel, ConnectRequest, Unauthorized, maybe_await
from trio_cable.identity import TokenError, token_from_request
from trio_cable.protocol import cable
from trio_cable.protocol.cable import (
    BroadcastEncoder,
    Codec,
    Command,
    InvalidCommand,
    Subprotocol,
)
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
)
from trio_cable.protocol.handshake import Request
from trio_cable.server.admission import TokenBucket
from trio_cable.server.sockio import WOULD_BLOCK, WOULD_BLOCK_READ, close_socket

if TYPE_CHECKING:
    from trio_cable.server.node import Server

log = logging.getLogger("trio_cable.connection")

# Close codes (RFC 6455 section 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008

# How many reads in a row may be handled without yielding to other tasks: a client that
# floods us must not starve everybody else.
_READS_PER_CHECKPOINT = 16
# What _read_loop's recv gave instead of a byte count.
_WOULD_BLOCK = -1
_WANTS_WRITE = -2  # TLS must write before it can read
# Longest that live broadcasts wait after a restore for the client to ask history.
RESTORE_HOLD = 2.0
# Largest single send when draining a backlog (coalescing many small frames into one call).
_COALESCE_BYTES = 256 * 1024


class State(Enum):
    OPEN = "open"  # handshake done, messages flow
    CLOSING = "closing"  # we sent a close frame and wait for the client's
    CLOSED = "closed"  # close handshake finished, or the socket is gone


class Connection:
    """A client's WebSocket, from the end of the HTTP handshake to the closed socket.

    Thousands of these live at once, so the idle state is kept small: slots, and the send
    queue, its event and the history bookkeeping exist only while they are in use.
    """

    __slots__ = (
        "_awaiting_history",
        "_busy",
        "_commands",
        "_cork",
        "_drained",
        "_held",
        "_history_sent",
        "_in_reactor",
        "_initial",
        "_nursery",
        "_opcode",
        "_parked_task",
        "_parser",
        "_pending",
        "_pending_close",
        "_queue",
        "_queued_bytes",
        "_writer_running",
        "codec",
        "echo",
        "extended",
        "hold_until",
        "identifiers",
        "ip",
        "last_pong",
        "ping_interval",
        "request",
        "resumable",
        "server",
        "session_dirty",
        "sid",
        "sock",
        "state",
        "subprotocol",
        "subscriptions",
        "tls",
        "welcomed",
    )

    def __init__(
        self,
        server: Server,
        sock: socket.socket,
        request: Request,
        subprotocol: Subprotocol | None,
        sid: str,
        initial_data: bytes = b"",
        *,
        echo: bool = False,
        ip: str = "",
    ) -> None:
        self.server = server
        self.ip = ip
        self.sock = sock
        self.request = request
        self.subprotocol = subprotocol
        # The raw echo endpoint (framing tests) has no subprotocol; JSON is a placeholder.
        self.codec: Codec = subprotocol.codec if subprotocol else cable.JSON
        self._opcode = OP_BINARY if self.codec.binary else OP_TEXT
        self.sid = sid
        self.echo = echo
        self.tls = isinstance(sock, ssl.SSLSocket)
        #: Extended protocol: resume, history, stream positions on broadcasts, pong commands.
        self.extended = bool(subprotocol and subprotocol.extended)
        self.identifiers: dict[str, Any] = {}
        self.subscriptions: dict[str, Channel] = {}
        self.state = State.OPEN
        self.ping_interval: float = server.config.ping_interval
        self._parser = FrameParser(server.config.max_message_size)
        self._initial = initial_data
        self._queue: deque[bytes] | None = None  # only while the socket is backpressured
        # Frames that wait for the hub's end-of-tick flush (see Hub.deliver): while this is
        # set, every write joins it, so the connection's frames keep their order.
        self._cork: list[bytes] | None = None
        self._queued_bytes = 0
        self._writer_running = False
        self._drained: trio.Event | None = None
        self._nursery: trio.Nursery | None = None
        # The read fast path (see reactor.py): the parked task, if any, and the work the
        # reactor could not finish synchronously, handed to the task.
        self._in_reactor = False
        self._parked_task: trio.lowlevel.Task | None = None
        self._pending: tuple[Any, ...] | None = None
        # Frames sent while history is pending wait here as (frame, stream, offset), so that
        # history goes out first and live broadcasts it already covered are not sent twice.
        # History is pending while a lookup runs, and after a restore until the client has
        # asked history for each restored subscription (or RESTORE_HOLD seconds passed).
        self._held: list[tuple[bytes, str | None, int | None]] | None = None
        self._history_sent: dict[str, int] | None = None  # stream -> last offset as history
        self._awaiting_history: set[str] | None = None
        self.hold_until = 0.0
        # A close requested while a command is being handled waits for the command to end.
        self._busy = False
        self._pending_close: tuple[str | None, bool, int, int | None] | None = None
        self._commands = TokenBucket(
            server.config.command_rate, 2 * server.config.command_rate, trio.current_time()
        )
        self.last_pong = trio.current_time()
        #: The session changed since it was last saved (ext protocols only).
        self.session_dirty = False
        #: The client got its welcome (it was identified).
        self.welcomed = False
        #: False once the server ended the connection with ``reconnect: false``
        #: (unauthorized, remote, ...): such a session must not come back by resuming.
        self.resumable = True

    def __repr__(self) -> str:
        return f"<Connection sid={self.sid} {self.request.remote} {self.state.value}>"

    # -- ChannelHost ---------------------------------------------------------------------

    @property
    def settings(self) -> Any:
        """The server's :class:`~trio_cable.config.Config` (channels read secrets from it)."""
        return self.server.config

    def transmit(self, identifier: str, message: Any) -> None:
        """Send a data message for one subscription."""
        self.server.metrics.transmissions_total += 1
        self.send_message(cable.data_message(identifier, message))

    def add_stream(self, identifier: str, stream: str) -> None:
        self.server.hub.add(stream, identifier, self)

    def remove_stream(self, identifier: str, stream: str) -> None:
        self.server.hub.remove(stream, identifier, self)

    async def broadcast(self, stream: str, data: Any) -> None:
        await self.server.broadcast(stream, data)

    # -- sending -------------------------------------------------------------------------

    def send_message(self, message: dict[str, Any]) -> None:
        """Encode an Action Cable message with this connection's codec and send it."""
        self.send_frame(build_frame(self._opcode, self.codec.encode(message)))

    def send_frame(self, frame: bytes) -> None:
        """Write a ready frame without blocking; queue it if the socket is backpressured."""
        if self._held is not None:
            self._held.append((frame, None, None))
            return
        self._write(frame)

    def send_broadcast(self, frame: bytes, stream: str, offset: int | None) -> None:
        """Like :meth:`send_frame`, for a broadcast at *offset* of *stream* (the hub's path)."""
        if self._held is not None:
            self._held.append((frame, stream, offset))
            return
        self._write(frame)

    def cork(self) -> bool:
        """From now until :meth:`uncork`, every write joins the cork, so that the broadcasts
        of one scheduler tick reach this socket in one ``send``.  True when this started the
        cork: the caller must then call :meth:`uncork` soon."""
        if self._cork is not None:
            return False
        self._cork = []
        return True

    def uncork(self) -> None:
        """Send the corked frames in one write (a close frame among them included)."""
        cork = self._cork
        if cork is None:
            return
        self._cork = None
        if not cork or self.state is State.CLOSED:
            return  # held, closing or closed: nothing joined it
        if len(cork) == 1:
            self._send(cork[0])
        else:
            self.server.metrics.coalesced_frames_total += len(cork) - 1
            self._send(b"".join(cork))

    def _write(self, frame: bytes) -> None:
        if self.state is not State.OPEN:
            return  # nothing may follow our close frame (RFC 6455 5.5.1)
        if self._cork is not None:
            self._cork.append(frame)
            return
        self._send(frame)

    def _send(self, frame: bytes) -> None:
        queue = self._queue
        if queue:
            queue.append(frame)
            self._queued_bytes += len(frame)
            if self._queued_bytes > self.server.config.max_send_queue:
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
            with trio.move_on_after(self.server.config.close_timeout):
                await self._drained.wait()

    def _too_slow(self) -> None:
        log.info("%r: send queue over %d bytes: too_slow", self, self.server.config.max_send_queue)
        self.server.metrics.too_slow_total += 1
        self._cork = None
        self._queue = None
        self._queued_bytes = 0
        # Best effort: the socket is full, so the notice may not fit; the client then sees
        # the TCP connection end and reconnects anyway.
        for frame in (
            build_frame(self._opcode, self.codec.encode(cable.disconnect("too_slow", True))),
            build_close(CLOSE_POLICY, "too slow"),
        ):
            try:
                self.sock.send(frame)
            except OSError:
                break
        self._lost()

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the socket to become writable."""
        return self._queued_bytes

    def abort(self) -> None:
        """Drop the connection now, without a close handshake."""
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

    # -- closing -------------------------------------------------------------------------

    def close(
        self,
        reason: str | None = None,
        *,
        reconnect: bool = True,
        code: int = CLOSE_NORMAL,
        reconnect_after_ms: int | None = None,
    ) -> None:
        """Start a server-side close: an Action Cable ``disconnect`` message (when *reason* is
        given and this is an Action Cable connection), then a close frame; the connection
        ends when the client answers or ``close_timeout`` passes."""
        if self.state is not State.OPEN:
            return
        if self._busy:
            # Let the command being handled finish (its reply included) first.
            if self._pending_close is None:
                self._pending_close = (reason, reconnect, code, reconnect_after_ms)
            return
        self._held = None
        if not reconnect:
            self.resumable = False
        if reason is not None and not self.echo:
            self.server.metrics.inc_labeled("disconnect_reasons_total", reason)
            self._write(
                build_frame(
                    self._opcode,
                    self.codec.encode(cable.disconnect(reason, reconnect, reconnect_after_ms)),
                )
            )
        self._write(build_close(code))
        self.state = State.CLOSING
        # The whole connection gets close_timeout to finish the close handshake.
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = (
                trio.current_time() + self.server.config.close_timeout
            )

    # -- the connection's life -----------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes; the socket is closed on return."""
        server = self.server
        server.register(self)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if not self.echo:
                    await self._welcome()
                await self._read_loop()
                await self._flush()
                nursery.cancel_scope.cancel()
        finally:
            self.state = State.CLOSED
            server.unregister(self)
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + server.config.close_timeout
                # Saved before the socket closes: a client that reconnects at once must
                # find its session.
                if self._in_reactor and server.reactor is not None:
                    server.reactor.unregister(self)
                if self.welcomed and self.extended:
                    if self.resumable:
                        await self.save_session()
                    else:
                        await self._forget_session()
                close_socket(self.sock)
                await self._drop_subscriptions()

    async def _welcome(self) -> None:
        """Identify the client (JWT or the connect callback), then send ``welcome``."""
        server = self.server
        config = server.config
        req = self.request
        token = token_from_request(req.headers, req.subprotocols, req.query, param=config.jwt_param)
        token_identifiers: dict[str, Any] | None = None
        if token is not None and server.jwt is not None:
            try:
                token_identifiers = server.jwt.verify(token)
            except TokenError as exc:
                server.metrics.unauthorized_total += 1
                log.info("%r: JWT refused: %s", self, exc.reason)
                self.close(exc.reason, reconnect=False)
                return
        if self.extended:
            restore_sid = req.query.get("sid") or req.headers.get("x-anycable-restore-sid")
            if restore_sid and await self._restore(restore_sid, token_identifiers):
                return
        if token_identifiers is not None:
            self.identifiers = token_identifiers
        elif config.enforce_jwt:
            server.metrics.unauthorized_total += 1
            self.close("unauthorized", reconnect=False)
            return
        elif server.app.connect_callback is not None:
            info = ConnectRequest(
                path=req.path,
                query=req.query,
                headers=req.headers,
                remote=req.remote,
                subprotocol=self.subprotocol.name if self.subprotocol else "",
                sid=self.sid,
            )
            try:
                async with server.callback_limiter:
                    result = await maybe_await(server.app.connect_callback(info))
            except Unauthorized:
                result = False
            except Exception:
                log.exception("%r: connect callback raised", self)
                server.metrics.callback_errors_total += 1
                result = False
            if result is False:
                server.metrics.unauthorized_total += 1
                self.close("unauthorized", reconnect=False)
                return
            self.identifiers = dict(result or {})
        self.send_message(cable.welcome(self.sid))
        self._welcomed()
        server.start_pinging(self)
        if self.extended:
            await self.save_session()

    def _welcomed(self) -> None:
        self.welcomed = True
        # The headers served identification; a long-lived connection need not keep them
        # (a few hundred bytes each, times every idle connection).
        self.request.headers = {}

    # -- sessions (ext protocols) --------------------------------------------------------

    def session_data(self) -> dict[str, Any]:
        """Everything a resumed session needs, as plain data a broker can store."""
        return {
            "identifiers": self.identifiers,
            "subscriptions": [
                {
                    "identifier": identifier,
                    "channel": type(channel).name(),
                    "params": channel.params,
                    "streams": list(channel.streams),
                    "state": channel._state or {},
                }
                for identifier, channel in self.subscriptions.items()
            ],
        }

    async def save_session(self) -> None:
        """Store this connection's session under its sid (ext protocols only)."""
        if not self.extended:
            return
        self.session_dirty = False
        try:
            await self.server.broker.save_session(
                self.sid, self.session_data(), self.server.config.sessions_ttl
            )
        except Exception:
            log.exception("%r: could not save the session", self)

    async def _forget_session(self) -> None:
        try:
            await self.server.broker.take_session(self.sid)
        except Exception:
            log.exception("%r: could not drop the session", self)

    async def _restore(self, old_sid: str, token_identifiers: dict[str, Any] | None) -> bool:
        """Restore identifiers and subscriptions of *old_sid* without any callback.

        A client that also presents a JWT must present the session's own identity: a stolen
        sid is not a way to become somebody else."""
        server = self.server
        try:
            data = await server.broker.take_session(old_sid)
        except Exception:
            log.exception("%r: could not read session %s", self, old_sid[:64])
            data = None
        if not isinstance(data, dict):
            server.metrics.sessions_not_found_total += 1
            return False
        identifiers = dict(data.get("identifiers") or {})
        if token_identifiers is not None and token_identifiers != identifiers:
            log.warning("%r: session %s belongs to another identity", self, old_sid[:8])
            server.metrics.sessions_not_found_total += 1
            return False
        self.identifiers = identifiers
        restored: list[str] = []
        for item in data.get("subscriptions") or []:
            cls = server.lookup_channel(item.get("channel", ""))
            if cls is None or len(self.subscriptions) >= (
                server.config.max_subscriptions or 1 << 30
            ):
                continue
            identifier = item["identifier"]
            channel = cls(self, identifier, dict(item.get("params") or {}))
            channel.state = dict(item.get("state") or {})
            for stream in item.get("streams") or []:
                channel.stream_from(stream)
            self.subscriptions[identifier] = channel
            restored.append(identifier)
        server.metrics.sessions_resumed_total += 1
        self.send_message(cable.welcome(self.sid, restored_ids=restored))
        if restored:
            # Live broadcasts wait for the history the client is about to ask, so that it
            # gets every message once and in order.
            self._held = []
            self._awaiting_history = set(restored)
            self._history_sent = {}
            self.hold_until = trio.current_time() + RESTORE_HOLD
        self._welcomed()
        server.start_pinging(self)
        await self.save_session()
        return True

    async def _read_loop(self) -> None:
        sock = self.sock
        parser = self._parser
        buf = self.server.recv_buffer
        view = self.server.recv_view
        if self._initial:
            parser.feed(self._initial)
            self._initial = b""
            if await self._drain_parser():
                return
        reads = 0
        parkable = self.server.reactor is not None and not self.tls
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
                await self._park()
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
            reads += 1
            if reads >= _READS_PER_CHECKPOINT:
                reads = 0
                await trio.lowlevel.checkpoint()

    async def _drain_parser(self) -> bool:
        """Handle every complete frame in the parser; True when the connection is done."""
        parser = self._parser
        while True:
            try:
                message = parser.next_message()
            except FrameError as exc:
                self.server.metrics.invalid_requests_total += 1
                log.info("%r: protocol error %d: %s", self, exc.code, exc.reason)
                if self.state is State.OPEN:
                    self.send_frame(build_close(exc.code, exc.reason[:100]))
                    self.state = State.CLOSING
                # Nothing more can be parsed: give the close frame a moment, then hang up.
                await self._flush()
                return True
            if message is None:
                return False
            if await self._handle_frame(*message):
                return True

    async def _handle_frame(self, opcode: int, payload: bytes) -> bool:
        """Handle one message or control frame; True when the connection is done."""
        if opcode in (OP_TEXT, OP_BINARY):
            if self.state is not State.OPEN:
                return False  # after we sent close, data is discarded (RFC 6455 1.4)
            if self.echo:
                self.send_frame(build_frame(opcode, payload))
                return False
            await self._run_command(self._handle_command(payload))
        elif opcode == OP_PING:
            # Pings share the command budget: a ping flood gets no pongs, not our CPU.
            if self.state is State.OPEN and self._commands.take(trio.current_time()):
                self._write(build_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            if self.state is State.OPEN:
                client_code, _reason = close_code_and_reason(payload)
                self._write(build_close(client_code))
                self.state = State.CLOSING
            return True
        # OP_PONG: nothing to do; liveness of ext clients is tracked by command pongs.
        return False

    async def _run_command(self, work: Awaitable[None]) -> None:
        """Await one command's handling as the connection's busy work (a close requested
        meanwhile waits for it), and time it."""
        self._busy = True
        started = time.perf_counter()
        try:
            await work
        finally:
            self._busy = False
            self.server.metrics.observe("command_seconds", time.perf_counter() - started)
        if self._pending_close is not None:
            reason, reconnect, code, after = self._pending_close
            self._pending_close = None
            self.close(reason, reconnect=reconnect, code=code, reconnect_after_ms=after)

    # -- the read fast path (reactor) ------------------------------------------------------

    async def _park(self) -> None:
        """Wait, with the socket in the reactor, until the reactor hands work back."""
        if not self._in_reactor:
            assert self.server.reactor is not None
            self.server.reactor.register(self)
            self._in_reactor = True
        self._parked_task = trio.lowlevel.current_task()

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            self._parked_task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _unpark(self) -> None:
        task, self._parked_task = self._parked_task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def on_readable(self) -> None:
        """Called by the reactor: read and handle what arrived, synchronously, while that is
        possible; otherwise wake the connection's task with the rest."""
        if self._parked_task is None:
            return  # the task is busy and will read until the socket is empty
        sock = self.sock
        parser = self._parser
        buf = self.server.recv_buffer
        view = self.server.recv_view
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
                if not self._handle_sync(*message):
                    self._unpark()
                    return
            if n < len(buf):
                # A short read emptied the socket: with edge-triggered epoll, anything that
                # arrives from now on is a new edge, so the recv that would only say EAGAIN
                # can be skipped (one system call less per message of a small echo).
                return
        # End of stream, an error, or the read budget is spent: the task takes over (edge-
        # triggered epoll will not tell us again about data already waiting).
        self._unpark()

    def _handle_sync(self, opcode: int, payload: bytes) -> bool:
        """Handle a frame without awaiting if possible; False hands it to the task (as
        ``_pending``)."""
        if opcode in (OP_TEXT, OP_BINARY):
            if self.state is not State.OPEN:
                return True  # discarded, as in _handle_frame
            if self.echo:
                self._write(build_frame(opcode, payload))
                return True
            return self._command_sync(payload)
        if opcode == OP_PING:
            if self.state is State.OPEN and self._commands.take(trio.current_time()):
                self._write(build_frame(OP_PONG, payload))
            return True
        if opcode == OP_PONG:
            return True
        self._pending = ("frame", opcode, payload)
        return False

    def _command_sync(self, payload: bytes) -> bool:
        """The synchronous twin of :meth:`_handle_command` for the commands that need no
        await: pings, pongs, and actions that are plain functions."""
        server = self.server
        started = time.perf_counter()
        try:
            command = cable.decode_command(self.codec, payload)
        except InvalidCommand:
            self._pending = ("frame", OP_TEXT, payload)  # the task reports it
            return False
        server.metrics.commands_total += 1
        name = command.command
        if name == "message" and not self._awaiting_history:
            channel = self.subscriptions.get(command.identifier or "")
            if channel is None:
                self._pending = ("command", command)
                return False
            try:
                action, data = cable.parse_action(command.data)
            except InvalidCommand:
                self._pending = ("command", command)
                return False
            method = channel.sync_action(action)
            if method is None:
                self._pending = ("command", command)
                return False
            token = None
            if channel.app_callbacks:
                token = object()
                try:
                    server.callback_limiter.acquire_on_behalf_of_nowait(token)
                except trio.WouldBlock:
                    self._pending = ("command", command)
                    return False
            if not self._commands.take(trio.current_time()):
                server.metrics.rate_limited_commands_total += 1
                self._refuse_rate_limited(command)
            else:
                try:
                    result = method(data)
                except Exception:
                    log.exception("%r: %s.%s raised", self, type(channel).__name__, action)
                    server.metrics.callback_errors_total += 1
                    result = None
                if result is not None and inspect.isawaitable(result):
                    # A plain function that returned a coroutine: the task awaits it.
                    self._pending = ("await", result)
                    if token is not None:
                        server.callback_limiter.release_on_behalf_of(token)
                    return False
            if token is not None:
                server.callback_limiter.release_on_behalf_of(token)
            server.metrics.observe("command_seconds", time.perf_counter() - started)
            return True
        if name in ("ping", "pong") and not self._awaiting_history:
            if not self._commands.take(trio.current_time()):
                server.metrics.rate_limited_commands_total += 1
                self._refuse_rate_limited(command)
            elif name == "ping":
                self.send_message(cable.pong())
            else:
                self.last_pong = trio.current_time()
            return True
        self._pending = ("command", command)
        return False

    async def _resume_pending(self) -> bool:
        """Finish the work the reactor handed over; True when the connection is done."""
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        if pending[0] == "await":
            await self._run_command(_awaited(pending[1], self))
            return False
        if pending[0] == "command":
            if self.state is State.OPEN:
                await self._run_command(self._dispatch(pending[1]))
            return False
        _kind, opcode, payload = pending
        return await self._handle_frame(opcode, payload)

    # -- Action Cable commands -----------------------------------------------------------

    async def _handle_command(self, payload: bytes) -> None:
        server = self.server
        server.metrics.commands_total += 1
        try:
            command = cable.decode_command(self.codec, payload)
        except InvalidCommand as exc:
            server.metrics.invalid_requests_total += 1
            if exc.identifier is not None:
                log.info("%r: invalid command for %s: %s", self, exc.identifier, exc.reason)
                if getattr(exc, "command", None) == "subscribe":
                    self.send_message(cable.reject_subscription(exc.identifier))
                return
            log.info("%r: invalid request: %s", self, exc.reason)
            self.close("invalid_request", reconnect=False, code=CLOSE_POLICY)
            return
        await self._dispatch(command)

    async def _dispatch(self, command: Command) -> None:
        server = self.server
        name = command.command
        if self._awaiting_history and name != "history":
            # The client does something else: it is not going to ask history first.
            self.release_held()
        if not self._commands.take(trio.current_time()):
            server.metrics.rate_limited_commands_total += 1
            self._refuse_rate_limited(command)
            return
        if name == "subscribe":
            await self._subscribe(command)
        elif name == "message":
            await self._message(command)
        elif name == "unsubscribe":
            await self._unsubscribe(command)
        elif name == "ping":
            self.send_message(cable.pong())
        elif name == "history":
            assert command.identifier is not None
            await self._history(command.identifier, command.history or {})
        elif name == "pong":
            self.last_pong = trio.current_time()
        # "whisper": accepted and ignored.

    def _refuse_rate_limited(self, command: Command) -> None:
        # Answered, not dropped: a client waiting for a confirm must not hang.
        identifier = command.identifier
        if command.command == "subscribe" and identifier is not None:
            if identifier not in self.subscriptions:
                self._reject(identifier)
        elif command.command == "history" and identifier is not None:
            self.server.metrics.history_rejected_total += 1
            self.send_message(cable.reject_history(identifier))
        else:
            log.info(
                "%r: %s refused: over %s commands/s",
                self,
                command.command,
                self.server.config.command_rate,
            )

    async def _subscribe(self, command: Command) -> None:
        identifier = command.identifier
        assert identifier is not None
        if identifier in self.subscriptions:
            return  # Rails clients re-send subscribe until confirmed: not an error
        server = self.server
        limit = server.config.max_subscriptions
        if limit and len(self.subscriptions) >= limit:
            log.info("%r: over %d subscriptions", self, limit)
            self._reject(identifier)
            return
        try:
            channel_name, params = cable.parse_identifier(identifier)
        except InvalidCommand as exc:
            log.info("%r: bad identifier %r: %s", self, identifier[:200], exc.reason)
            self._reject(identifier)
            return
        cls = server.lookup_channel(channel_name)
        if cls is None:
            log.info("%r: unknown channel %r", self, channel_name[:200])
            self._reject(identifier)
            return
        channel = cls(self, identifier, params)
        # Registered before subscribed() runs so that transmit() and stream_from() work
        # inside it; a duplicate subscribe arriving meanwhile is ignored by the check above.
        self.subscriptions[identifier] = channel
        held_here = command.history is not None and self.extended and self._held is None
        if held_here:
            # Broadcasts that arrive while subscribed() awaits must not overtake the history
            # the client asked for: they wait, and those the history covers are dropped.
            self._held = []
        try:
            if cls.app_callbacks:
                async with server.callback_limiter:
                    await maybe_await(channel.subscribed())
            else:
                channel.subscribed()
        except Exception:
            log.exception("%r: %s.subscribed raised", self, cls.__name__)
            server.metrics.callback_errors_total += 1
            channel.rejected = True
        if channel.rejected or self.state is not State.OPEN:
            channel.stop_all_streams()
            self.subscriptions.pop(identifier, None)
            self._reject(identifier)
            if held_here:
                self.release_held()
            return
        server.metrics.subscriptions_total += 1
        self.send_message(cable.confirm_subscription(identifier))
        self.session_dirty = self.extended
        if command.history is not None and self.extended:
            await self._history(identifier, command.history)

    async def _history(self, identifier: str, request: dict[str, Any]) -> None:
        """Send the stored messages a client missed, then ``confirm_history``; or only
        ``reject_history`` when any of them cannot be served (never a silent gap)."""
        server = self.server
        channel = self.subscriptions.get(identifier)
        if channel is None or not self.extended:
            server.metrics.history_rejected_total += 1
            self._history_done(identifier, cable.reject_history(identifier))
            return
        positions = request.get("streams") or {}
        since = request.get("since")
        if self._held is None:
            self._held = []
        else:
            # What waits that is not a broadcast (transmissions, confirm_subscription, pings)
            # goes out now, before the history; only broadcasts keep waiting.
            keep = []
            for item in self._held:
                if item[1] is None:
                    self._write(item[0])
                else:
                    keep.append(item)
            self._held = keep
        try:
            entries: list[tuple[str, HistoryEntry]] = []
            # Only the subscription's own streams: a client cannot read others' history.
            for stream in list(channel.streams):
                position = positions.get(stream)
                if position is not None:
                    found = await server.broker.history_since_offset(
                        stream, position["epoch"], position["offset"]
                    )
                elif since is not None:
                    found = await server.broker.history_since_time(stream, since)
                else:
                    continue
                entries.extend((stream, entry) for entry in found)
        except HistoryUnavailable as exc:
            log.info("%r: history for %s refused: %s", self, identifier[:200], exc)
            server.metrics.history_rejected_total += 1
            self._history_done(identifier, cable.reject_history(identifier))
            return
        except Exception:
            log.exception("%r: history lookup failed", self)
            server.metrics.history_rejected_total += 1
            self._history_done(identifier, cable.reject_history(identifier))
            return
        # Several streams: interleave by publication time; one stream stays in offset order.
        entries.sort(key=lambda item: (item[1].time, item[0], item[1].offset))
        if self._history_sent is None:
            self._history_sent = {}
        sent = self._history_sent
        for stream, entry in entries:
            encoder = BroadcastEncoder(
                entry.data, stream_id=stream, epoch=entry.epoch, offset=entry.offset
            )
            self._write(build_frame(self._opcode, encoder.encode(self.codec, identifier)))
            if entry.offset > sent.get(stream, 0):
                sent[stream] = entry.offset
        server.metrics.history_served_total += 1
        self._history_done(identifier, cable.confirm_history(identifier))

    def _history_done(self, identifier: str, answer: dict[str, Any]) -> None:
        self._write(build_frame(self._opcode, self.codec.encode(answer)))
        if self._awaiting_history:
            self._awaiting_history.discard(identifier)
        if not self._awaiting_history:
            self.release_held()

    def release_held(self) -> None:
        """Send the frames that waited for history, minus broadcasts history already sent."""
        held, self._held = self._held or [], None
        sent, self._history_sent = self._history_sent or {}, None
        self._awaiting_history = None
        self.hold_until = 0.0
        for frame, stream, offset in held:
            if stream is not None and offset is not None and offset <= sent.get(stream, 0):
                continue  # the client got it as history
            self._write(frame)

    def _reject(self, identifier: str) -> None:
        self.server.metrics.subscriptions_rejected_total += 1
        self.send_message(cable.reject_subscription(identifier))

    async def _unsubscribe(self, command: Command) -> None:
        assert command.identifier is not None
        channel = self.subscriptions.pop(command.identifier, None)
        if channel is None:
            log.info("%r: unsubscribe from unknown %r", self, command.identifier[:200])
            return
        self.session_dirty = self.extended
        await self._end_subscription(channel)

    async def _message(self, command: Command) -> None:
        assert command.identifier is not None
        channel = self.subscriptions.get(command.identifier)
        if channel is None:
            log.info("%r: message for unknown %r", self, command.identifier[:200])
            return
        try:
            action, data = cable.parse_action(command.data)
        except InvalidCommand as exc:
            self.server.metrics.invalid_requests_total += 1
            log.info("%r: bad message data: %s", self, exc.reason)
            return
        try:
            if channel.app_callbacks:
                async with self.server.callback_limiter:
                    found = await channel.perform(action, data)
            else:
                found = await channel.perform(action, data)
        except Exception:
            log.exception("%r: %s.%s raised", self, type(channel).__name__, action)
            self.server.metrics.callback_errors_total += 1
            return
        if not found:
            log.info("%r: %s has no action %r", self, type(channel).__name__, action[:100])

    async def _end_subscription(self, channel: Channel) -> None:
        channel.stop_all_streams()
        try:
            if channel.app_callbacks:
                async with self.server.callback_limiter:
                    await maybe_await(channel.unsubscribed())
            else:
                await maybe_await(channel.unsubscribed())
        except Exception:
            log.exception("%r: %s.unsubscribed raised", self, type(channel).__name__)
            self.server.metrics.callback_errors_total += 1

    async def _drop_subscriptions(self) -> None:
        while self.subscriptions:
            _, channel = self.subscriptions.popitem()
            await self._end_subscription(channel)


async def _awaited(awaitable: Awaitable[Any], conn: Connection) -> None:
    try:
        await awaitable
    except Exception:
        log.exception("%r: an action's awaitable raised", conn)
        conn.server.metrics.callback_errors_total += 1
