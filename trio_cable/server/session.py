"""The Action Cable session of one client: the protocol's state machine on the server.

A session identifies its client (JWT, a restored session, or the application's connect
callback) and greets it, keeps its subscriptions, handles its commands strictly in arrival
order, serves history through the :class:`~trio_cable.server.history_gate.HistoryGate`, and
stores what a resumed session needs.  It is written against three narrow interfaces and
nothing else:

* a :class:`~trio_cable.server.transport.Transport` to write to (it never sees a socket or a
  frame, only the :class:`~trio_cable.server.transport.WireFormat` that frames its messages),
  and it is the transport's :class:`~trio_cable.server.transport.Receiver`;
* an :class:`~trio_cable.server.executor.Executor` that runs the application's part;
* a :class:`SessionNode`: the few services of the server node it lives on.

Every command is handled without awaiting where it can be (pings, pongs, plain-function
actions: the read reactor's fast path); the rest is returned as work for the transport's task,
which awaits it before the next command.  So a test can drive a session with a list standing
in for the transport, and the same session will serve the SSE and long-polling transports.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Protocol

import trio

from trio_cable.broker import Broker, HistoryEntry, HistoryUnavailable, SessionTooLarge
from trio_cable.channels import Channel, ConnectRequest
from trio_cable.config import Config
from trio_cable.identity import JWTIdentifier, TokenError, token_from_request
from trio_cable.metrics import Metrics
from trio_cable.protocol import cable
from trio_cable.protocol.cable import (
    BroadcastEncoder,
    Command,
    History,
    InvalidCommand,
    Join,
    Leave,
    Message,
    Ping,
    Pong,
    PresenceQuery,
    Subscribe,
    Unsubscribe,
    Whisper,
    decode_command,
    parse_action,
)
from trio_cable.protocol.codes import CloseCode, DisconnectReason
from trio_cable.protocol.handshake import Request
from trio_cable.server.admission import TokenBucket
from trio_cable.server.executor import Executor, Refused
from trio_cable.server.history_gate import HistoryGate
from trio_cable.server.hub import Hub
from trio_cable.server.presence import InfoAnswers
from trio_cable.server.transport import Transport, WireFormat, Work

__all__ = ["Session", "SessionNode"]

log = logging.getLogger("trio_cable.session")


# Over the command rate, a command is still decoded to be answered (a client waiting for its
# confirm must not hang) when it is this small: real subscribes and history requests are.
_DECODED_WHEN_LIMITED = 8192
# A command costs one token of the command budget per started 8 KiB (``>> 13``): decoding is
# linear in the size, so a client sending megabyte commands at the command rate would buy a
# hundred times the CPU of one sending real ones (the hostile benchmark measured 3 s of CPU per
# 6 s from one such connection).  Capped at the budget's burst, so a legitimate large message
# (up to --max-message-size) always passes eventually.
_BYTES_PER_TOKEN_SHIFT = 13

# Commands that do not end the wait for history after a restore: history itself, and the
# keepalives (a client answers the server's pings while its history requests are on the way).
_KEEPS_WAITING = (History, Ping, Pong)


class SessionNode(Protocol):
    """What a session needs from the server node it lives on."""

    @property
    def config(self) -> Config: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def hub(self) -> Hub: ...

    @property
    def broker(self) -> Broker: ...

    @property
    def executor(self) -> Executor: ...

    @property
    def jwt(self) -> JWTIdentifier | None:
        """The JWT verifier, when a JWT secret is configured."""
        ...

    def attach(self, session: Session) -> None:
        """The session's connection is open: count it."""

    def detach(self, session: Session) -> None:
        """The session's connection has ended: forget it."""

    def start_pinging(self, session: Session) -> None:
        """The client was welcomed: ping it from now on."""

    def session_changed(self, session: Session) -> None:
        """*session* changed: save it soon (ext protocols)."""

    async def take_over(self, sid: str) -> None:
        """Session *sid* was restored by a new connection: end the old one wherever it is
        still connected, so that one session has one live connection (and cannot be saved
        again by the old one, to be restored twice)."""

    async def broadcast(self, stream: str, data: Any) -> None:
        """Broadcast *data* to *stream* on every node."""

    @property
    def presence_answers(self) -> InfoAnswers:
        """The encoded presence ``info`` answers, shared by the node's sessions."""
        ...


class Session:
    """One client's Action Cable session (see the module docstring).

    Thousands live at once: slots, and the history gate exists only while history is pending.
    """

    __slots__ = (
        "_budget",
        "_busy",
        "_by_jwt",
        "_gate",
        "_pending_close",
        "app_state",
        "format",
        "identifiers",
        "ip",
        "last_pong",
        "node",
        "ping_interval",
        "remote",
        "request",
        "resumable",
        "sid",
        "subprotocol",
        "subscriptions",
        "transport",
        "welcomed",
    )

    def __init__(
        self,
        node: SessionNode,
        transport: Transport,
        wire: WireFormat,
        request: Request,
        sid: str,
        budget: TokenBucket,
        *,
        subprotocol: str = "",
        ip: str = "",
    ) -> None:
        """*budget* is the connection's command budget (the transport spends it on ping
        frames too)."""
        self.node = node
        self.transport = transport
        #: How this client's messages are encoded and framed.
        self.format = wire
        #: The handshake's request, until the client was identified (then None: its headers
        #: and query are a few hundred bytes, times every idle connection).
        self.request: Request | None = request
        self.remote = request.remote
        self.sid = sid
        self.subprotocol = subprotocol
        self.ip = ip
        self.identifiers: dict[str, Any] = {}
        self.subscriptions: dict[str, Channel] = {}
        #: The executor's state for this connection (None in-process; the RPC executor's
        #: env and connection state).
        self.app_state: Any = None
        self._budget = budget
        self._gate: HistoryGate | None = None
        self._by_jwt = False  # identified by a JWT (see session_data)
        # A close requested while a command is being handled waits for the command to end.
        self._busy = False
        self._pending_close: tuple[DisconnectReason | None, bool, int, int | None] | None = None
        self.ping_interval = node.config.ping_interval
        self.last_pong = trio.current_time()
        #: The client got its welcome (it was identified).
        self.welcomed = False
        #: False once the server ended the connection with ``reconnect: false``
        #: (unauthorized, remote, ...): such a session must not come back by resuming.
        self.resumable = True

    def __repr__(self) -> str:
        # Never the whole sid: one copied from a log would restore the session.
        return f"<Session sid={self.sid[:8]}.. {self.remote}>"

    @property
    def extended(self) -> bool:
        """AnyCable's extended protocol: resume, history, stream positions, pong commands."""
        return self.format.extended

    @property
    def is_open(self) -> bool:
        """True until the connection starts closing."""
        return self.transport.open

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the client's socket."""
        return self.transport.queued_bytes

    # -- sending -------------------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Encode and send an Action Cable message (through the history gate; written out
        rather than through send_frame: this is the path of every transmission)."""
        fmt = self.format
        frame = fmt.frame(fmt.codec.encode(message))
        gate = self._gate
        if gate is not None:
            if gate.hold(frame):
                self._gate_full()
            return
        self.transport.write(frame)

    def send_frame(self, frame: bytes) -> None:
        """Send a message framed in this session's format (through the history gate)."""
        gate = self._gate
        if gate is not None:
            if gate.hold(frame):
                self._gate_full()
            return
        self.transport.write(frame)

    def send_broadcast(self, frame: bytes, stream: str, offset: int | None) -> None:
        """Send the broadcast at *offset* of *stream* (the hub's path)."""
        gate = self._gate
        if gate is not None:
            if gate.hold(frame, stream, offset):
                self._gate_full()
            return
        self.transport.write(frame)

    def send_broadcasts(
        self, joined: bytes, frames: Sequence[tuple[bytes, int | None]], stream: str
    ) -> None:
        """Several broadcasts of *stream* at once (the hub's big fan-outs): *joined* is
        *frames* back to back, written in one go unless the history gate holds them."""
        if self._gate is not None:
            for frame, offset in frames:  # one at a time through the gate
                self.send_broadcast(frame, stream, offset)
            return
        self.transport.write(joined)

    def send_ping(self, frame: bytes) -> None:
        """Send a ping framed in this session's format.  Pings pass the history gate: they
        are ordered with nothing, and a client that hears none while it waits for history
        would take the connection for dead."""
        self.transport.write(frame)

    def _send_now(self, message: dict[str, Any]) -> None:
        """Send past the history gate (history itself, and its answers)."""
        fmt = self.format
        self.transport.write(fmt.frame(fmt.codec.encode(message)))

    def cork(self) -> bool:
        """See :meth:`Transport.cork` (the hub coalesces a tick's broadcasts)."""
        return self.transport.cork()

    def uncork(self) -> None:
        self.transport.uncork()

    # -- what channels ask of their host (channels.ChannelHost) --------------------------

    @property
    def settings(self) -> Config:
        """The server's configuration (channels read secrets from it)."""
        return self.node.config

    def transmit(self, identifier: str, message: Any) -> None:
        """Send a data message for one subscription."""
        self.node.metrics.transmissions_total += 1
        self.send(cable.data_message(identifier, message))

    def add_stream(self, identifier: str, stream: str) -> None:
        self.node.hub.add(stream, identifier, self)

    def remove_stream(self, identifier: str, stream: str) -> None:
        self.node.hub.remove(stream, identifier, self)

    async def broadcast(self, stream: str, data: Any) -> None:
        await self.node.broadcast(stream, data)

    # -- closing -------------------------------------------------------------------------

    def close(
        self,
        reason: DisconnectReason | None = None,
        *,
        reconnect: bool = True,
        code: int = CloseCode.NORMAL,
        reconnect_after_ms: int | None = None,
    ) -> None:
        """End the session: an Action Cable ``disconnect`` (when *reason* is given), then the
        transport's close.  A command being handled finishes (its reply included) first."""
        if not self.transport.open:
            return
        if self._busy:
            if self._pending_close is None:
                self._pending_close = (reason, reconnect, code, reconnect_after_ms)
            return
        self._gate = None  # nothing held goes out after the disconnect
        if not reconnect:
            self.resumable = False
        if reason is not None:
            self.node.metrics.inc_labeled("disconnect_reasons_total", str(reason))
            log.debug("%r: disconnect %s (reconnect: %s)", self, reason, reconnect)
            self._send_now(cable.disconnect(str(reason), reconnect, reconnect_after_ms))
        self.transport.close(code)

    def abort(self) -> None:
        """Drop the connection now, without a close handshake."""
        self.transport.abort()

    # -- Receiver: the connection's life -------------------------------------------------

    async def opened(self) -> None:
        """Identify the client (JWT, a restored session, the connect callback), then send
        ``welcome``; or refuse it."""
        node = self.node
        node.attach(self)
        config = node.config
        metrics = node.metrics
        req = self.request
        assert req is not None  # opened() comes first
        token = token_from_request(req.headers, req.subprotocols, req.query, param=config.jwt_param)
        token_identifiers: dict[str, Any] | None = None
        if token is not None and node.jwt is not None:
            try:
                token_identifiers = node.jwt.verify(token)
            except TokenError as exc:
                metrics.unauthorized_total += 1
                log.info("%r: JWT refused: %s", self, exc)
                self.close(DisconnectReason(exc.reason), reconnect=False)
                return
        if token_identifiers is None and config.enforce_jwt:
            # Also before a restore: a sid is no way around the login it replaces.
            metrics.unauthorized_total += 1
            log.info("%r: refused: no JWT (--enforce-jwt)", self)
            self.close(DisconnectReason.UNAUTHORIZED, reconnect=False)
            return
        request = ConnectRequest(
            path=req.path,
            query=req.query,
            headers=req.headers,
            remote=req.remote,
            subprotocol=self.subprotocol,
            sid=self.sid,
            target=req.target,
        )
        executor = node.executor
        self.app_state = executor.open(request, self)
        if self.extended:
            restore_sid = req.query.get("sid") or req.headers.get("x-anycable-restore-sid")
            if restore_sid and await self._restore(restore_sid, token_identifiers):
                return
        transmissions: Sequence[dict[str, Any]] = ()
        if token_identifiers is not None:
            self.identifiers = token_identifiers
            self._by_jwt = True
        else:
            outcome = await executor.connect(request, self)
            if isinstance(outcome, Refused):
                if outcome.reason is DisconnectReason.UNAUTHORIZED:
                    metrics.unauthorized_total += 1
                log.info("%r: refused by the connect callback (%s)", self, outcome.reason)
                self.close(
                    outcome.reason,
                    reconnect=outcome.reconnect,
                    code=outcome.code,
                    reconnect_after_ms=outcome.reconnect_after_ms,
                )
                return
            self.identifiers = outcome.identifiers
            transmissions = outcome.transmissions
        self.send(cable.welcome(self.sid))
        for message in transmissions:
            metrics.transmissions_total += 1
            self.send(message)
        self._welcomed()
        log.debug("%r: connected (%s) as %r", self, self.subprotocol, self.identifiers)
        if self.extended:
            await self.save_session()

    def _welcomed(self) -> None:
        self.welcomed = True
        self.node.start_pinging(self)  # (reads ?pi= from the request)
        self.request = None

    def farewell(self, reason: DisconnectReason) -> bytes | None:
        fmt = self.format
        return fmt.frame(fmt.codec.encode(cable.disconnect(str(reason), True)))

    async def closing(self) -> None:
        self.node.detach(self)
        # Saved before the socket closes: a client that reconnects at once must find it.
        if self.welcomed and self.extended:
            if self.resumable:
                await self.save_session()
            else:
                await self._forget_session()

    async def closed(self) -> None:
        await self._linger_presence()
        channels = list(reversed(self.subscriptions.values()))
        self.subscriptions.clear()
        for channel in channels:
            channel.stop_all_streams()
        await self.node.executor.disconnect(self, channels)
        log.debug("%r: disconnected", self)

    # -- commands ------------------------------------------------------------------------

    def receive(self, payload: bytes, binary: bool) -> Work | None:
        """Decode and handle one command; see :class:`~trio_cable.server.transport.Receiver`."""
        node = self.node
        metrics = node.metrics
        started = time.perf_counter()
        metrics.commands_total += 1
        # The budget is spent before decoding: decoding is the work a flood would buy.
        size = len(payload)
        budget = self._budget
        allowed = budget.take(
            trio.current_time(), min(1.0 + (size >> _BYTES_PER_TOKEN_SHIFT), budget.burst)
        )
        if not allowed and size > _DECODED_WHEN_LIMITED:
            # Over the rate, and too big to decode just to say no: dropped, counted.
            metrics.rate_limited_commands_total += 1
            log.info("%r: a %d-byte command dropped: over the command rate", self, size)
            return None
        try:
            command = decode_command(self.format.codec, payload)
        except InvalidCommand as exc:
            self._invalid(exc)
            return None
        if not allowed:
            metrics.rate_limited_commands_total += 1
            self._refuse_rate_limited(command)
            return None
        gate = self._gate
        if gate is not None and gate.awaiting and not isinstance(command, _KEEPS_WAITING):
            # The client does something else: it is not going to ask history first.
            self.release_gate()
        # Exact types: the command classes are never subclassed, and `type() is` is the
        # cheapest test on the path every message takes.
        kind = type(command)
        if kind is Message:
            return self._message(command, started)  # type: ignore[arg-type]
        if kind is Ping:
            self._send_now(cable.pong())  # a keepalive passes the history gate, as pings do
        elif kind is Pong:
            self.last_pong = trio.current_time()
        elif isinstance(command, Subscribe):
            return self._later(self._subscribe, command)
        elif isinstance(command, Unsubscribe):
            return self._later(self._unsubscribe, command)
        elif isinstance(command, History):
            return self._later(self._history, command.identifier, command.history)
        elif isinstance(command, Whisper):
            work = self._whisper(command)
            if work is not None:
                return work
        elif isinstance(command, (Join, Leave, PresenceQuery)):
            return self._later(self._presence_command, command)
        metrics.command_seconds.observe(time.perf_counter() - started)
        return None

    def _later(self, fn: Callable[..., Awaitable[None]], *args: Any) -> Work:
        """The rest of a command, for the transport's task to await."""
        return partial(self._run_command, fn, args)

    async def _run_command(self, fn: Callable[..., Awaitable[None]], args: tuple[Any, ...]) -> None:
        """Await one command's handling as the session's busy work (a close requested
        meanwhile waits for it), and time it."""
        self._busy = True
        started = time.perf_counter()
        try:
            await fn(*args)
        finally:
            self._busy = False
            self.node.metrics.command_seconds.observe(time.perf_counter() - started)
        if self._pending_close is not None:
            reason, reconnect, code, after = self._pending_close
            self._pending_close = None
            self.close(reason, reconnect=reconnect, code=code, reconnect_after_ms=after)

    def _invalid(self, exc: InvalidCommand) -> None:
        self.node.metrics.invalid_requests_total += 1
        if exc.identifier is not None:
            log.info("%r: invalid command for %s: %s", self, exc.identifier[:200], exc.reason)
            # Answered, not dropped: a client waiting for its answer must not hang.
            if exc.command == "subscribe":
                self.send(cable.reject_subscription(exc.identifier))
            elif exc.command == "history":
                self.node.metrics.history_rejected_total += 1
                self.send(cable.reject_history(exc.identifier))
            return
        log.info("%r: invalid request: %s", self, exc.reason)
        self.close(
            DisconnectReason.INVALID_REQUEST, reconnect=False, code=CloseCode.POLICY_VIOLATION
        )

    def _refuse_rate_limited(self, command: Command) -> None:
        # Answered, not dropped: a client waiting for a confirm must not hang.
        if isinstance(command, Subscribe):
            if command.identifier not in self.subscriptions:
                self._reject(command.identifier, "over the command rate")
        elif isinstance(command, History):
            self.node.metrics.history_rejected_total += 1
            self.send(cable.reject_history(command.identifier))
        elif isinstance(command, PresenceQuery):
            error = cable.presence_info(0, error=True)
            self.send(cable.presence_message(command.identifier, error))
        else:
            log.info(
                "%r: %s refused: over %s commands/s",
                self,
                command.name,
                self.node.config.command_rate,
            )

    def _message(self, command: Message, started: float) -> Work | None:
        channel = self.subscriptions.get(command.identifier)
        if channel is None:
            log.info("%r: message for unknown %r", self, command.identifier[:200])
            return None
        try:
            action, data = parse_action(command.data)
        except InvalidCommand as exc:
            self.node.metrics.invalid_requests_total += 1
            log.info("%r: bad message data: %s", self, exc.reason)
            return None
        node = self.node
        executor = node.executor
        done = executor.perform_now(channel, action, data)
        if done is True:
            node.metrics.command_seconds.observe(time.perf_counter() - started)
            return None
        if done is False:
            return self._later(executor.perform, channel, action, data)
        return self._later(done)

    def _reject(self, identifier: str, why: str) -> None:
        self.node.metrics.subscriptions_rejected_total += 1
        log.info("%r: subscription %s rejected: %s", self, identifier[:200], why)
        self.send(cable.reject_subscription(identifier))

    async def _subscribe(self, command: Subscribe) -> None:
        identifier = command.identifier
        if identifier in self.subscriptions:
            return  # Rails clients re-send subscribe until confirmed: not an error
        node = self.node
        limit = node.config.max_subscriptions
        if limit and len(self.subscriptions) >= limit:
            self._reject(identifier, f"over {limit} subscriptions")
            return
        try:
            name, params = cable.parse_identifier(identifier)
        except InvalidCommand as exc:
            self._reject(identifier, f"bad identifier: {exc.reason}")
            return
        channel = node.executor.channel(self, identifier, name, params)
        if channel is None:
            self._reject(identifier, f"unknown channel {name[:200]!r}")
            return
        # Registered before subscribed() runs so that transmit() and stream_from() work
        # inside it; a duplicate subscribe arriving meanwhile is ignored by the check above.
        self.subscriptions[identifier] = channel
        gate_here = command.history is not None and self.extended and self._gate is None
        if gate_here:
            # Broadcasts that arrive while subscribed() awaits must not overtake the history
            # the client asked for: they wait, and those the history covers are dropped.
            self._gate = HistoryGate(limit=node.config.max_send_queue)
        confirmed = await node.executor.subscribe(channel)
        if not confirmed or not self.transport.open:
            channel.stop_all_streams()
            self.subscriptions.pop(identifier, None)
            self._reject(identifier, "closing" if confirmed else "by the channel")
            if gate_here:
                self.release_gate()
            return
        node.metrics.subscriptions_total += 1
        log.debug("%r: subscribed to %s (%s)", self, identifier[:200], channel.streams)
        self.send(cable.confirm_subscription(identifier))
        if self.extended:
            node.session_changed(self)
        if command.history is not None and self.extended:
            await self._history(identifier, command.history)
        if command.presence is not None:
            await self._join(channel, command.presence["id"], command.presence.get("info"))
        # What the application's answer asked for that must follow the confirm.
        await node.executor.confirmed(channel)

    async def _unsubscribe(self, command: Unsubscribe) -> None:
        channel = self.subscriptions.pop(command.identifier, None)
        if channel is None:
            log.info("%r: unsubscribe from unknown %r", self, command.identifier[:200])
            return
        if self.extended:
            self.node.session_changed(self)
        await self.leave_presence(channel)
        await self._end_subscription(channel)

    async def _end_subscription(self, channel: Channel) -> None:
        channel.stop_all_streams()
        await self.node.executor.unsubscribe(channel)

    # -- whispers and presence -----------------------------------------------------------

    def _whisper(self, command: Whisper) -> Work | None:
        """A whisper goes to the subscription's whisper stream, every subscriber but this
        session, with no history; a subscription that may not whisper is ignored."""
        channel = self.subscriptions.get(command.identifier)
        stream = channel.whisper_stream if channel is not None else None
        if stream is None:
            self.node.metrics.whispers_ignored_total += 1
            log.debug("%r: whisper ignored for %s", self, command.identifier[:200])
            return None
        self.node.metrics.whispers_total += 1
        data = json.dumps(command.data)
        return self._later(self._publish_whisper, stream, data)

    async def _publish_whisper(self, stream: str, data: str) -> None:
        await self.node.broker.publish_transient(stream, data, exclude_socket=self.sid)

    async def _presence_command(self, command: Join | Leave | PresenceQuery) -> None:
        self.node.metrics.presence_commands_total += 1
        channel = self.subscriptions.get(command.identifier)
        if channel is None:
            log.info("%r: %s for unknown %r", self, command.name, command.identifier[:200])
            if isinstance(command, PresenceQuery):  # answered: a client waits for it
                error = cable.presence_info(0, error=True)
                self.send(cable.presence_message(command.identifier, error))
            return
        if isinstance(command, Join):
            await self._join(channel, command.id, command.info)
        elif isinstance(command, Leave):
            await self.leave_presence(channel)
        else:
            await self._presence_info(channel, command.return_records)

    async def _join(self, channel: Channel, pid: str, info: Any) -> None:
        """A client's join: only where the channel has a presence stream."""
        stream = channel.presence_stream
        if stream is None:
            self.node.metrics.presence_refused_total += 1
            log.info("%r: join refused for %s: no presence", self, channel.identifier[:200])
            return
        await self.join_presence(channel, stream, pid, info)

    async def join_presence(self, channel: Channel, stream: str, pid: str, info: Any) -> None:
        """Make *channel*'s subscription present on *stream* (see ChannelHost)."""
        if channel.presence is not None and channel.presence_stream != stream:
            await self.leave_presence(channel)  # an application moving it to another stream
        if channel.presence is not None and channel.presence[0] != pid:
            # One presence id per session and stream (AnyCable's rule).
            self.node.metrics.presence_refused_total += 1
            log.info("%r: join as %r refused: joined as another id", self, pid[:100])
            return
        channel.presence_stream = stream
        channel.presence = (pid, info)
        if self.extended:
            self.node.session_changed(self)
        try:
            await self.node.broker.presence_join(stream, self.sid, pid, info)
        except Exception:
            log.exception("%r: presence join on %r failed", self, stream[:200])

    async def leave_presence(self, channel: Channel) -> None:
        """End *channel*'s presence at once (an explicit leave or unsubscribe)."""
        if channel.presence is None or channel.presence_stream is None:
            return
        channel.presence = None
        if self.extended:
            self.node.session_changed(self)
        try:
            await self.node.broker.presence_leave(channel.presence_stream, self.sid)
        except Exception:
            log.exception("%r: presence leave failed", self)

    async def _presence_info(self, channel: Channel, return_records: bool) -> None:
        identifier = channel.identifier
        stream = channel.presence_stream
        if stream is None:
            self.node.metrics.presence_refused_total += 1
            self.send(cable.presence_message(identifier, cable.presence_info(0, error=True)))
            return
        try:
            total, records = await self.node.broker.presence_info(stream)
        except Exception:
            log.exception("%r: presence info of %r failed", self, stream[:200])
            self.send(cable.presence_message(identifier, cable.presence_info(0, error=True)))
            return
        answer = self.node.presence_answers.encoder(stream, total, records, return_records)
        fmt = self.format
        self.send_frame(fmt.frame(answer.encode(fmt.codec, identifier)))

    async def _linger_presence(self) -> None:
        """The connection ended: its presence lingers for --presence-ttl, so that a client
        back within it (resumed, or as a new session of the same id) makes no churn."""
        ttl = self.node.config.presence_ttl
        broker = self.node.broker
        for channel in self.subscriptions.values():
            stream = channel.presence_stream
            if channel.presence is not None and stream is not None:
                try:
                    if ttl > 0:
                        await broker.presence_linger(stream, self.sid, ttl)
                    else:  # no linger: gone at once
                        await broker.presence_leave(stream, self.sid)
                except Exception:
                    log.exception("%r: presence linger failed", self)

    async def _restore_presence(self, old_sid: str, channel: Channel, item: dict[str, Any]) -> None:
        """A restored subscription takes its presence over from the old session: joined as
        this session first, then the old record goes, so the id is held throughout and the
        stream hears nothing."""
        stream = channel.presence_stream
        presence = item.get("presence")
        if stream is None or not isinstance(presence, list) or len(presence) != 2:
            return
        pid, info = presence
        channel.presence = (str(pid), info)
        try:
            await self.node.broker.presence_join(stream, self.sid, str(pid), info)
            await self.node.broker.presence_leave(stream, old_sid)
        except Exception:
            log.exception("%r: presence of %r not restored", self, stream[:200])

    # -- history -------------------------------------------------------------------------

    async def _history(self, identifier: str, request: dict[str, Any]) -> None:
        """Send the stored messages a client missed, then ``confirm_history``; or only
        ``reject_history`` when any of them cannot be served (never a silent gap)."""
        node = self.node
        channel = self.subscriptions.get(identifier)
        if channel is None or not self.extended:
            node.metrics.history_rejected_total += 1
            self._history_answered(identifier, cable.reject_history(identifier))
            return
        gate = self._gate
        if gate is None:
            gate = self._gate = HistoryGate(limit=node.config.max_send_queue)
        else:
            # What waits that is not a broadcast (transmissions, confirm_subscription, pings)
            # goes out now, before the history; only broadcasts keep waiting.
            for frame in gate.take_unicasts():
                self.transport.write(frame)
        positions = request.get("streams") or {}
        since = request.get("since")
        try:
            entries: list[tuple[str, HistoryEntry]] = []
            # Only the subscription's own streams: a client cannot read others' history.
            for stream in list(channel.streams):
                position = positions.get(stream)
                if position is not None:
                    found = await node.broker.history_since_offset(
                        stream, position["epoch"], position["offset"]
                    )
                elif since is not None:
                    found = await node.broker.history_since_time(stream, since)
                else:
                    continue
                entries.extend((stream, entry) for entry in found)
        except HistoryUnavailable as exc:
            log.info("%r: history for %s refused: %s", self, identifier[:200], exc)
            node.metrics.history_rejected_total += 1
            self._history_answered(identifier, cable.reject_history(identifier))
            return
        except Exception:
            log.exception("%r: history lookup failed", self)
            node.metrics.history_rejected_total += 1
            self._history_answered(identifier, cable.reject_history(identifier))
            return
        # A live copy of what the history holds may still wait in the hub's fan-out queue,
        # addressed to this connection (the broker's read barrier saw it delivered to the
        # hub, not written): it must reach the gate, which drops it, before the gate opens.
        await node.hub.written()
        # Several streams: interleave by publication time; one stream stays in offset order.
        entries.sort(key=lambda item: (item[1].time, item[0], item[1].offset))
        fmt = self.format
        for stream, entry in entries:
            encoder = BroadcastEncoder(
                entry.data, stream_id=stream, epoch=entry.epoch, offset=entry.offset
            )
            self.transport.write(fmt.frame(encoder.encode(fmt.codec, identifier)))
            gate.sent_as_history(stream, entry.offset)
        node.metrics.history_served_total += 1
        self._history_answered(identifier, cable.confirm_history(identifier))

    def _history_answered(self, identifier: str, answer: dict[str, Any]) -> None:
        self._send_now(answer)
        gate = self._gate
        if gate is not None and gate.answered(identifier):
            self.release_gate()

    def _gate_full(self) -> None:
        log.info(
            "%r: %d bytes held for history: sending them without waiting",
            self,
            self._gate.held_bytes if self._gate else 0,
        )
        self.release_gate()

    def release_gate(self) -> None:
        """Send what the history gate held (minus what history delivered) and stop holding."""
        gate, self._gate = self._gate, None
        if gate is not None:
            for frame in gate.release():
                self.transport.write(frame)

    # -- resumable sessions (ext protocols) ----------------------------------------------

    def session_data(self) -> dict[str, Any]:
        """Everything a resumed session needs, as plain data a broker can store."""
        data: dict[str, Any] = {
            "identifiers": self.identifiers,
            # Identified by a JWT: only a valid token of the same identity restores it.
            "jwt": self._by_jwt,
            "subscriptions": [
                {
                    "identifier": identifier,
                    "channel": type(channel).name(),
                    "params": channel.params,
                    "streams": list(channel.streams),
                    "state": channel._state or {},
                    **_channel_extras(channel),
                }
                for identifier, channel in self.subscriptions.items()
            ],
        }
        # The executor's connection state (the RPC application's cstate...), if any.
        app = self.node.executor.saved(self.app_state)
        if app is not None:
            data["app"] = app
        return data

    async def save_session(self) -> None:
        """Store this session under its sid (ext protocols only)."""
        if not self.extended:
            return
        try:
            await self.node.broker.save_session(
                self.sid, self.session_data(), self.node.config.sessions_ttl
            )
        except SessionTooLarge as exc:
            # Not kept (an older, smaller copy would restore it wrong): the client gets a
            # fresh connect on its next visit.
            self.node.metrics.sessions_too_large_total += 1
            log.info("%r: session not kept: %s", self, exc)
            await self._forget_session()
        except Exception:
            log.exception("%r: could not save the session", self)

    async def _forget_session(self) -> None:
        try:
            await self.node.broker.take_session(self.sid)
        except Exception:
            log.exception("%r: could not drop the session", self)

    async def _restore(self, old_sid: str, token_identifiers: dict[str, Any] | None) -> bool:
        """Restore identifiers and subscriptions of *old_sid* without any callback.

        A client that also presents a JWT must present the session's own identity: a stolen
        sid is not a way to become somebody else."""
        node = self.node
        try:
            data = await node.broker.take_session(old_sid)
        except Exception:
            log.exception("%r: could not read session %s", self, old_sid[:8])
            data = None
        if not isinstance(data, dict):
            node.metrics.sessions_not_found_total += 1
            log.debug("%r: no session %s to restore", self, old_sid[:8])
            return False
        identifiers = dict(data.get("identifiers") or {})
        by_jwt = bool(data.get("jwt"))
        if (token_identifiers is not None and token_identifiers != identifiers) or (
            by_jwt and token_identifiers is None
        ):
            why = "another identity" if token_identifiers is not None else "a JWT, not shown"
            log.warning("%r: session %s needs %s: not restored", self, old_sid[:8], why)
            node.metrics.sessions_not_found_total += 1
            # Put back: a failed attempt must not cost the owner its session.
            try:
                await node.broker.save_session(old_sid, data, node.config.sessions_ttl)
            except Exception:
                log.exception("%r: could not put session %s back", self, old_sid[:8])
            return False
        await node.take_over(old_sid)
        self.identifiers = identifiers
        self._by_jwt = by_jwt
        self.app_state = node.executor.resume(self.app_state, data.get("app"))
        limit = node.config.max_subscriptions or 1 << 30
        restored: list[str] = []
        for item in data.get("subscriptions") or []:
            if len(self.subscriptions) >= limit:
                break
            identifier = item["identifier"]
            channel = node.executor.channel(
                self, identifier, item.get("channel", ""), dict(item.get("params") or {})
            )
            if channel is None:
                continue
            channel.state = dict(item.get("state") or {})
            for stream in item.get("streams") or []:
                channel.stream_from(stream)
            channel.whisper_stream = item.get("w")
            channel.presence_stream = item.get("p")
            self.subscriptions[identifier] = channel
            restored.append(identifier)
            await self._restore_presence(old_sid, channel, item)
        node.metrics.sessions_resumed_total += 1
        self.send(cable.welcome(self.sid, restored_ids=restored))
        if restored:
            # Live broadcasts wait for the history the client is about to ask, so that it
            # gets every message once and in order.
            self._gate = HistoryGate(restored, node.config.max_send_queue)
        log.debug("%r: restored %s with %d subscriptions", self, old_sid[:8], len(restored))
        self._welcomed()
        await self.save_session()
        return True


def _channel_extras(channel: Channel) -> dict[str, Any]:
    """What a resumed subscription needs of its whispers and presence (only when set: most
    subscriptions have neither, and sessions are stored per connection)."""
    extras: dict[str, Any] = {}
    if channel.whisper_stream is not None:
        extras["w"] = channel.whisper_stream
    if channel.presence_stream is not None:
        extras["p"] = channel.presence_stream
    if channel.presence is not None:
        extras["presence"] = list(channel.presence)
    return extras
