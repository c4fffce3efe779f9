"""The read reactor: one task that serves every idle connection's incoming data.

Parking a task per connection in ``trio.lowlevel.wait_readable`` costs, per message, an
``epoll_ctl`` to re-arm the socket, a wake-up through Trio's scheduler and a task switch:
about a third of a small echo's server time in a profile.  Instead, an idle connection
registers its socket once (edge-triggered) in this reactor's own epoll set and parks; when
data arrives, the reactor task reads, parses and handles it synchronously
(:meth:`Connection.on_readable`).  Only work that must await (an application callback, a broker
call, a close handshake, a flood that needs checkpoints) wakes the connection's own task,
which keeps strict per-connection ordering and the nursery per connection.
"""

from __future__ import annotations

import contextlib
import logging
import select
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from trio_cable.server.connection import Connection

log = logging.getLogger("trio_cable.reactor")

_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
_MAX_EVENTS = 1024


class Reactor:
    """An epoll set of parked connections, served by :meth:`run`."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._connections: dict[int, Connection] = {}

    def register(self, conn: Connection) -> None:
        """Watch *conn*'s socket from now until :meth:`unregister`."""
        fd = conn.sock.fileno()
        self._epoll.register(fd, _EVENTS)
        self._connections[fd] = conn

    def unregister(self, conn: Connection) -> None:
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
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll)
                for fd, _events in epoll.poll(0, _MAX_EVENTS):
                    conn = connections.get(fd)
                    if conn is None:
                        continue
                    try:
                        conn.on_readable()
                    except Exception:
                        # A bug must cost one connection, never the reactor.
                        log.exception("%r: unexpected error in the read fast path", conn)
                        conn.abort()
        finally:
            trio.lowlevel.notify_closing(epoll)
            epoll.close()
