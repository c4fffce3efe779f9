"""The hub: which local connections listen to which stream, and broadcast fan-out.

A broadcast is decoded once, encoded once per (identifier, codec) group, framed once per
group, and the same ``bytes`` frame is handed to every connection of the group with a
non-blocking write: no task, channel or lock per recipient (ARCHITECTURE.md).

Coalescing: on loopback or a LAN, nearly all of a broadcast's server CPU is the ``send``
system call per recipient, whatever the frame's size.  When several broadcasts are fanned out
in one scheduler tick (a busy chat room, websocket-bench's concurrent senders), the first goes
out at once and the others are *corked*: appended to each recipient's cork and written by
:meth:`Hub.run_flusher` in the next tick, one ``send`` per recipient for all of them.  A lone
broadcast pays one extra task wake-up per broadcast, not per recipient; ordering per
connection holds because every write to a corked connection joins its cork.

Big fan-outs let others in: a broadcast to more than :data:`INLINE_RECIPIENTS` recipients is
not written in one go (18,000 recipients are ~100 ms of ``send`` calls, during which no ping,
command or handshake would be served).  It becomes a job for :meth:`Hub.run_fanout`, which
writes it yielding to the scheduler every :data:`FANOUT_SLICE` seconds.  While jobs wait, every
broadcast queues behind them, so each connection still gets a stream's broadcasts in
publication order (a later broadcast never overtakes an earlier one on any connection).
Consecutive jobs to an unchanged audience are written together, their frames joined into one
``send`` per recipient: the coalescing above, for big fan-outs.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from trio_cable.broker import Broadcast
from trio_cable.metrics import Metrics
from trio_cable.protocol.cable import BroadcastEncoder
from trio_cable.server.transport import WireFormat

__all__ = ["FANOUT_SLICE", "INLINE_RECIPIENTS", "QUEUE_PACE", "Hub", "Subscriber"]

log = logging.getLogger("trio_cable.hub")

#: Recipients a broadcast may have and still be written at once (a few milliseconds).
INLINE_RECIPIENTS = 512
#: How long the fan-out task writes before it lets other tasks run (seconds).
FANOUT_SLICE = 0.002
#: Queued fan-outs past which a publisher waits for its own to be written.
QUEUE_PACE = 16
# Recipients written between two looks at the clock.
_CLOCK_EVERY = 32


class Subscriber(Protocol):
    """What the hub needs of a local subscriber (a session)."""

    @property
    def sid(self) -> str:
        """The session id (``exclude_socket`` names it)."""
        ...

    @property
    def format(self) -> WireFormat:
        """How the subscriber's frames are built: recipients are grouped by it."""
        ...

    def send_broadcast(self, frame: bytes, stream: str, offset: int | None) -> None:
        """Write the broadcast at *offset* of *stream* without blocking."""

    def send_broadcasts(
        self, joined: bytes, frames: Sequence[tuple[bytes, int | None]], stream: str
    ) -> None:
        """Write several broadcasts of *stream* at once: *frames* are ``(frame, offset)`` in
        publication order, *joined* the same frames back to back (one write)."""

    def cork(self) -> bool:
        """Start collecting writes for one ``send``; True when this call started it."""
        ...

    def uncork(self) -> None:
        """Write what was collected."""


@dataclass(eq=False, slots=True)
class _Audience:
    """Subscribers of one (identifier, format) of a stream, as a snapshot."""

    identifier: str
    format: WireFormat
    conns: list[Subscriber]


@dataclass(eq=False, slots=True)
class _FanOut:
    """A broadcast queued for the fan-out task: its audience and a frame per audience group."""

    broadcast: Broadcast
    audience: list[_Audience]
    frames: list[bytes]
    done: trio.Event = field(default_factory=trio.Event)


class Hub:
    """stream -> identifier -> wire format -> the subscribers of that identifier."""

    def __init__(
        self,
        metrics: Metrics,
        on_first: Callable[[str], None] = lambda stream: None,
        on_last: Callable[[str], None] = lambda stream: None,
    ) -> None:
        # Grouping by the wire format at subscribe time leaves the broadcast loop nothing to
        # do per recipient but hand over the shared frame.
        self._streams: dict[str, dict[str, dict[WireFormat, set[Subscriber]]]] = {}
        self._metrics = metrics
        # Tell the broker when this node starts / stops caring about a stream.
        self._on_first = on_first
        self._on_last = on_last
        # Coalescing (see the module docstring): the flusher task while it waits, whether a
        # broadcast already went out in this tick, and the connections corked since.
        self._flusher: trio.lowlevel.Task | None = None
        self._in_tick = False
        self._corked: list[Subscriber] = []
        # Big fan-outs (see the module docstring): the jobs in publication order, the fan-out
        # task (None: no task runs, so everything is written at once), whether it waits for
        # work, and per stream a snapshot of its audience with the version it was taken at.
        self._jobs: deque[_FanOut] = deque()
        self._fanout: trio.lowlevel.Task | None = None
        self._fanout_running = False
        self._versions: dict[str, int] = {}
        self._audiences: dict[str, tuple[int, list[_Audience]]] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: str, identifier: str, conn: Subscriber) -> None:
        """Subscribe *conn*'s *identifier* to *stream*."""
        groups = self._streams.get(stream)
        if groups is None:
            groups = self._streams[stream] = {}
            self._on_first(stream)
        kinds = groups.get(identifier)
        if kinds is None:
            kinds = groups[identifier] = {}
        kinds.setdefault(conn.format, set()).add(conn)
        self._versions[stream] = self._versions.get(stream, 0) + 1

    def remove(self, stream: str, identifier: str, conn: Subscriber) -> None:
        """Undo :meth:`add`; unknown entries are ignored."""
        groups = self._streams.get(stream)
        if groups is None:
            return
        kinds = groups.get(identifier)
        if kinds is None:
            return
        key = conn.format
        conns = kinds.get(key)
        if conns is None:
            return
        conns.discard(conn)
        self._versions[stream] = self._versions.get(stream, 0) + 1
        if not conns:
            del kinds[key]
            if not kinds:
                del groups[identifier]
                if not groups:
                    del self._streams[stream]
                    self._versions.pop(stream, None)
                    self._audiences.pop(stream, None)
                    self._on_last(stream)

    @property
    def pending_fanouts(self) -> int:
        """Big fan-outs queued for the fan-out task (the one being written included)."""
        return len(self._jobs)

    async def written(self) -> None:
        """Return once every broadcast handed to the hub so far has been written to its
        recipients (the fan-out task writes big ones later, in order)."""
        if self._jobs:
            await self._jobs[-1].done.wait()

    def subscribers(self, stream: str) -> int:
        """Number of (connection, identifier) pairs on *stream*."""
        return sum(
            len(conns)
            for kinds in self._streams.get(stream, {}).values()
            for conns in kinds.values()
        )

    def deliver(self, broadcast: Broadcast) -> Callable[[], Awaitable[None]] | None:
        """Fan *broadcast* out to local subscribers.  None when it was written, or queued for
        the fan-out task behind few others; once the queue is long, a function that waits
        until it is written (the broker's ``publish`` awaits it: publishers are paced by
        fan-outs).

        Clients of the extended protocols get the stream position (``stream_id``, ``epoch``,
        ``offset``) with each stored message; plain Action Cable clients get none, exactly as
        Rails would send it."""
        stream = broadcast.stream
        groups = self._streams.get(stream)
        self._metrics.broadcasts_total += 1
        if not groups:
            return None
        if self._fanout_running and (self._jobs or self.subscribers(stream) > INLINE_RECIPIENTS):
            return self._queue(broadcast, groups)
        self._write_now(broadcast, groups)
        return None

    def _encoders(self, broadcast: Broadcast) -> tuple[BroadcastEncoder, BroadcastEncoder]:
        """``(plain, stored)``: the message for plain clients, and with its stream position
        for the extended protocols (the same one when it has no position)."""
        plain = BroadcastEncoder(broadcast.data, kind=broadcast.kind)
        if broadcast.offset is None:
            return plain, plain
        stored = BroadcastEncoder(
            plain.message,
            stream_id=broadcast.stream,
            epoch=broadcast.epoch,
            offset=broadcast.offset,
            decode=False,
        )
        return plain, stored

    def _write_now(
        self, broadcast: Broadcast, groups: dict[str, dict[WireFormat, set[Subscriber]]]
    ) -> None:
        stream = broadcast.stream
        # The first broadcast of a tick goes out at once; later ones in the same tick are
        # corked.  Without a flusher (a Hub outside a running Server) nothing is corked.
        cork = self._in_tick
        if not cork and self._flusher is not None:
            self._in_tick = True
            trio.lowlevel.reschedule(self._flusher)
            self._flusher = None
        corked = self._corked
        offset = broadcast.offset
        plain, stored = self._encoders(broadcast)
        exclude = broadcast.exclude_socket
        sent = 0
        # Snapshots of the dicts: a send never subscribes or unsubscribes synchronously (a
        # failed connection leaves the hub later, from its own task), but a channel callback
        # triggered elsewhere might, and iteration must not see that.
        for identifier, kinds in list(groups.items()):
            for fmt, conns in list(kinds.items()):
                encoder = stored if fmt.extended else plain
                frame = fmt.frame(encoder.encode(fmt.codec, identifier))
                if exclude is None and not cork:
                    # The common case, kept to one call per recipient.
                    for conn in list(conns):
                        conn.send_broadcast(frame, stream, offset)
                    sent += len(conns)
                    continue
                for conn in list(conns):
                    if exclude is not None and conn.sid == exclude:
                        continue
                    if cork and conn.cork():
                        corked.append(conn)
                    conn.send_broadcast(frame, stream, offset)
                    sent += 1
        self._metrics.broadcast_frames_total += sent

    # -- big fan-outs --------------------------------------------------------------------

    def _audience(
        self, stream: str, groups: dict[str, dict[WireFormat, set[Subscriber]]]
    ) -> list[_Audience]:
        """The stream's subscribers as ``(identifier, format, list)`` groups, the same object
        as long as nobody subscribes or leaves (consecutive jobs then share it)."""
        version = self._versions.get(stream, 0)
        cached = self._audiences.get(stream)
        if cached is not None and cached[0] == version:
            return cached[1]
        audience = [
            _Audience(identifier, fmt, list(conns))
            for identifier, kinds in groups.items()
            for fmt, conns in kinds.items()
        ]
        self._audiences[stream] = (version, audience)
        return audience

    def _queue(
        self, broadcast: Broadcast, groups: dict[str, dict[WireFormat, set[Subscriber]]]
    ) -> Callable[[], Awaitable[None]] | None:
        audience = self._audience(broadcast.stream, groups)
        plain, stored = self._encoders(broadcast)
        frames = [
            group.format.frame(
                (stored if group.format.extended else plain).encode(
                    group.format.codec, group.identifier
                )
            )
            for group in audience
        ]
        job = _FanOut(broadcast, audience, frames)
        self._jobs.append(job)
        if self._fanout is not None:
            trio.lowlevel.reschedule(self._fanout)
            self._fanout = None
        # A publisher goes on while few jobs wait (those it queues back to back are written
        # together, a write per recipient for all of them), and waits for its own job once
        # the queue is long: memory stays bounded and publishers are paced by fan-outs.
        return job.done.wait if len(self._jobs) >= QUEUE_PACE else None

    async def run_fanout(self) -> None:
        """Write the queued big fan-outs, in order, a slice at a time (a task of the Server's;
        without it every broadcast is written at once)."""

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._fanout = None
            return trio.lowlevel.Abort.SUCCEEDED

        self._fanout_running = True
        jobs = self._jobs
        try:
            while True:
                if not jobs:
                    self._fanout = trio.lowlevel.current_task()
                    await trio.lowlevel.wait_task_rescheduled(abort)
                    continue
                # A run: the first job and those behind it to the very same audience.
                first = jobs[0]
                run = [first]
                if first.broadcast.exclude_socket is None:
                    for job in list(jobs)[1:]:
                        if job.audience is not first.audience or job.broadcast.exclude_socket:
                            break
                        run.append(job)
                try:
                    await self._write_run(run)
                except Exception:
                    log.exception("a broadcast fan-out failed")  # a bug: never the task
                for _ in run:
                    jobs.popleft().done.set()
        finally:
            self._fanout_running = False
            self._fanout = None
            # Whatever is left goes out now (the server is stopping).
            while jobs:
                job = jobs.popleft()
                self._write_now(job.broadcast, self._streams.get(job.broadcast.stream) or {})
                job.done.set()

    async def _write_run(self, run: list[_FanOut]) -> None:
        """Write the jobs of *run* (one audience), yielding every FANOUT_SLICE seconds.

        The recipients go in chunks of _CLOCK_EVERY, with a look at the clock between: the
        loop per recipient is the inline path's, one call, nothing else."""
        first = run[0].broadcast
        stream = first.stream
        offset = first.offset
        exclude = first.exclude_socket
        metrics = self._metrics
        clock = time.perf_counter
        deadline = clock() + FANOUT_SLICE
        for index, group in enumerate(run[0].audience):
            conns = group.conns
            if len(run) > 1:
                frames = [(job.frames[index], job.broadcast.offset) for job in run]
                joined = b"".join(frame for frame, _ in frames)
                metrics.coalesced_frames_total += len(conns) * (len(run) - 1)
            frame = run[0].frames[index]
            for start in range(0, len(conns), _CLOCK_EVERY):
                chunk = conns[start : start + _CLOCK_EVERY]
                if len(run) > 1:
                    for conn in chunk:
                        conn.send_broadcasts(joined, frames, stream)
                elif exclude is None:
                    for conn in chunk:
                        conn.send_broadcast(frame, stream, offset)
                else:
                    for conn in chunk:
                        if conn.sid != exclude:
                            conn.send_broadcast(frame, stream, offset)
                if clock() > deadline:
                    await trio.lowlevel.checkpoint()
                    deadline = clock() + FANOUT_SLICE
            metrics.broadcast_frames_total += len(conns) * len(run)

    def flush(self) -> None:
        """Write every corked connection's frames and start a new tick."""
        self._in_tick = False
        corked, self._corked = self._corked, []
        for conn in corked:
            conn.uncork()

    async def run_flusher(self) -> None:
        """Flush corked broadcasts one tick after the first broadcast of a tick (a task of
        the Server's; without it the hub never corks)."""

        def abort(_raise_cancel: object) -> trio.lowlevel.Abort:
            self._flusher = None
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            while True:
                self._flusher = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(abort)
                # Woken by the tick's first broadcast; running now means the tasks that were
                # runnable with it have had their turn.
                self.flush()
        finally:
            self._flusher = None
            self.flush()
