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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from trio_cable.broker import Broadcast
from trio_cable.metrics import Metrics
from trio_cable.protocol.cable import BroadcastEncoder
from trio_cable.server.transport import WireFormat

__all__ = ["Hub", "Subscriber"]


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

    def cork(self) -> bool:
        """Start collecting writes for one ``send``; True when this call started it."""
        ...

    def uncork(self) -> None:
        """Write what was collected."""


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
        if not conns:
            del kinds[key]
            if not kinds:
                del groups[identifier]
                if not groups:
                    del self._streams[stream]
                    self._on_last(stream)

    def subscribers(self, stream: str) -> int:
        """Number of (connection, identifier) pairs on *stream*."""
        return sum(
            len(conns)
            for kinds in self._streams.get(stream, {}).values()
            for conns in kinds.values()
        )

    def deliver(self, broadcast: Broadcast) -> int:
        """Fan *broadcast* out to local subscribers; return the number of frames written.

        Clients of the extended protocols get the stream position (``stream_id``, ``epoch``,
        ``offset``) with each stored message; plain Action Cable clients get none, exactly as
        Rails would send it."""
        stream = broadcast.stream
        groups = self._streams.get(stream)
        self._metrics.broadcasts_total += 1
        if not groups:
            return 0
        # The first broadcast of a tick goes out at once; later ones in the same tick are
        # corked.  Without a flusher (a Hub outside a running Server) nothing is corked.
        cork = self._in_tick
        if not cork and self._flusher is not None:
            self._in_tick = True
            trio.lowlevel.reschedule(self._flusher)
            self._flusher = None
        corked = self._corked
        offset = broadcast.offset
        plain = BroadcastEncoder(broadcast.data)
        stored = plain
        if offset is not None:
            stored = BroadcastEncoder(
                plain.message, stream_id=stream, epoch=broadcast.epoch, offset=offset, decode=False
            )
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
        return sent

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
