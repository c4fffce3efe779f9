"""trio-websocket echo/broadcast peer: ``serve_websocket`` and a sequential send per recipient."""

from __future__ import annotations

import contextlib

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from bench.peers._args import BROADCAST_PREFIX, parse

CLIENTS: set[WebSocketConnection] = set()


async def handler(request: WebSocketRequest) -> None:
    ws = await request.accept()
    CLIENTS.add(ws)
    try:
        while True:
            message = await ws.get_message()
            if isinstance(message, str) and message.startswith(BROADCAST_PREFIX):
                for client in list(CLIENTS):
                    try:
                        await client.send_message(message)
                    except ConnectionClosed:
                        CLIENTS.discard(client)
            else:
                await ws.send_message(message)
    except ConnectionClosed:
        pass
    finally:
        CLIENTS.discard(ws)


async def main() -> None:
    args = parse(__doc__ or "")
    await serve_websocket(handler, args.host, args.port, ssl_context=None, max_message_size=2**20)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main)
