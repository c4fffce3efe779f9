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
        self._streams: dict[str, dict[str, set[Connection]]] = {}
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
        groups.setdefault(identifier, set()).add(conn)

    def remove(self, stream: str, identifier: str, conn: Connection) -> None:
        """Undo :meth:`add`; unknown entries are ignored."""
        groups = self._streams.get(stream)
        if groups is None:
            return
        conns = groups.get(identifier)
        if conns is None:
            return
        conns.discard(conn)
        if not conns:
            del groups[identifier]
            if not groups:
                del self._streams[stream]
                self._on_last(stream)

    def subscribers(self, stream: str) -> int:
        """Number of (connection, identifier) pairs on *stream*."""
        return sum(len(c) for c in self._streams.get(stream, {}).values())

    def deliver(self, broadcast: Broadcast) -> int:
        """Fan *broadcast* out to local subscribers; return the number of frames written.

        Clients of the extended protocols get the stream position (``stream_id``, ``epoch``,
        ``offset``) with each stored message; plain Action Cable clients get none, exactly as
        Rails would send it."""
        groups = self._streams.get(broadcast.stream)
        self._metrics.broadcasts_total += 1
        if not groups:
            return 0
        plain = BroadcastEncoder(broadcast.data)
        stored = plain
        if broadcast.offset is not None:
            stored = BroadcastEncoder(
                plain.message,
                stream_id=broadcast.stream,
                epoch=broadcast.epoch,
                offset=broadcast.offset,
                decode=False,
            )
        exclude = broadcast.exclude_socket
        sent = 0
        # Snapshot: a write may fail and close a connection, which mutates these sets.
        for identifier, conns in list(groups.items()):
            frames: dict[tuple[Codec, bool], bytes] = {}
            for conn in list(conns):
                if exclude is not None and conn.sid == exclude:
                    continue
                key = (conn.codec, conn.extended)
                frame = frames.get(key)
                if frame is None:
                    encoder = stored if conn.extended else plain
                    payload = encoder.encode(conn.codec, identifier)
                    frame = build_frame(OP_BINARY if conn.codec.binary else OP_TEXT, payload)
                    frames[key] = frame
                conn.send_broadcast(frame, broadcast.stream, broadcast.offset)
                sent += 1
        self._metrics.broadcast_frames_total += sent
        return sent
