"""Long polling for the client: a connection that looks like a trio-websocket one to the
cable (``send_message``, ``get_message``, ``aclose``), made of ``POST`` requests.

The first poll opens the session and brings its welcome; each later one names the session
(``X-Anycable-Poll-ID``), carries the commands queued since the previous one as JSON lines,
and brings back the messages queued for us.  One poll is always out, waiting for messages (a
long poll); a command does not wait for its end: it goes in a new poll at once, which makes
the server answer the older one.  Answers are handed on in the order the polls were sent,
which is the order the server queued their messages.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import trio
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected

from trio_cable.client.http import HTTPResponse, request

__all__ = ["POLL_ID_HEADER", "LongPollConnection", "connect_long_poll", "poll_url_for"]

POLL_ID_HEADER = "x-anycable-poll-id"
_CONTENT_TYPE = ("content-type", "application/x-ndjson")


def poll_url_for(url: str, path: str = "/lp") -> str:
    """The long-polling URL of a server given by its WebSocket URL: same host, ``http(s)``,
    *path*, the same query."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _lines(body: bytes) -> list[str]:
    return [line for line in body.decode("utf-8", "replace").split("\n") if line.strip()]


class LongPollConnection:
    """One long-polling session, from its first poll until either side ends it."""

    def __init__(
        self,
        nursery: trio.Nursery,
        url: str,
        headers: Sequence[tuple[str, str]],
        poll_id: str,
        request_timeout: float,
    ) -> None:
        self.url = url
        self.headers = list(headers)
        self.poll_id = poll_id
        self.request_timeout = request_timeout
        #: Long polling speaks the extended JSON protocol.
        self.subprotocol = "actioncable-v1-ext-json"
        self._send, self._receive = trio.open_memory_channel[str](math.inf)
        self._outgoing: list[str] = []
        self._wakeup = trio.Event()
        self._in_flight = 0
        self._sent = 0  # polls sent so far
        self._delivered = 0  # polls whose answers were handed on
        self._turn = trio.Event()
        self._closed: CloseReason | None = None
        self._scope = trio.CancelScope()
        nursery.start_soon(self._run)

    # -- what the cable uses ---------------------------------------------------------------

    async def get_message(self) -> str:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ConnectionClosed(self._closed or CloseReason(1006, "closed")) from None

    async def send_message(self, message: str | bytes) -> None:
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        self._outgoing.append(message if isinstance(message, str) else message.decode())
        self._wakeup.set()

    async def aclose(self) -> None:
        self._close(CloseReason(1000, "closed by the client"))

    # -- polling -----------------------------------------------------------------------------

    def _close(self, reason: CloseReason) -> None:
        if self._closed is None:
            self._closed = reason
        self._send.close()
        self._scope.cancel()

    def deliver(self, lines: list[str]) -> None:
        """Hand on what a poll brought (nothing once closed: the cable has stopped reading)."""
        if self._closed is not None:
            return
        for line in lines:
            self._send.send_nowait(line)

    async def _run(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                while True:
                    if self._in_flight and not self._outgoing:
                        self._wakeup = trio.Event()
                        await self._wakeup.wait()
                        continue
                    body = "".join(line + "\n" for line in self._outgoing).encode()
                    self._outgoing.clear()
                    self._sent += 1
                    self._in_flight += 1
                    nursery.start_soon(self._poll, self._sent, body)
                    await trio.lowlevel.checkpoint()

    async def _poll(self, number: int, body: bytes) -> None:
        headers = [(POLL_ID_HEADER, self.poll_id), _CONTENT_TYPE, *self.headers]
        response: HTTPResponse | None = None
        try:
            with trio.fail_after(self.request_timeout):
                response = await request(self.url, "POST", headers, body)
        except (OSError, trio.TooSlowError, ValueError) as exc:
            error = exc
        # Answers are handed on in the order their polls were sent.
        while self._delivered != number - 1:
            turn = self._turn
            await turn.wait()
        try:
            if response is None:
                self._close(CloseReason(1006, f"poll failed: {error!r}"))
            elif response.status == 200:
                self.deliver(_lines(response.body))
            else:
                # 401: the session is gone (expired, or ended and its last answer taken):
                # what the body says (a disconnect), then the end.
                if response.status == 401:
                    self.deliver(_lines(response.body))
                self._close(CloseReason(1006, f"poll answered {response.status}"))
        finally:
            self._delivered = number
            self._turn.set()
            self._turn = trio.Event()
            self._in_flight -= 1
            self._wakeup.set()


async def connect_long_poll(
    nursery: trio.Nursery,
    url: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    request_timeout: float = 30.0,
) -> LongPollConnection:
    """Open a long-polling session at *url* (its query may hold ``sid`` and the token);
    raises ``ConnectionRejected`` when the server refuses it (503 while draining, ...)."""
    with trio.fail_after(request_timeout):
        response = await request(url, "POST", [_CONTENT_TYPE, *headers], b"")
    poll_id = response.headers.get(POLL_ID_HEADER)
    if response.status not in (200, 401) or not poll_id:
        raw_headers = tuple((k.encode(), v.encode("latin-1")) for k, v in response.headers.items())
        raise ConnectionRejected(response.status, raw_headers, response.body)
    connection = LongPollConnection(nursery, url, headers, poll_id, request_timeout)
    connection.deliver(_lines(response.body))
    if response.status == 401:
        connection._close(CloseReason(1008, "refused"))
    return connection
