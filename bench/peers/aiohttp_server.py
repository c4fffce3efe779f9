"""aiohttp echo/broadcast peer on uvloop: ``WebSocketResponse`` and ``async for``."""

from __future__ import annotations

import asyncio
import contextlib

import uvloop
from aiohttp import WSMsgType, web

from bench.peers._args import BROADCAST_PREFIX, parse

CLIENTS: set[web.WebSocketResponse] = set()


async def handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False, autoping=True)
    await ws.prepare(request)
    CLIENTS.add(ws)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                if msg.data.startswith(BROADCAST_PREFIX):
                    for client in list(CLIENTS):
                        await client.send_str(msg.data)
                else:
                    await ws.send_str(msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
    finally:
        CLIENTS.discard(ws)
    return ws


async def main() -> None:
    args = parse(__doc__ or "")
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=4096)
    await site.start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main())
