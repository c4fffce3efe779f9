"""The Trio server: listener, connections, hub and HTTP endpoints."""

from trio_cable.server.node import Server

__all__ = ["Server"]
