"""websockets echo/broadcast peer (asyncio implementation on uvloop); with ``--compression``
its permessage-deflate as it ships (``compression="deflate"``: a compressor per connection,
context takeover, 12-bit windows)."""

from __future__ import annotations

import asyncio
import contextlib

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from bench.peers._args import BROADCAST_PREFIX, parse

CLIENTS: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    CLIENTS.add(ws)
    try:
        async for message in ws:
            if isinstance(message, str) and message.startswith(BROADCAST_PREFIX):
                broadcast(CLIENTS, message)
            else:
                await ws.send(message)
    except ConnectionClosed:
        pass
    finally:
        CLIENTS.discard(ws)


async def main() -> None:
    args = parse(__doc__ or "")
    async with serve(
        handler, args.host, args.port, compression="deflate" if args.compression else None,
        max_size=2**20, backlog=4096,
        ping_interval=None,
    ) as server:  # fmt: skip
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        uvloop.run(main())
