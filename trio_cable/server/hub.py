"""The hub: which local connections listen to which stream, and broadcast fan-out.

A broadcast is decoded once, encoded once per (identifier, codec) group, framed once per
group, and the same ``bytes`` frame is handed to every connection of the group with a
non-blocking write: no task, channel or lock per recipient (ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from trio_cable.broker import Broadcast
from trio_cable.protocol.cable import BroadcastEncoder, Codec
from trio_cable.protocol.frames import OP_BINARY, OP_TEXT, build_frame

if TYPE_CHECKING:
    from trio_cable.metrics import Metrics
    from trio_cable.server.connection import Connection


class Hub:
    """stream -> identifier -> set of connections subscribed with that identifier."""

    def __init__(
        self,
        metrics: Metrics,
        on_first: Callable[[str], None] = lambda stream: None,
        on_last: Callable[[str], None] = lambda stream: None,
    ) -> None:
        # stream -> identifier -> (codec, extended) -> connections.  Grouping by the wire
        # format at subscribe time leaves the broadcast loop nothing to do per recipient but
        # hand over the shared frame.
        self._streams: dict[str, dict[str, dict[tuple[Codec, bool], set[Connection]]]] = {}
        self._metrics = metrics
        # Tell the broker when this node starts / stops caring about a stream.
        self._on_first = on_first
        self._on_last = on_last

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, stream: str, identifier: str, conn: Connection) -> None:
        """Subscribe *conn*'s *identifier* to *stream*."""
        groups = self._streams.get(stream)
        if groups is None:
            groups = self._streams[stream] = {}
            self._on_first(stream)
        kinds = groups.get(identifier)
        if kinds is None:
            kinds = groups[identifier] = {}
        kinds.setdefault((conn.codec, conn.extended), set()).add(conn)

    def remove(self, stream: str, identifier: str, conn: Connection) -> None:
        """Undo :meth:`add`; unknown entries are ignored."""
        groups = self._streams.get(stream)
        if groups is None:
            return
        kinds = groups.get(identifier)
        if kinds is None:
            return
        key = (conn.codec, conn.extended)
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
            for (codec, extended), conns in list(kinds.items()):
                encoder = stored if extended else plain
                frame = build_frame(
                    OP_BINARY if codec.binary else OP_TEXT, encoder.encode(codec, identifier)
                )
                if exclude is None:
                    for conn in list(conns):
                        conn.send_broadcast(frame, stream, offset)
                    sent += len(conns)
                else:
                    for conn in list(conns):
                        if conn.sid != exclude:
                            conn.send_broadcast(frame, stream, offset)
                            sent += 1
        self._metrics.broadcast_frames_total += sent
        return sent
