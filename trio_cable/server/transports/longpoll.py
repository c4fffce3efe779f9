"""The long-polling transport: ``POST /lp``, for networks where nothing long-lived survives.

A long-polling session is an ordinary :class:`~trio_cable.server.session.Session` (extended
JSON protocol: resume, history) whose transport is a queue in memory.  Each poll is one HTTP
request: its body carries the client's commands as JSON lines, handled in order; its answer
carries, as JSON lines, every message queued since the previous poll.  A poll that finds
nothing waits for messages up to ``--poll-interval`` (a *long* poll), and its answer names
the session's poll id (``X-Anycable-Poll-ID``), which the next poll sends back.

A poll that arrives while an older one of the same session is still waiting makes the older
one answer at once, and empty: a client sends its commands without waiting for the end of a
long poll, and what is queued goes to the newest poll.  Never to the older one: AnyCable's
JavaScript client aborts its waiting poll to send commands, so an answer given to it would be
lost on the way.

A session that no poll has reached for ``--poll-keepalive-timeout`` ends like an idle
connection (nobody is there to be told).  The session lives in this node: a client that polls
another node (after a drain, behind a balancer without sticky sessions) starts a new session,
restoring the old one with ``?sid=`` (the session cache is the broker's).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from trio_cable.metrics import Metrics
from trio_cable.protocol.cable import JSON
from trio_cable.protocol.codes import DisconnectReason
from trio_cable.server.transport import Receiver, WireFormat

__all__ = ["POLL_ID_HEADER", "LongPollContext", "LongPollTransport", "poll_format"]

log = logging.getLogger("trio_cable.longpoll")

POLL_ID_HEADER = "x-anycable-poll-id"
# Once a message is queued, a waiting poll lingers this long for the ones that follow it (a
# subscribe's confirm and its history, a burst of broadcasts) before it answers.
_FLUSH_DELAY = 0.02


def _line(payload: bytes) -> bytes:
    return payload + b"\n"


_FORMAT = WireFormat(JSON, True, _line, "long-poll")


def poll_format() -> WireFormat:
    """JSON lines on the extended protocol."""
    return _FORMAT


@dataclass(eq=False, slots=True)
class LongPollContext:
    """What the long-polling sessions of one server share: settings, metrics, and the open
    sessions by poll id."""

    metrics: Metrics
    max_send_queue: int
    close_timeout: float
    poll_interval: float
    keepalive_timeout: float
    sessions: dict[str, LongPollTransport] = field(default_factory=dict)


class LongPollTransport:
    """The transport of one long-polling session: what the session writes waits in an
    outbox for the next poll (bounded by ``max_send_queue``: then ``too_slow``)."""

    __slots__ = (
        "_active",
        "_collected",
        "_ctx",
        "_ended",
        "_last_seen",
        "_lock",
        "_newest",
        "_outbox",
        "_outbox_bytes",
        "_receiver",
        "_saved",
        "_scope",
        "_wake",
        "poll_id",
        "remote",
        "state",
    )

    def __init__(self, ctx: LongPollContext, poll_id: str, *, remote: str = "") -> None:
        self._ctx = ctx
        self.poll_id = poll_id
        self.remote = remote
        #: "open", "closing" (nothing more is written; the outbox waits for a last poll),
        #: "closed".
        self.state = "open"
        self._outbox: list[bytes] = []
        self._outbox_bytes = 0
        self._wake: trio.Event | None = None  # the waiting poll's
        self._ended = trio.Event()  # close() or abort(): the session's task goes on
        self._saved = trio.Event()  # the receiver stored what a resume needs
        self._collected = trio.Event()  # a poll took the last messages
        self._lock = trio.Lock()  # one poll's commands at a time, in order
        self._active = 0  # polls being served
        self._newest = 0  # polls received: a waiting poll that is not the newest answers empty
        self._last_seen = trio.current_time()
        self._receiver: Receiver | None = None
        self._scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        return f"<LongPoll {self.remote} {self.state}>"

    # -- Transport -----------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.state == "open"

    @property
    def queued_bytes(self) -> int:
        return self._outbox_bytes

    def write(self, data: bytes) -> None:
        if self.state != "open":
            return
        self._outbox.append(data)
        self._outbox_bytes += len(data)
        if self._outbox_bytes > self._ctx.max_send_queue:
            self._too_slow()
            return
        self._wake_poll()

    def cork(self) -> bool:
        return False  # the outbox gathers writes until the next answer anyway

    def uncork(self) -> None:
        pass

    def close(self, code: int) -> None:
        if self.state != "open":
            return
        self.state = "closing"  # what was written waits for the client's next poll
        self._ended.set()
        self._wake_poll()

    def abort(self) -> None:
        self.state = "closed"
        self._outbox.clear()
        self._outbox_bytes = 0
        self._ended.set()
        self._wake_poll()
        if self._scope is not None:
            self._scope.cancel()

    def _wake_poll(self) -> None:
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.set()

    def _too_slow(self) -> None:
        log.info("%r: over %d bytes wait for a poll: too_slow", self, self._ctx.max_send_queue)
        self._ctx.metrics.too_slow_total += 1
        self._outbox.clear()
        self._outbox_bytes = 0
        notice = self._receiver.farewell(DisconnectReason.TOO_SLOW) if self._receiver else None
        if notice:
            self._outbox.append(notice)
        self.state = "closing"
        self._ended.set()
        self._wake_poll()

    # -- the session's life ----------------------------------------------------------------

    async def run(
        self, receiver: Receiver, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The session's task, from the first poll to its end: ``started`` once the receiver
        opened (the first poll's answer holds its welcome, or its refusal)."""
        ctx = self._ctx
        self._receiver = receiver
        ctx.sessions[self.poll_id] = self
        started = False
        try:
            with trio.CancelScope() as scope:
                self._scope = scope
                try:
                    await receiver.opened()
                finally:
                    task_status.started()
                    started = True
                while self.state == "open":
                    now = trio.current_time()
                    deadline = self._last_seen + ctx.keepalive_timeout
                    if self._active:
                        deadline = max(deadline, now + ctx.keepalive_timeout)
                    elif now >= deadline:
                        log.info("%r: no poll for %.0f s: closing", self, ctx.keepalive_timeout)
                        ctx.metrics.long_poll_timeouts_total += 1
                        self.state = "closed"
                        break
                    with trio.move_on_at(deadline):
                        await self._ended.wait()
        except Exception:
            log.exception("%r: unexpected error", receiver)
        finally:
            if not started:
                task_status.started()
            final = self.state == "closing"
            if self.state == "open":
                self.state = "closing"
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + ctx.close_timeout
                try:
                    await receiver.closing()
                    self._saved.set()
                    await receiver.closed()
                finally:
                    self._saved.set()
                    self._receiver = None
            if final and self._outbox:
                # The last messages (the disconnect) wait for the client's next poll.
                with trio.move_on_after(ctx.keepalive_timeout):
                    await self._collected.wait()
            self.state = "closed"
            if ctx.sessions.get(self.poll_id) is self:
                del ctx.sessions[self.poll_id]

    async def poll(self, commands: list[bytes]) -> list[bytes]:
        """Serve one poll: handle *commands* in order, then answer with what is queued,
        waiting up to ``poll_interval`` for something when nothing is."""
        ctx = self._ctx
        self._active += 1
        self._last_seen = trio.current_time()
        self._newest += 1
        number = self._newest
        try:
            self._wake_poll()  # an older poll that still waits answers now
            async with self._lock:
                for command in commands:
                    receiver = self._receiver
                    if self.state != "open" or receiver is None:
                        break
                    work = receiver.receive(command, False)
                    if work is not None:
                        await work()
            if self.state == "open" and not self._outbox:
                wake = self._wake = trio.Event()
                with trio.move_on_after(ctx.poll_interval):
                    await wake.wait()
                if self._outbox and self.state == "open":
                    await trio.sleep(_FLUSH_DELAY)
            if number != self._newest:
                return []  # superseded: the newer poll takes what is queued
            if self.state != "open":
                # Answer the last messages only once the session is stored: the client
                # may resume it elsewhere as soon as it reads the disconnect.
                with trio.move_on_after(ctx.close_timeout):
                    await self._saved.wait()
            answer, self._outbox = self._outbox, []
            self._outbox_bytes = 0
            if self.state != "open":
                self._collected.set()
            return answer
        finally:
            self._active -= 1
            self._last_seen = trio.current_time()
