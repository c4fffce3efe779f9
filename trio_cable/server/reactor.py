"""The read reactor: one task that serves every idle connection's incoming data.

Parking a task per connection in ``trio.lowlevel.wait_readable`` costs, per message, an
``epoll_ctl`` to re-arm the socket, a wake-up through Trio's scheduler and a task switch:
about a third of a small echo's server time in a profile.  Instead, an idle connection
registers its socket once (edge-triggered) in this reactor's own epoll set and parks; when
data arrives, the reactor task reads, parses and handles it synchronously
(:meth:`Readable.on_readable`).  Only work that must await (an application callback, a broker
call, a close handshake, a flood that needs checkpoints) wakes the connection's own task,
which keeps strict per-connection ordering and the nursery per connection.

Where there is no epoll (macOS, Windows), or when ``TRIO_CABLE_NO_EPOLL=1`` forces it (so
that the path is tested on Linux too), :func:`reactor_available` is False and connections
wait in Trio's own ``wait_readable``: slower, the same behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
from typing import Protocol

import trio

log = logging.getLogger("trio_cable.reactor")

_MAX_EVENTS = 1024

#: Set to 1 to serve every connection on Trio's ``wait_readable`` path (no epoll reactor).
NO_EPOLL_ENV = "TRIO_CABLE_NO_EPOLL"


def reactor_available() -> bool:
    """True when this platform has epoll and ``TRIO_CABLE_NO_EPOLL`` does not turn it off."""
    return hasattr(select, "epoll") and not os.environ.get(NO_EPOLL_ENV)


class Readable(Protocol):
    """What the reactor needs of a parked connection."""

    @property
    def sock(self) -> socket.socket: ...

    def on_readable(self, hangup: bool) -> None:
        """Read and handle what arrived, without awaiting.  *hangup*: the peer also closed
        (its FIN came with this edge, and no later edge will report it)."""

    def abort(self) -> None:
        """Drop the connection (after a bug in :meth:`on_readable`)."""


class Reactor:
    """An epoll set of parked connections, served by :meth:`run`.  Only where
    :func:`reactor_available` says so."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._events = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
        self._hangups = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
        self._connections: dict[int, Readable] = {}

    def register(self, conn: Readable) -> None:
        """Watch *conn*'s socket from now until :meth:`unregister`."""
        fd = conn.sock.fileno()
        self._epoll.register(fd, self._events)
        self._connections[fd] = conn

    def unregister(self, conn: Readable) -> None:
        """Stop watching *conn* (before its socket closes)."""
        fd = conn.sock.fileno()
        if self._connections.get(fd) is conn:
            del self._connections[fd]
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    async def run(self) -> None:
        """Serve readable connections until cancelled."""
        epoll = self._epoll
        connections = self._connections
        hangups = self._hangups
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll)
                for fd, events in epoll.poll(0, _MAX_EVENTS):
                    conn = connections.get(fd)
                    if conn is None:
                        continue
                    try:
                        conn.on_readable(bool(events & hangups))
                    except Exception:
                        # A bug must cost one connection, never the reactor.
                        log.exception("%r: unexpected error in the read fast path", conn)
                        conn.abort()
        finally:
            trio.lowlevel.notify_closing(epoll)
            epoll.close()
