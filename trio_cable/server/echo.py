"""The raw WebSocket echo endpoint (``--echo-path``): every message goes back as it came.

It exists for the framing tests (the Autobahn suite) and the raw echo benchmark: the same
transport as Action Cable clients, with no session on top.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

from trio_cable.protocol.codes import CloseCode, DisconnectReason
from trio_cable.protocol.frames import OP_BINARY, OP_TEXT, build_frame
from trio_cable.server.transport import Transport, Work

__all__ = ["EchoSession"]


class EchoNode(Protocol):
    """What an echo connection needs from its node: to be counted."""

    def attach(self, session: EchoSession) -> None: ...

    def detach(self, session: EchoSession) -> None: ...


class EchoSession:
    """Echoes one connection's messages (a :class:`~trio_cable.server.transport.Receiver`)."""

    __slots__ = ("ip", "node", "transport")

    #: Never identified: a remote disconnect never matches it.
    identifiers: ClassVar[dict[str, Any]] = {}

    def __init__(self, node: EchoNode, transport: Transport, *, ip: str = "") -> None:
        self.node = node
        self.transport = transport
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
        self.transport.write(build_frame(OP_BINARY if binary else OP_TEXT, payload))
        return None

    def farewell(self, reason: DisconnectReason) -> bytes | None:
        return None

    async def closing(self) -> None:
        self.node.detach(self)

    async def closed(self) -> None:
        return None
