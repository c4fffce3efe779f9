"""The seam between a transport (WebSocket, SSE, long polling) and what it
carries (an Action Cable session, or the raw echo endpoint).

A transport moves bytes: it reads the client's messages and hands each to its
:class:`Receiver`, and it writes what the receiver gives it without blocking, queueing only
when the socket is full.  A receiver decides what the messages mean and what to answer; it
knows nothing of sockets or frames beyond the :class:`WireFormat` it was given, which turns an
encoded message into the bytes this transport writes.

Nothing here does I/O; the module only states the contract, so that the session can be
written (and tested) against it without a socket.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from trio_cable.protocol.cable import Codec
from trio_cable.protocol.codes import DisconnectReason

__all__ = ["Receiver", "Transport", "WireFormat", "Work"]

#: The part of handling a message that must await (an application callback, a broker
#: call): a receiver returns it, and the transport's task awaits it before reading on, so a
#: connection's messages are still handled strictly in arrival order.
Work = Callable[[], Awaitable[None]]


@dataclass(frozen=True, eq=False, slots=True)
class WireFormat:
    """How one kind of client gets its messages: the codec, whether it speaks AnyCable's
    extended protocol (stream positions on broadcasts), and how the transport frames an
    encoded message.

    Transports intern their formats (one object per kind), so formats compare and hash by
    identity: the hub groups recipients by format and builds each broadcast frame once per
    group, and the ping ticker builds one ping frame per format.
    """

    codec: Codec
    extended: bool
    #: payload -> the bytes to write (e.g. a WebSocket text or binary frame).
    frame: Callable[[bytes], bytes]
    name: str = ""
    #: The client can send commands, pongs included: False for a receive-only transport
    #: (SSE), whose clients no pong timeout may disconnect.
    commands: bool = True

    def __repr__(self) -> str:
        return f"<WireFormat {self.name or self.codec.name}>"


class Transport(Protocol):
    """What a receiver may do with the connection that carries it."""

    @property
    def open(self) -> bool:
        """True until the close has begun (from either side) or the connection is lost."""
        ...

    @property
    def queued_bytes(self) -> int:
        """Bytes waiting for the socket to become writable."""
        ...

    def write(self, data: bytes) -> None:
        """Write ready bytes (a framed message) without blocking; queue them when the socket
        is full.  Ignored once the transport is not :attr:`open`."""

    def cork(self) -> bool:
        """Until :meth:`uncork`, every write joins one buffer (written in one ``send``).
        True when this call started the cork: the caller must then uncork soon."""
        ...

    def uncork(self) -> None:
        """Write what the cork collected."""

    def close(self, code: int) -> None:
        """Begin a clean close with *code*: what was written so far goes first, nothing may be
        written after it, and the connection ends when the client answers or the close
        timeout passes."""

    def abort(self) -> None:
        """Drop the connection now, without a close handshake."""


class Receiver(Protocol):
    """What a transport drives: the other side of the seam.

    Its methods are called in this order: :meth:`opened` once, :meth:`receive` for every
    client message, then :meth:`closing` and :meth:`closed` once each, whatever happened.
    """

    async def opened(self) -> None:
        """The transport is ready: greet the client (Action Cable's ``welcome``)."""

    def receive(self, payload: bytes, binary: bool) -> Work | None:
        """Handle one client message.  Without awaiting where possible (then None); else
        return the rest of the work, which the transport awaits before the next message."""
        ...

    def farewell(self, reason: DisconnectReason) -> bytes | None:
        """The framed last message for a client the transport must drop (``too_slow``), or
        None; the transport tries to write it before hanging up."""
        ...

    async def closing(self) -> None:
        """The connection has ended, the socket is still open: last chance to store state
        a reconnecting client will look for."""

    async def closed(self) -> None:
        """The socket is closed: release what is left (application callbacks may run)."""
