"""The Trio runtime of the client: one background task that connects, reconnects with backoff,
and keeps every subscription alive across connections.  Built on trio-websocket.

::

    async with open_cable("ws://localhost:8080/cable") as cable:
        chat = await cable.subscribe("ChatChannel", {"room": "lobby"})
        await chat.perform("speak", {"text": "hi"})
        async for message in chat:
            print(message.data)

Protocol decisions live in :mod:`trio_cable.client.state` (sans-I/O) and reconnect delays in
:mod:`trio_cable.client.backoff` (pure); this module only does I/O and timing.
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import jwt
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
)

from trio_cable.client import state as proto
from trio_cable.client.backoff import Backoff, BackoffTimer, parse_retry_after
from trio_cable.client.longpoll import LongPollConnection, connect_long_poll, poll_url_for
from trio_cable.client.websocket import connect as connect_websocket
from trio_cable.protocol.codes import DisconnectReason

__all__ = [
    "Cable",
    "CableClosed",
    "CableError",
    "CableEvent",
    "Message",
    "MessagesDropped",
    "MessagesMissing",
    "SubscribeTimeout",
    "Subscription",
    "SubscriptionRejected",
    "open_cable",
]

log = logging.getLogger("trio_cable.client")

TokenProvider = Callable[[], "str | Awaitable[str]"]

# HTTP statuses worth retrying: the server is busy or restarting (or a proxy in front of it
# is).  Any other refusal (403 origin, 404 path, 400 subprotocol, 401) will not change by
# retrying, so the client stops at once instead of hammering the server.
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_DEFAULT_PING_INTERVAL = 3.0
#: How the cable reaches the server: WebSocket only, long polling only, or WebSocket falling
#: back to long polling when its handshake keeps failing (``fallback_after`` times in a row).
Transport = Literal["websocket", "long_poll", "auto"]
# Failures of one connection attempt that a later attempt may not have.
_CONNECT_ERRORS = (HandshakeError, OSError, trio.TooSlowError, ConnectionClosed)


# -- errors ------------------------------------------------------------------------------------


class CableError(Exception):
    """Base class of the client's errors."""


class CableClosed(CableError):
    """The cable is closed for good and will not reconnect.

    ``reason`` is the server's disconnect reason (``unauthorized``, ``token_expired``, ...) or
    one of the client's: ``closed`` (the program closed it), ``max_attempts`` (reconnect
    attempts exhausted), ``refused`` (a handshake refusal that retrying cannot fix),
    ``protocol_error``.  ``status`` is the HTTP status of a refused handshake.
    """

    def __init__(self, reason: str, message: str = "", *, status: int | None = None) -> None:
        super().__init__(f"cable closed: {reason}" + (f" ({message})" if message else ""))
        self.reason = str(reason)
        self.status = status


class SubscriptionRejected(CableError):
    """The server rejected the subscription (``reject_subscription``)."""

    def __init__(self, identifier: str) -> None:
        super().__init__(f"subscription rejected: {identifier}")
        self.identifier = identifier


class SubscribeTimeout(CableError):
    """No answer to ``subscribe`` within the timeout, twice (the retry included)."""

    def __init__(self, identifier: str, timeout: float) -> None:
        super().__init__(f"no answer to subscribe within {timeout} s (twice): {identifier}")
        self.identifier = identifier


class MessagesDropped(CableError):
    """Raised once by a subscription whose buffer overflowed: ``count`` messages that arrived
    while it was full were dropped at this point of the sequence.  Iteration can go on."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} message(s) dropped: subscription buffer full")
        self.count = count


class MessagesMissing(CableError):
    """Raised once by a subscription where messages of a reliable stream will not come:
    offsets ``first`` to ``last`` of ``stream_id`` in ``epoch``.  The subscription held the
    messages after them, asked ``history`` for the gap and gave up: ``reason`` is
    ``not_in_history`` (the history did not have them), ``history_rejected``, ``timeout`` (not
    filled within ``gap_timeout``), ``hold_limit`` (more than ``hold_limit`` messages held) or
    ``epoch_changed`` (the stream's history was lost meanwhile).  Iteration can go on: the next
    message is the one after the gap."""

    def __init__(self, stream_id: str, epoch: str, first: int, last: int, reason: str) -> None:
        super().__init__(
            f"messages {first}..{last} of stream {stream_id!r} (epoch {epoch!r}) missing: {reason}"
        )
        self.stream_id = stream_id
        self.epoch = epoch
        self.first = first
        self.last = last
        self.reason = reason

    @property
    def count(self) -> int:
        """How many messages are missing."""
        return self.last - self.first + 1


# -- observability -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CableEvent:
    """Something the cable did, for logs, metrics and benchmarks.

    ``time`` is ``trio.current_time()``.  Kinds: ``connecting`` (an attempt starts; ``attempt``
    counts consecutive attempts from 1), ``connected`` (welcome; ``sid``, ``restored``),
    ``connect_failed`` (``error``, ``status``, ``delay`` = Retry-After), ``disconnected``
    (``reason``, ``reconnect``, ``delay`` = reconnect_after), ``stale`` (no ping in time),
    ``reconnect_scheduled`` (``delay``, ``attempt`` = the attempt it precedes), ``subscribe_sent``,
    ``subscribed`` (``restored`` when the server restored it without a subscribe), ``rejected``,
    ``subscribe_timeout``, ``history_requested`` (``reason`` = ``gap`` when asked to fill a gap
    of a reliable stream), ``history_confirmed``, ``history_rejected``, ``duplicate``,
    ``messages_missing`` (``reason``, ``error`` = the :class:`MessagesMissing`), ``overflow``,
    ``token_refreshed``, ``fallback`` (WebSocket handshakes kept failing: from now on long
    polling; ``attempt`` = the failures), ``closed``.
    """

    kind: str
    time: float
    attempt: int | None = None
    delay: float | None = None
    reason: str | None = None
    reconnect: bool | None = None
    status: int | None = None
    sid: str | None = None
    restored: bool | None = None
    identifier: str | None = None
    error: BaseException | None = None


@dataclass(frozen=True)
class Message:
    """A message received on a subscription.  Stored broadcasts (reliable streams) carry their
    position: ``stream_id``, ``epoch`` and ``offset``."""

    data: Any
    stream_id: str | None = None
    epoch: str | None = None
    offset: int | None = None


# -- subscriptions -------------------------------------------------------------------------------


@dataclass
class _Gap:
    count: int


class _Mailbox:
    """A subscription's bounded buffer.  The connection's reader never waits for a consumer
    (that would stall every other subscription and the ping watchdog): when the buffer is full
    new messages are dropped and the consumer gets :class:`MessagesDropped` at that point."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: deque[Message | _Gap | MessagesMissing] = deque()
        self.dropped = 0
        self.closed = False
        self.error: BaseException | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def put(self, item: Message) -> bool:
        """Buffer ``item``; False when it was dropped because the buffer is full."""
        if self.closed:
            return True  # nobody will read it: not an overflow
        if len(self.items) >= self.capacity:
            self.dropped += 1
            last = self.items[-1] if self.items else None
            if isinstance(last, _Gap):
                last.count += 1
            else:
                self.items.append(_Gap(1))  # one marker past capacity, then coalesced
            self._lot.unpark_all()
            return False
        self.items.append(item)
        self._lot.unpark_all()
        return True

    def notice(self, missing: MessagesMissing) -> None:
        """Mark a gap of a reliable stream at this point: the consumer gets ``missing`` raised
        here.  Kept even when the buffer is full (a notice is small, and bounded by the holds
        it ends)."""
        if not self.closed:
            self.items.append(missing)
            self._lot.unpark_all()

    def close(self, error: BaseException | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.error = error
            self._lot.unpark_all()

    async def get(self) -> Message:
        await trio.lowlevel.checkpoint()
        while not self.items:
            if self.closed:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            await self._lot.park()
        item = self.items.popleft()
        if isinstance(item, _Gap):
            raise MessagesDropped(item.count)
        if isinstance(item, MessagesMissing):
            raise item
        return item


class Subscription:
    """A subscription: ``async for message in sub`` (each a :class:`Message`), ``perform``,
    ``unsubscribe``.

    It survives reconnections: the cable re-subscribes (or resumes) it.  Stored broadcasts
    (reliable streams) arrive in offset order, each once, per stream: one that comes before
    its turn is held while ``history`` fetches the gap (see :class:`MessagesMissing` for gaps
    that cannot be filled).  Messages wait in a buffer of ``buffer_size``; see
    :class:`MessagesDropped` for what happens when it is full.  Iteration ends after
    :meth:`unsubscribe`, and raises :class:`CableClosed`, :class:`SubscriptionRejected` or
    :class:`SubscribeTimeout` when the subscription ends for those reasons.
    """

    def __init__(self, cable: Cable, sub_state: proto.SubState, buffer_size: int) -> None:
        self._cable = cable
        self._state = sub_state
        self._mailbox = _Mailbox(buffer_size)
        self._settled = trio.Event()
        self._error: BaseException | None = None

    def __repr__(self) -> str:
        return f"<Subscription {self.identifier} {self.status}>"

    @property
    def identifier(self) -> str:
        """The identifier string (``{"channel": ..., **params}``) as sent to the server."""
        return self._state.identifier

    @property
    def channel(self) -> str:
        return self._state.channel

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._state.params)

    @property
    def status(self) -> str:
        """``pending``, ``confirmed``, ``rejected`` or ``removed``."""
        return self._state.status

    @property
    def dropped(self) -> int:
        """Messages dropped because the buffer was full."""
        return self._mailbox.dropped

    @property
    def duplicates(self) -> int:
        """Stored broadcasts received twice (after a resume, or a gap's history) and dropped."""
        return self._state.duplicates

    def position(self, stream: str) -> tuple[str, int] | None:
        """(epoch, offset) of the last message of ``stream`` delivered to the buffer."""
        return self._state.position_of(stream)

    async def receive(self) -> Message:
        """The next message; raises ``StopAsyncIteration`` once unsubscribed."""
        return await self._mailbox.get()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Message:
        return await self._mailbox.get()

    async def perform(self, action: str, data: dict[str, Any] | None = None) -> None:
        """Call ``action`` on the server channel with ``data``.  Waits while the cable is
        reconnecting; raises once the subscription or the cable is closed."""
        await self._cable._send_for(
            self, proto.ClientSession.message_command(self.identifier, action, data)
        )

    async def whisper(self, data: Any) -> None:
        """Send a ``whisper`` (extended protocols) to the other subscribers of the stream."""
        await self._cable._send_for(
            self, proto.ClientSession.whisper_command(self.identifier, data)
        )

    async def unsubscribe(self) -> None:
        """Leave the subscription; iteration ends after the buffered messages."""
        await self._cable._unsubscribe(self)

    # -- driven by the cable ------------------------------------------------------------------

    def _confirmed(self) -> None:
        self._settled.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._settled.set()
        self._mailbox.close(error)

    def _end(self) -> None:
        self._settled.set()
        self._mailbox.close()


# -- the cable -----------------------------------------------------------------------------------


@dataclass
class _Outcome:
    """How one connection attempt ended."""

    welcomed: bool = False
    disconnect: proto.Disconnect | None = None
    error: BaseException | None = None
    status: int | None = None
    retry_after: float | None = None
    stale: bool = False
    fatal: CableClosed | None = None
    connected: bool = False  # the WebSocket handshake succeeded


@dataclass
class _Conn:
    """One live connection (a WebSocket, or a long-polling session) and what runs on it."""

    ws: WebSocketConnection | LongPollConnection
    nursery: trio.Nursery
    outcome: _Outcome
    queue_send: trio.MemorySendChannel[tuple[Subscription, dict[str, Any] | None]]
    queue_recv: trio.MemoryReceiveChannel[tuple[Subscription, dict[str, Any] | None]]
    last_seen: float
    welcomed: bool = False
    answers: dict[str, trio.Event] = field(default_factory=dict)


class Cable:
    """A client connection to an Action Cable / AnyCable server that reconnects by itself.

    Use :func:`open_cable` to create one; the constructor's arguments are documented there.
    """

    def __init__(
        self,
        url: str,
        *,
        subprotocol: str = "actioncable-v1-ext-json",
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        token_in: Literal["header", "query", "subprotocol"] = "header",
        token_param: str = "jid",
        backoff: Backoff | None = None,
        linearized: bool = True,
        subscribe_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        close_timeout: float = 1.0,
        ping_interval: float | None = None,
        stale_pings: float = 2.0,
        resume: bool = True,
        buffer_size: int = 10_000,
        hold_limit: int = 1000,
        gap_timeout: float = 10.0,
        headers: Sequence[tuple[str, str]] = (),
        on_event: Callable[[CableEvent], None] | None = None,
        rng: random.Random | None = None,
        max_message_size: int = 16 * 1024 * 1024,
        transport: Transport = "websocket",
        poll_url: str | None = None,
        fallback_after: int = 3,
        compression: bool = False,
    ) -> None:
        self.url = url
        if transport not in ("websocket", "long_poll", "auto"):
            raise ValueError(f"unknown transport {transport!r}")
        if transport != "websocket" and "msgpack" in subprotocol:
            raise ValueError("long polling speaks JSON: choose a JSON subprotocol")
        self.transport: Transport = transport
        self.poll_url = poll_url or poll_url_for(url)
        self.fallback_after = fallback_after
        #: WebSocket handshakes failed in a row (``auto`` falls back at ``fallback_after``).
        self.websocket_failures = 0
        self.session = proto.ClientSession(
            subprotocol, resume=resume, hold_limit=hold_limit, gap_timeout=gap_timeout
        )
        self.subprotocol = subprotocol
        self.token = token
        self.token_provider = token_provider
        self.token_in = token_in
        self.token_param = token_param
        self.backoff = backoff or Backoff()
        self.linearized = linearized
        self.subscribe_timeout = subscribe_timeout
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.ping_interval = ping_interval
        self.stale_timeout = stale_pings * (ping_interval or _DEFAULT_PING_INTERVAL)
        self.buffer_size = buffer_size
        self.headers = list(headers)
        self.on_event = on_event
        self.rng = rng or random.Random()
        self.max_message_size = max_message_size
        self.compression = compression
        self.timer: BackoffTimer = self.backoff.timer(self.rng)
        self._subs: dict[str, Subscription] = {}
        self._conn: _Conn | None = None
        self._changed = trio.Event()
        self._closed = trio.Event()
        self._close_error: CableClosed | None = None
        self._closing = False
        self._leaving: trio.Event | None = None  # set while the program closes the cable
        self._token_changed = trio.Event()
        self._holds_changed = trio.Event()  # wakes the gap timer: a hold may end earlier
        if buffer_size < 1:
            raise ValueError("buffer_size must be >= 1")
        if subscribe_timeout <= 0:
            raise ValueError("subscribe_timeout must be > 0")

    # -- public state -------------------------------------------------------------------------

    @property
    def sid(self) -> str | None:
        """The session id of the current connection (of the last one while reconnecting)."""
        return self.session.sid

    @property
    def connected(self) -> bool:
        """Whether a welcomed connection is up right now."""
        return self._conn is not None and self._conn.welcomed

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_error(self) -> CableClosed | None:
        """Why the cable closed (``None`` while open)."""
        return self._close_error

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs.values())

    async def wait_connected(self) -> None:
        """Wait for a welcomed connection; raises :class:`CableClosed` if the cable closes."""
        while not self.connected:
            self._check_open()
            await self._wait_change()

    async def wait_closed(self) -> CableClosed:
        """Wait until the cable closes for good and return why."""
        await self._closed.wait()
        assert self._close_error is not None
        return self._close_error

    # -- subscriptions ------------------------------------------------------------------------

    async def subscribe(self, channel: str, params: dict[str, Any] | None = None) -> Subscription:
        """Subscribe to ``channel`` with ``params`` and wait for the confirmation (across
        reconnections if need be).  Raises :class:`SubscriptionRejected`,
        :class:`SubscribeTimeout` or :class:`CableClosed`; ``ValueError`` if already subscribed.
        """
        self._check_open()
        sub_state = self.session.add(channel, params)
        sub = Subscription(self, sub_state, self.buffer_size)
        self._subs[sub.identifier] = sub
        conn = self._conn
        if conn is not None and conn.welcomed:
            conn.queue_send.send_nowait((sub, None))
        try:
            await sub._settled.wait()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._unsubscribe(sub)
            raise
        if sub._error is not None:
            raise sub._error
        return sub

    async def _unsubscribe(self, sub: Subscription) -> None:
        identifier = sub.identifier
        if self._subs.get(identifier) is not sub:
            sub._end()
            return
        was = sub._state.status
        del self._subs[identifier]
        self.session.remove(identifier)
        sub._end()
        self._notify()
        conn = self._conn
        if conn is not None and conn.welcomed and was in ("pending", "confirmed"):
            await self._send(conn, proto.ClientSession.unsubscribe_command(identifier))

    async def _send_for(self, sub: Subscription, command: dict[str, Any]) -> None:
        """Send a command of a subscription once it is confirmed on a live connection."""
        while True:
            if sub._error is not None:
                raise sub._error
            if self._subs.get(sub.identifier) is not sub:
                raise CableError(f"not subscribed: {sub.identifier}")
            self._check_open()
            conn = self._conn
            if conn is not None and conn.welcomed and sub._state.status == "confirmed":
                try:
                    await conn.ws.send_message(self.session.encode(command))
                    return
                except ConnectionClosed:
                    pass  # not sent: wait for the next connection and send it there
            await self._wait_change()

    # -- internals: bookkeeping ----------------------------------------------------------------

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            try:
                self.on_event(CableEvent(kind, trio.current_time(), **fields))
            except Exception:
                log.exception("on_event hook raised")

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    def _check_open(self) -> None:
        if self._close_error is not None:
            raise self._close_error

    def _close(self, error: CableClosed) -> None:
        if self._close_error is not None:
            return
        self._close_error = error
        for sub in list(self._subs.values()):
            sub._fail(error)
        self._subs.clear()
        self._closed.set()
        self._notify()
        self._emit("closed", reason=error.reason, status=error.status, error=error)

    async def _send(self, conn: _Conn, command: dict[str, Any]) -> bool:
        try:
            await conn.ws.send_message(self.session.encode(command))
            return True
        except ConnectionClosed:
            return False

    # -- internals: the reconnect loop --------------------------------------------------------

    async def _run(self, *, task_status: trio.TaskStatus[Cable] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, and reconnect until closed.  ``started`` at the first welcome; before that,
        a terminal failure is raised (so :func:`open_cable` raises it)."""
        started = False

        def on_welcome() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started(self)

        try:
            async with trio.open_nursery() as nursery:
                if self.token_provider is not None:
                    nursery.start_soon(self._token_refresher)
                # Holds end on time across reconnections too: the application is told.
                nursery.start_soon(self._gap_timer)
                await self._reconnect_loop(on_welcome)
                nursery.cancel_scope.cancel()
        except CableClosed as exc:
            self._close(exc)
            if not started:
                raise
        except BaseExceptionGroup as group:
            error = _single(group)
            if isinstance(error, CableClosed):
                self._close(error)
                if not started:
                    raise error from None
                return
            raise
        finally:
            if self._close_error is None:
                self._close(CableClosed("closed", "closed by the client"))

    async def _reconnect_loop(self, on_welcome: Callable[[], None]) -> None:
        timer = self.timer
        advice: float | None = None
        first = True
        while True:
            if not first:
                if timer.exhausted:
                    raise CableClosed(
                        "max_attempts", f"{timer.failures} connection attempts failed in a row"
                    )
                delay = timer.next_delay(advice)
                self._emit(
                    "reconnect_scheduled",
                    attempt=timer.failures + 1,
                    delay=delay,
                    reason="advice" if advice is not None else None,
                )
                await trio.sleep(delay)
            first = False
            if self.token_provider is not None and self.token is None:
                await self._refresh_token()
            outcome = await self._connect_once(timer.failures + 1, on_welcome)
            if outcome.fatal is not None:
                raise outcome.fatal
            advice = outcome.retry_after
            if outcome.welcomed:
                timer.succeeded()
            else:
                timer.failed()
            d = outcome.disconnect
            if d is not None:
                if d.reconnect_after is not None:
                    advice = d.reconnect_after
                if not d.reconnect:
                    if (
                        d.reason == DisconnectReason.TOKEN_EXPIRED
                        and self.token_provider is not None
                    ):
                        # The server ended that session on purpose: do not resume it (that
                        # would bring back the old identity); subscribe again, with history.
                        self.session.sid = None
                        await self._refresh_token(after_expiry=True)
                        continue
                    raise CableClosed(d.reason, "the server asked not to reconnect")

    async def _connect_once(self, attempt: int, on_welcome: Callable[[], None]) -> _Outcome:
        outcome = _Outcome()
        self._emit("connecting", attempt=attempt)
        try:
            async with trio.open_nursery() as nursery:
                await self._connection(nursery, outcome, on_welcome)
        except BaseExceptionGroup as group:
            # trio-websocket raises a handshake refusal in its reader task, which lives in
            # our nursery: it arrives here wrapped, next to the Cancelled of the others.
            error = _single(group)
            if error is group or not isinstance(error, _CONNECT_ERRORS):
                raise
            self._failed(outcome, error, websocket=not self.polling)
        if not outcome.connected:
            self._emit(
                "connect_failed",
                attempt=attempt,
                error=outcome.error,
                status=outcome.status,
                delay=outcome.retry_after,
            )
            return outcome
        d = outcome.disconnect
        self._emit(
            "disconnected",
            attempt=attempt,
            reason=d.reason if d else ("stale" if outcome.stale else None),
            reconnect=d.reconnect if d else True,
            delay=d.reconnect_after if d else None,
            error=outcome.error,
        )
        return outcome

    @property
    def polling(self) -> bool:
        """Whether the next connection is a long-polling one."""
        if self.transport == "auto":
            return self.websocket_failures >= self.fallback_after
        return self.transport == "long_poll"

    def _failed(self, outcome: _Outcome, error: BaseException, websocket: bool = False) -> None:
        outcome.error = error
        busy = False
        if isinstance(error, ConnectionRejected):
            outcome.status = error.status_code
            outcome.retry_after = parse_retry_after(_header(error.headers, b"retry-after"))
            busy = error.status_code in _RETRYABLE_STATUS
            if websocket and not busy and self.transport == "auto":
                # Something between us and the server refuses WebSockets (a proxy's 400,
                # 403, 405 ...): retrying will not change it; polling may pass.
                self.websocket_failures = self.fallback_after
            elif not busy:
                outcome.fatal = CableClosed(
                    "refused", f"HTTP {error.status_code}", status=error.status_code
                )
        if websocket and not busy and self.transport == "auto":
            self.websocket_failures += 1
            if self.polling:
                self._emit("fallback", attempt=self.websocket_failures, reason="long_poll")

    async def _connection(
        self, nursery: trio.Nursery, outcome: _Outcome, on_welcome: Callable[[], None]
    ) -> None:
        """One connection, from the handshake to its end (recorded in ``outcome``)."""
        url, subprotocols, headers = self._handshake_params()
        polling = self.polling
        ws: WebSocketConnection | LongPollConnection
        try:
            with trio.fail_after(self.connect_timeout):
                if polling:
                    ws = await connect_long_poll(
                        nursery,
                        _with_query(self.poll_url, dict(parse_qsl(urlsplit(url).query))),
                        [(k.decode(), v.decode()) for k, v in headers]
                        + [("x-jid", t[len("anycable-token.") :]) for t in subprotocols[1:]],
                        request_timeout=self.connect_timeout + 30.0,
                    )
                else:
                    ws = await connect_websocket(
                        nursery,
                        url,
                        subprotocols=subprotocols,
                        extra_headers=headers,
                        max_message_size=self.max_message_size,
                        compression=self.compression,
                    )
        except _CONNECT_ERRORS as exc:
            self._failed(outcome, exc, websocket=not polling)
            nursery.cancel_scope.cancel()
            return
        if not polling:
            self.websocket_failures = 0
        outcome.connected = True
        send, recv = trio.open_memory_channel[tuple[Subscription, dict[str, Any] | None]](math.inf)
        conn = _Conn(ws, nursery, outcome, send, recv, trio.current_time())
        try:
            if not polling and ws.subprotocol != self.subprotocol:
                # The Rails client refuses such a server too: the frames would not parse.
                outcome.fatal = CableClosed(
                    "protocol_error", f"server selected subprotocol {ws.subprotocol!r}"
                )
                return
            nursery.start_soon(self._subscriber, conn)
            await self._read_loop(conn, on_welcome)
        except (ConnectionClosed, proto.ProtocolError) as exc:
            outcome.error = exc
        finally:
            self._conn = None
            self.session.connection_lost()
            self._notify()
            with trio.CancelScope(shield=True):
                # A close handshake when the peer is responsive, bounded either way; a
                # stale peer would only make us wait, so its socket is just closed
                # (trio-websocket closes the stream when aclose is cut short).
                with trio.move_on_after(0 if outcome.stale else self.close_timeout):
                    if self._leaving is not None:
                        await self._leaving.wait()  # the program's close (see _leave)
                    await ws.aclose()
            nursery.cancel_scope.cancel()

    async def _leave(self) -> None:
        """The program is done with the cable: close the connection's WebSocket while its
        reader task still runs, so that the server's answer to the close frame is read and
        the handshake completes at once (cancelled first, the close would wait out
        ``close_timeout`` for an answer nobody reads)."""
        conn = self._conn
        if conn is None:
            return
        # trio-websocket's aclose() wakes our read loop at once (ConnectionClosed), before the
        # server's answer arrives; _connection then waits for this event before it cancels the
        # nursery that runs trio-websocket's reader, which reads that answer.
        self._leaving = left = trio.Event()
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(self.close_timeout):
                await conn.ws.aclose()
        finally:
            left.set()

    def _handshake_params(self) -> tuple[str, list[str], list[tuple[bytes, bytes]]]:
        query: dict[str, str] = {}
        query.update(self.session.resume_query())
        if self.ping_interval is not None:
            query["pi"] = _format_number(self.ping_interval)
        subprotocols = [self.subprotocol]
        headers = [(k.encode(), v.encode()) for k, v in self.headers]
        if self.token is not None:
            if self.token_in == "header":
                headers.append((b"X-JID", self.token.encode()))
            elif self.token_in == "query":
                query[self.token_param] = self.token
            else:
                subprotocols.append(f"anycable-token.{self.token}")
        return _with_query(self.url, query), subprotocols, headers

    async def _watchdog(self, conn: _Conn) -> None:
        """Stale-connection detection: no message (pings come every interval) for
        ``stale_timeout`` seconds.  Runs once the connection is welcomed."""
        limit = self.stale_timeout
        while True:
            deadline = conn.last_seen + limit
            if trio.current_time() >= deadline:
                conn.outcome.stale = True
                self._emit("stale", delay=limit)
                conn.nursery.cancel_scope.cancel()
                return
            await trio.sleep_until(deadline)

    async def _read_loop(self, conn: _Conn, on_welcome: Callable[[], None]) -> None:
        session = self.session
        ws = conn.ws
        welcome_deadline = trio.current_time() + self.connect_timeout
        while True:
            if conn.welcomed:
                raw = await ws.get_message()
            else:
                with trio.move_on_at(welcome_deadline):
                    raw = await ws.get_message()
                    welcome_deadline = math.inf
                if welcome_deadline != math.inf:
                    # Upgraded but never welcomed: a wedged server; try again later.
                    conn.outcome.stale = True
                    self._emit("stale", reason="no welcome", delay=self.connect_timeout)
                    return
            conn.last_seen = trio.current_time()
            for event in session.receive(session.decode(raw), conn.last_seen):
                if isinstance(event, (proto.Data, proto.Missing)):
                    self._deliver(event)
                elif isinstance(event, proto.Held):
                    self._holds_changed.set()
                elif isinstance(event, proto.HistoryNeeded):
                    self._emit("history_requested", identifier=event.identifier, reason="gap")
                    await self._send(conn, session.history_command(event.identifier, event.history))
                elif isinstance(event, proto.Ping):
                    if session.extended:
                        # Extended protocols may enforce pongs (no_pong disconnects).
                        await self._send(conn, {"command": "pong"})
                elif isinstance(event, proto.Welcome):
                    await self._welcomed(conn, event.plan)
                    on_welcome()
                elif isinstance(event, proto.Confirmed):
                    answer = conn.answers.pop(event.identifier, None)
                    if answer is not None:
                        answer.set()
                    sub = self._subs.get(event.identifier)
                    if event.known and sub is not None:
                        sub._confirmed()
                        self._emit("subscribed", identifier=event.identifier)
                        self._notify()
                    else:
                        # Confirmed after we gave up on it or unsubscribed: let it go.
                        await self._send(conn, session.unsubscribe_command(event.identifier))
                elif isinstance(event, proto.Rejected):
                    answer = conn.answers.pop(event.identifier, None)
                    if answer is not None:
                        answer.set()
                    gone = self._subs.pop(event.identifier, None)
                    if gone is not None:
                        gone._fail(SubscriptionRejected(event.identifier))
                        self._emit("rejected", identifier=event.identifier)
                        self._notify()
                elif isinstance(event, proto.Disconnect):
                    conn.outcome.disconnect = event
                    return
                elif isinstance(event, proto.Duplicate):
                    self._emit("duplicate", identifier=event.identifier)
                elif isinstance(event, proto.HistoryConfirmed):
                    self._emit("history_confirmed", identifier=event.identifier)
                elif isinstance(event, proto.HistoryRejected):
                    self._emit("history_rejected", identifier=event.identifier)
                elif isinstance(event, proto.Ignored):
                    log.debug("ignored server message: %r", event.message)

    def _deliver(self, event: proto.Data | proto.Missing) -> None:
        """Hand a message, or the notice of a gap, to its subscription's buffer."""
        target = self._subs.get(event.identifier)
        if isinstance(event, proto.Missing):
            missing = MessagesMissing(
                event.stream_id, event.epoch, event.first, event.last, event.reason
            )
            log.info("%s: %s", event.identifier, missing)
            self._emit(
                "messages_missing", identifier=event.identifier, reason=event.reason, error=missing
            )
            if target is not None:
                target._mailbox.notice(missing)
            return
        if not event.known or target is None:
            return
        message = Message(event.message, event.stream_id, event.epoch, event.offset)
        if not target._mailbox.put(message):
            self._emit("overflow", identifier=event.identifier)

    async def _gap_timer(self) -> None:
        """Ends the holds of reliable streams whose ``gap_timeout`` passed (see
        :meth:`~trio_cable.client.state.ClientSession.expire`)."""
        session = self.session
        while True:
            woken = self._holds_changed = trio.Event()
            deadline = session.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await woken.wait()
            if not woken.is_set():
                for event in session.expire(trio.current_time()):
                    if isinstance(event, (proto.Data, proto.Missing)):
                        self._deliver(event)

    async def _welcomed(self, conn: _Conn, plan: proto.WelcomePlan) -> None:
        conn.welcomed = True
        conn.outcome.welcomed = True
        self._conn = conn
        conn.nursery.start_soon(self._watchdog, conn)
        self._emit("connected", sid=plan.sid, restored=plan.restored)
        for identifier in plan.confirmed:
            sub = self._subs.get(identifier)
            if sub is not None:
                sub._confirmed()
                self._emit("subscribed", identifier=identifier, restored=True)
        for identifier in plan.unsubscribe:
            await self._send(conn, self.session.unsubscribe_command(identifier))
        for identifier, history in plan.history:
            self._emit("history_requested", identifier=identifier)
            await self._send(conn, self.session.history_command(identifier, history))
        for identifier, request in plan.subscribe:
            sub = self._subs.get(identifier)
            if sub is not None:
                conn.queue_send.send_nowait((sub, request))
        self._notify()

    async def _subscriber(self, conn: _Conn) -> None:
        """Sends subscribes: one at a time (linearized: the next only after the previous one
        was answered) or all at once."""
        async for sub, history in conn.queue_recv:
            if self.linearized:
                await self._subscribe_one(conn, sub, history)
            else:
                conn.nursery.start_soon(self._subscribe_one, conn, sub, history)

    async def _subscribe_one(
        self, conn: _Conn, sub: Subscription, history: dict[str, Any] | None
    ) -> None:
        identifier = sub.identifier
        for _try in range(2):  # the subscribe and one retry
            if self._subs.get(identifier) is not sub or sub._state.status != "pending":
                return
            answer = trio.Event()
            conn.answers[identifier] = answer
            if history is not None:
                self._emit("history_requested", identifier=identifier)
            if not await self._send(conn, self.session.subscribe_command(identifier, history)):
                return  # the connection is going away; the next one re-subscribes
            self._emit("subscribe_sent", identifier=identifier)
            with trio.move_on_after(self.subscribe_timeout):
                await answer.wait()
            if answer.is_set():
                return
            self._emit("subscribe_timeout", identifier=identifier)
        conn.answers.pop(identifier, None)
        if self._subs.get(identifier) is sub:
            del self._subs[identifier]
            self.session.remove(identifier)
            sub._fail(SubscribeTimeout(identifier, self.subscribe_timeout))
            self._notify()
            # If the server answers late, it must not keep a subscription nobody reads.
            await self._send(conn, self.session.unsubscribe_command(identifier))

    # -- tokens -------------------------------------------------------------------------------

    async def _refresh_token(self, *, after_expiry: bool = False) -> None:
        assert self.token_provider is not None
        try:
            result = self.token_provider()
            token = await result if inspect.isawaitable(result) else result
        except Exception as exc:
            raise CableClosed(
                DisconnectReason.TOKEN_EXPIRED, f"token_provider failed: {exc!r}"
            ) from exc
        if not isinstance(token, str) or not token:
            raise CableClosed(DisconnectReason.TOKEN_EXPIRED, "token_provider returned no token")
        if after_expiry:
            exp = _token_times(token)[1]
            if exp is not None and exp <= time.time():
                raise CableClosed(
                    DisconnectReason.TOKEN_EXPIRED, "token_provider returned an expired token"
                )
        self.token = token
        self._token_changed.set()
        self._token_changed = trio.Event()
        self._emit("token_refreshed")

    async def _token_refresher(self) -> None:
        """Refresh the token before it expires, at a random point between 50% and 90% of its
        life, so a fleet of clients given tokens at the same time does not refresh at once.
        The token is only sent at handshakes, so this makes reconnects skip the
        ``token_expired`` round trip."""
        while True:
            token = self.token
            if token is None:
                await self._token_changed.wait()
                continue
            iat, exp = _token_times(token)
            if exp is None:
                await self._token_changed.wait()
                continue
            issued = iat if iat is not None else time.time()
            life = max(0.0, exp - issued)
            refresh_at = issued + life * self.rng.uniform(0.5, 0.9)
            changed = self._token_changed
            with trio.move_on_after(max(0.0, refresh_at - time.time())):
                await changed.wait()
            if changed.is_set():
                continue  # refreshed meanwhile (token_expired): plan from the new token
            try:
                await self._refresh_token()
            except CableClosed as exc:
                log.warning("proactive token refresh failed: %s", exc)
                # Try again later; a reconnect after expiry still refreshes on token_expired.
                await trio.sleep(max(1.0, min(30.0, exp - time.time())))


# -- helpers -------------------------------------------------------------------------------------


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one meaningful exception of a group (Cancelled ones aside), or the group."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    meaningful = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if len(meaningful) == 1:
        return meaningful[0]
    return group


def _header(headers: Sequence[tuple[bytes, bytes]] | None, name: bytes) -> bytes | None:
    for key, value in headers or ():
        if key.lower() == name:
            return value
    return None


def _format_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _with_query(url: str, extra: dict[str, str]) -> str:
    if not extra:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in extra]
    query.extend(extra.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _token_times(token: str) -> tuple[float | None, float | None]:
    """``iat`` and ``exp`` of a JWT, read without verifying it (the client has no key; it only
    needs to know when to refresh)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None, None

    def number(key: str) -> float | None:
        value = claims.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return None

    return number("iat"), number("exp")


@asynccontextmanager
async def open_cable(
    url: str,
    *,
    subprotocol: str = "actioncable-v1-ext-json",
    token: str | None = None,
    token_provider: TokenProvider | None = None,
    token_in: Literal["header", "query", "subprotocol"] = "header",
    token_param: str = "jid",
    backoff: Backoff | None = None,
    linearized: bool = True,
    subscribe_timeout: float = 5.0,
    connect_timeout: float = 10.0,
    close_timeout: float = 1.0,
    ping_interval: float | None = None,
    stale_pings: float = 2.0,
    resume: bool = True,
    buffer_size: int = 10_000,
    hold_limit: int = 1000,
    gap_timeout: float = 10.0,
    headers: Sequence[tuple[str, str]] = (),
    on_event: Callable[[CableEvent], None] | None = None,
    rng: random.Random | None = None,
    max_message_size: int = 16 * 1024 * 1024,
    transport: Transport = "websocket",
    poll_url: str | None = None,
    fallback_after: int = 3,
    compression: bool = False,
) -> AsyncIterator[Cable]:
    """Connect to an Action Cable / AnyCable server and keep the connection up.

    Enters once the first ``welcome`` arrives (retrying per ``backoff`` until then) and raises
    :class:`CableClosed` if it cannot: the server refused for good (``unauthorized``, an HTTP
    4xx other than 408/425/429) or ``backoff.max_attempts`` ran out.  On exit the connection is
    closed.  Later, when the cable closes for good, subscriptions raise :class:`CableClosed`
    (the ``async with`` body is not cancelled; see :meth:`Cable.wait_closed`).

    - ``subprotocol``: ``actioncable-v1-json``, ``actioncable-v1-ext-json`` (default; session
      resume and history), ``actioncable-v1-msgpack``, ``actioncable-v1-ext-msgpack``.
    - ``token``: a JWT sent at every handshake, as ``X-JID`` header (``token_in="header"``),
      query parameter ``token_param`` (``"query"``) or ``anycable-token.<jwt>`` subprotocol.
    - ``token_provider``: callable (sync or async) returning a fresh token; called when there
      is none, on ``token_expired``, and proactively between 50% and 90% of the token's life.
    - ``backoff``: :class:`~trio_cable.client.backoff.Backoff` (default full jitter, base 0.5 s,
      cap 30 s, no attempt limit).  Server advice (``reconnect_after``, ``Retry-After``) wins.
    - ``linearized``: one ``subscribe`` in flight at a time (default); ``False`` sends them all
      at once.  ``subscribe_timeout``: seconds to wait for an answer; one retry, then
      :class:`SubscribeTimeout`.
    - ``ping_interval``: ask the server for this ping interval (``?pi=``); the connection counts
      as stale, and is replaced, after ``stale_pings`` intervals without any message.
    - ``resume``: on extended protocols, resume the session (``?sid=``) and fetch missed
      messages through ``history``.
    - ``buffer_size``: messages buffered per subscription (see :class:`MessagesDropped`).
    - ``hold_limit``, ``gap_timeout``: stored broadcasts reach a subscription in offset order,
      once; one that comes before its turn is held while ``history`` fetches the gap, for at
      most ``gap_timeout`` seconds and ``hold_limit`` messages per stream, after which what
      is held is delivered behind a :class:`MessagesMissing` (also when the history cannot
      fill the gap).
    - ``on_event``: called with a :class:`CableEvent` for every connection attempt, disconnect,
      subscription step ... (must not block).
    - ``rng``: randomness for jitter (seed it for reproducible runs).
    - ``transport``: ``"websocket"`` (default), ``"long_poll"`` (``POST`` requests to
      ``poll_url``, by default the URL's host with ``http(s)`` and ``/lp``: for networks where
      nothing long-lived passes), or ``"auto"``: WebSocket, falling back to long polling for
      good after ``fallback_after`` failed handshakes in a row (at once when the handshake is
      refused with a status retrying cannot change, as proxies that refuse WebSockets do;
      503 and 429 are a busy server, not a reason).  Long polling speaks the extended JSON
      protocol (resume with ``?sid=``, history), and carries a token as ``X-JID``.
    - ``compression``: offer permessage-deflate (the server may decline).
    """
    cable = Cable(
        url,
        subprotocol=subprotocol,
        token=token,
        token_provider=token_provider,
        token_in=token_in,
        token_param=token_param,
        backoff=backoff,
        linearized=linearized,
        subscribe_timeout=subscribe_timeout,
        connect_timeout=connect_timeout,
        close_timeout=close_timeout,
        ping_interval=ping_interval,
        stale_pings=stale_pings,
        resume=resume,
        buffer_size=buffer_size,
        hold_limit=hold_limit,
        gap_timeout=gap_timeout,
        headers=headers,
        on_event=on_event,
        rng=rng,
        max_message_size=max_message_size,
        transport=transport,
        poll_url=poll_url,
        fallback_after=fallback_after,
        compression=compression,
    )
    with unwrap_group():
        async with trio.open_nursery() as nursery:
            await nursery.start(cable._run)
            try:
                yield cable
            finally:
                cable._closing = True
                await cable._leave()
                nursery.cancel_scope.cancel()


@contextmanager
def unwrap_group() -> Iterator[None]:
    """Strict exception groups wrap everything leaving a nursery; give the caller the one
    real exception (its own, or CableClosed) rather than a group."""
    try:
        yield
    except BaseExceptionGroup as group:
        error = _single(group)
        if error is group:
            raise
        raise error from None
