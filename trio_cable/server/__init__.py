"""The Trio server: the node, its transports, sessions, executor and hub.

``Server`` is imported on first use, so that importing one of this package's modules (the
transport interfaces, the history gate) does not load all of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Server"]

if TYPE_CHECKING:
    from trio_cable.server.node import Server


def __getattr__(name: str) -> Any:
    if name == "Server":
        from trio_cable.server.node import Server

        return Server
    raise AttributeError(f"module 'trio_cable.server' has no attribute {name!r}")
