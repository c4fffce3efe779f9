"""The embedded in-memory broker: one node, nothing to install."""

from __future__ import annotations

from trio_cable.broker import Deliver
from trio_cable.protocol.cable import Publication


class MemoryBroker:
    """Delivers every publication straight to the local hub, synchronously.

    With a single node there is nobody else to tell, so ``subscribe``/``unsubscribe`` only
    keep count (useful for tests and metrics).
    """

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self.streams: set[str] = set()

    def bind(self, deliver: Deliver) -> None:
        self._deliver = deliver

    async def publish(self, publication: Publication) -> None:
        if self._deliver is None:
            raise RuntimeError("MemoryBroker.publish() before bind()")
        self._deliver(publication)

    def subscribe(self, stream: str) -> None:
        self.streams.add(stream)

    def unsubscribe(self, stream: str) -> None:
        self.streams.discard(stream)
