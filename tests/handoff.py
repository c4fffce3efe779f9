"""Handing a port from one server node to its replacement, in one process."""

from __future__ import annotations

import trio

from trio_cable import Server


async def hand_over(old: Server) -> None:
    """Stop *old* accepting and wait until its port is free for a new node to bind.

    ``stop_accepting`` lets the accept loop take what the kernel already queued before it
    closes the socket, so the port is released a moment later, not at once."""
    port = old.port
    old.stop_accepting()
    with trio.fail_after(10):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(0.01)
