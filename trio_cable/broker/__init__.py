"""Brokers carry publications to every node's hub, keep stream history, and hold sessions.

The embedded :class:`~trio_cable.broker.memory.MemoryBroker` is the default and needs nothing
installed (several servers in one process may share one); a Redis broker shares broadcasts,
history and sessions between processes and machines.

Everything a broker stores is plain data (strings, numbers, lists, dicts), so that any broker
can keep it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio


@dataclass(frozen=True, slots=True)
class Broadcast:
    """A publication as the hub delivers it: with its stream position when it was stored."""

    stream: str
    data: Any  # as published: usually the JSON text of the message
    epoch: str | None = None
    offset: int | None = None
    exclude_socket: str | None = None
    #: The message's ``type``: None for data, ``"presence"`` for presence events (which are
    #: transient, like whispers: no history, no position).
    kind: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One stored message of a stream."""

    offset: int
    time: float  # unix seconds when it was published
    data: Any
    epoch: str


class HistoryUnavailable(Exception):
    """The requested history cannot be served completely (epoch changed, or the position is
    no longer in the window): the client must get ``reject_history``, never a silent gap."""


class SessionTooLarge(ValueError):
    """A session's stored form is over the size limit: it is not kept (its client gets a
    fresh connect on its next visit)."""


def encode_session(data: dict[str, Any], max_size: int) -> str:
    """The stored form of a session (JSON text), or :class:`SessionTooLarge`."""
    text = json.dumps(data)
    if len(text) > max_size:
        raise SessionTooLarge(f"session of {len(text)} bytes (limit {max_size})")
    return text


#: Called for every broadcast that reaches this node.  It returns None when the broadcast was
#: written to the node's subscribers, or a function to await until it is (a big fan-out the
#: node writes in slices); the in-memory broker's ``publish`` awaits it.
Deliver = Callable[[Broadcast], "Callable[[], Awaitable[None]] | None"]
#: The ``kind`` of presence broadcasts (their messages' ``type``).
PRESENCE = "presence"

#: Called for every node command (e.g. a remote disconnect) that reaches this node.
CommandHandler = Callable[[dict[str, Any]], object]


class LocalNodes:
    """The bookkeeping every broker shares: which nodes of this process are attached, and
    how many of them have local subscribers per stream."""

    def __init__(self) -> None:
        self._nodes: dict[Deliver, CommandHandler] = {}
        self.streams: dict[str, int] = {}  # stream -> nodes with local subscribers

    def bind(self, deliver: Deliver, on_command: CommandHandler) -> None:
        """Attach a node: it receives every broadcast and node command from now on."""
        self._nodes[deliver] = on_command

    def unbind(self, deliver: Deliver) -> None:
        """Detach a node (when it stops)."""
        self._nodes.pop(deliver, None)

    def subscribe(self, stream: str) -> None:
        """A node here now has local subscribers of *stream*."""
        self.streams[stream] = self.streams.get(stream, 0) + 1

    def unsubscribe(self, stream: str) -> None:
        """A node here no longer has local subscribers of *stream*."""
        count = self.streams.get(stream, 0) - 1
        if count > 0:
            self.streams[stream] = count
        else:
            self.streams.pop(stream, None)


class Broker(Protocol):
    """What a server node needs from a broker."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect and serve (background reading, reconnecting) until cancelled; call
        ``task_status.started()`` once usable.  Nodes sharing a broker may each call it."""

    def bind(self, deliver: Deliver, on_command: CommandHandler) -> None:
        """Attach a node: it receives every broadcast and node command from now on."""

    def unbind(self, deliver: Deliver) -> None:
        """Detach a node (when it stops)."""

    async def publish(self, stream: str, data: Any, exclude_socket: str | None = None) -> None:
        """Store *data* in *stream*'s history and deliver it to every node."""

    async def publish_transient(
        self,
        stream: str,
        data: Any,
        *,
        exclude_socket: str | None = None,
        kind: str | None = None,
    ) -> None:
        """Deliver *data* to every node without storing it (whispers): no history, no
        position."""

    async def publish_command(self, command: dict[str, Any]) -> None:
        """Deliver a node command to every node."""

    async def presence_join(self, stream: str, sid: str, pid: str, info: Any) -> None:
        """Session *sid* is present on *stream* as *pid* (with *info*, any JSON value or
        None); a ``join`` event reaches every node when *pid* is new to the stream."""

    async def presence_leave(self, stream: str, sid: str) -> None:
        """Session *sid* left *stream*'s presence; a ``leave`` event reaches every node when
        it held its presence id last."""

    async def presence_linger(self, stream: str, sid: str, ttl: float) -> None:
        """Session *sid* disconnected: its presence on *stream* ends in *ttl* seconds unless
        a session joins as the same id before (then nobody hears of it)."""

    async def presence_info(self, stream: str) -> tuple[int, list[dict[str, Any]]]:
        """``(total, records)`` of *stream*'s presence: ``[{"info": ..., "id": ...}]``."""

    def subscribe(self, stream: str) -> None:
        """This node now has local subscribers of *stream*."""

    def unsubscribe(self, stream: str) -> None:
        """This node no longer has local subscribers of *stream*."""

    async def history_since_offset(
        self, stream: str, epoch: str, offset: int
    ) -> list[HistoryEntry]:
        """Entries after *offset*; raises :class:`HistoryUnavailable` when that is impossible."""

    async def history_since_time(self, stream: str, since: float) -> list[HistoryEntry]:
        """Entries published at or after unix time *since* that are still kept."""

    async def save_session(self, sid: str, data: dict[str, Any], ttl: float) -> None:
        """Keep a resumable session for *ttl* seconds.  *data* is plain JSON-serializable data;
        a broker keeps a copy (JSON text), never the caller's objects.  Raises
        :class:`SessionTooLarge` for a session over the broker's size limit."""

    async def take_session(self, sid: str) -> dict[str, Any] | None:
        """Return and forget a session (a session restores at most once)."""
