"""A receive-only client for the server's SSE endpoint, with ``EventSource``'s semantics: one
subscription named in the URL, reconnection after the server's ``retry:`` advice (else the
backoff), ``Last-Event-ID`` so that what was missed comes from history.

For programs that only listen (a dashboard feed, a worker following a stream) where
WebSockets do not pass.  A cable that sends commands (``perform``, new subscriptions) falls
back to long polling instead (``open_cable(transport="auto")``): an event stream cannot carry
anything from the client once it is open.

::

    async with open_event_stream("http://localhost:8080/events", stream="chat/lobby") as feed:
        async for message in feed:
            print(message.data, message.offset)
"""

from __future__ import annotations

import json
import math
import random
import ssl
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio

from trio_cable.client.backoff import Backoff
from trio_cable.client.cable import CableClosed, CableEvent, Message, _with_query, unwrap_group
from trio_cable.client.http import Event, EventStreamParser, open_request

__all__ = ["EventStream", "open_event_stream"]

# A refusal that retrying will not change (EventSource gives up on these too).
_FATAL = frozenset({400, 401, 403, 404, 405})
# Protocol events, as the cable's events name them.
_EVENT_KINDS = {
    "confirm_subscription": "subscribed",
    "confirm_history": "history_confirmed",
    "reject_history": "history_rejected",
}


class EventStream:
    """The messages of one SSE subscription, across reconnections.  Iterate over it."""

    def __init__(
        self,
        url: str,
        headers: Sequence[tuple[str, str]],
        backoff: Backoff,
        connect_timeout: float,
        on_event: Callable[[CableEvent], None] | None,
        rng: random.Random | None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.url = url
        self.ssl_context = ssl_context
        self.headers = list(headers)
        self.connect_timeout = connect_timeout
        self.on_event = on_event
        self.timer = backoff.timer(rng)
        #: Where the stream got to (the last event id): sent back on reconnection.
        self.last_event_id = ""
        self._positions: dict[str, tuple[str, int]] = {}  # stream -> (epoch, offset)
        self._send, self._receive = trio.open_memory_channel[Message](math.inf)
        self._error: CableClosed | None = None

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Message:
        return await self.receive()

    async def receive(self) -> Message:
        """The next message; raises :class:`CableClosed` once the stream ended for good."""
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise self._error or CableClosed("closed") from None

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.on_event is not None:
            self.on_event(CableEvent(kind, trio.current_time(), **fields))

    async def _run(self) -> None:
        try:
            while True:
                advice = await self._connect_once()
                if self.timer.exhausted:
                    raise CableClosed("max_attempts", "the event stream kept failing")
                delay = self.timer.next_delay(advice)
                self._emit("reconnect_scheduled", delay=delay)
                await trio.sleep(delay)
        except CableClosed as exc:
            self._error = exc
        finally:
            self._send.close()

    async def _connect_once(self) -> float | None:
        """One connection; returns the server's advice (seconds) for the next one."""
        headers = [("accept", "text/event-stream"), *self.headers]
        if self.last_event_id:
            headers.append(("last-event-id", self.last_event_id))
        self._emit("connecting")
        parser = EventStreamParser(self.last_event_id)
        try:
            with trio.fail_after(self.connect_timeout):
                connection = await open_request(
                    self.url, headers=headers, ssl_context=self.ssl_context
                )
                head = await connection.head()
        except (OSError, trio.TooSlowError) as exc:
            self.timer.failed()
            self._emit("connect_failed", error=exc)
            return None
        try:
            if head.status in _FATAL:
                raise CableClosed("refused", f"HTTP {head.status}", status=head.status)
            if head.status != 200:
                self.timer.failed()
                self._emit("connect_failed", status=head.status)
                return None
            async for chunk in connection.chunks():
                for event in parser.feed(chunk):
                    self._handle(event)
                self.last_event_id = parser.last_event_id
        except OSError as exc:
            self._emit("disconnected", error=exc)
        finally:
            await connection.aclose()
            self.last_event_id = parser.last_event_id
        return parser.retry / 1000 if parser.retry is not None else None

    def _handle(self, event: Event) -> None:
        message = json.loads(event.data)
        if event.event == "welcome":
            self.timer.succeeded()
            self._emit("connected", sid=message.get("sid"))
        elif event.event in _EVENT_KINDS:
            self._emit(_EVENT_KINDS[event.event], identifier=message.get("identifier"))
        elif event.event == "disconnect":
            reconnect = bool(message.get("reconnect", True))
            self._emit("disconnected", reason=message.get("reason"), reconnect=reconnect)
            if not reconnect:
                raise CableClosed(str(message.get("reason")), "the server asked not to reconnect")
        elif event.event == "message" and "message" in message:
            stream, epoch = message.get("stream_id"), message.get("epoch")
            offset = message.get("offset")
            if isinstance(stream, str) and isinstance(offset, int):
                seen = self._positions.get(stream)
                if seen is not None and seen[0] == epoch and offset <= seen[1]:
                    self._emit("duplicate", identifier=message.get("identifier"))
                    return
                self._positions[stream] = (str(epoch), offset)
            self._send.send_nowait(Message(message["message"], stream, epoch, offset))


@asynccontextmanager
async def open_event_stream(
    url: str,
    *,
    stream: str | None = None,
    signed_stream: str | None = None,
    channel: str | None = None,
    params: dict[str, str] | None = None,
    identifier: str | None = None,
    history_since: int | None = None,
    token: str | None = None,
    headers: Sequence[tuple[str, str]] = (),
    backoff: Backoff | None = None,
    connect_timeout: float = 10.0,
    on_event: Callable[[CableEvent], None] | None = None,
    rng: random.Random | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[EventStream]:
    """Follow one subscription over SSE at *url* (the server's ``/events``): a public
    ``stream``, a ``signed_stream``, a ``channel`` with ``params``, or an ``identifier``;
    ``history_since`` (unix seconds) asks the stream's history first; ``token`` is a JWT
    (sent as ``X-JID``).  Reconnects until the server says not to (``reconnect: false``, a
    ``401``/``400``...), after its ``retry:`` advice when it gave one, else per ``backoff``;
    then iteration raises :class:`CableClosed`."""
    query: dict[str, str] = dict(params or {})
    for key, value in (
        ("stream", stream),
        ("signed_stream", signed_stream),
        ("channel", channel),
        ("identifier", identifier),
        ("history_since", None if history_since is None else str(history_since)),
    ):
        if value is not None:
            query[key] = value
    extra = [*headers, *([("x-jid", token)] if token else [])]
    events = EventStream(
        _with_query(url, query),
        extra,
        backoff or Backoff(),
        connect_timeout,
        on_event,
        rng,
        ssl_context,
    )
    with unwrap_group():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(events._run)
            try:
                yield events
            finally:
                nursery.cancel_scope.cancel()
