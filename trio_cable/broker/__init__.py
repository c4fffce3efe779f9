"""Brokers carry publications to every node's hub (and, later, keep history and sessions).

The embedded :class:`~trio_cable.broker.memory.MemoryBroker` is the default and needs nothing
installed; a Redis broker shares broadcasts between several nodes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from trio_cable.protocol.cable import Publication

#: Called by a broker for every publication that reaches this node.
#: Its return value (e.g. the number of frames written) is ignored by brokers.
Deliver = Callable[[Publication], object]


class Broker(Protocol):
    """What the server needs from a broker."""

    def bind(self, deliver: Deliver) -> None:
        """Set the function that hands publications to the local hub."""

    async def publish(self, publication: Publication) -> None:
        """Send *publication* to every node (this one included)."""

    def subscribe(self, stream: str) -> None:
        """This node now has local subscribers of *stream*."""

    def unsubscribe(self, stream: str) -> None:
        """This node no longer has local subscribers of *stream*."""
