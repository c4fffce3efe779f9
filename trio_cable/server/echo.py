"""The raw WebSocket echo endpoint (``--echo-path``): every message goes back as it came.

It exists for the framing tests (the Autobahn suite) and the raw echo benchmark: the same
transport as Action Cable clients, with no session on top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

from trio_cable.protocol.codes import CloseCode, DisconnectReason
from trio_cable.server.transport import Transport, Work

__all__ = ["EchoSession"]


class EchoNode(Protocol):
    """What an echo connection needs from its node: to be counted."""

    def attach(self, session: EchoSession) -> None: ...

    def detach(self, session: EchoSession) -> None: ...


class EchoSession:
    """Echoes one connection's messages (a :class:`~trio_cable.server.transport.Receiver`)."""

    __slots__ = ("_frame_binary", "_frame_text", "ip", "node", "transport")

    #: Never identified: a remote disconnect never matches it.
    identifiers: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        node: EchoNode,
        transport: Transport,
        frame_text: Callable[[bytes], bytes],
        frame_binary: Callable[[bytes], bytes],
        *,
        ip: str = "",
    ) -> None:
        """*frame_text* / *frame_binary* frame a text / binary message for this connection
        (compressed when it negotiated permessage-deflate)."""
        self.node = node
        self.transport = transport
        self._frame_text = frame_text
        self._frame_binary = frame_binary
        self.ip = ip

    @property
    def is_open(self) -> bool:
        return self.transport.open

    @property
    def queued_bytes(self) -> int:
        return self.transport.queued_bytes

    def close(
        self,
        reason: DisconnectReason | None = None,
        *,
        reconnect: bool = True,
        code: int = CloseCode.NORMAL,
        reconnect_after_ms: int | None = None,
    ) -> None:
        """Close with *code*; there is no Action Cable ``disconnect`` to send here."""
        self.transport.close(code)

    def abort(self) -> None:
        self.transport.abort()

    async def opened(self) -> None:
        self.node.attach(self)

    def receive(self, payload: bytes, binary: bool) -> Work | None:
        self.transport.write((self._frame_binary if binary else self._frame_text)(payload))
        return None

    def farewell(self, reason: DisconnectReason) -> bytes | None:
        return None

    async def closing(self) -> None:
        self.node.detach(self)

    async def closed(self) -> None:
        return None
