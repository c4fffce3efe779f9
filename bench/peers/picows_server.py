"""picows echo/broadcast peer on uvloop: the natural picows idiom, a listener per connection."""

from __future__ import annotations

import contextlib

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from bench.peers._args import parse

CLIENTS: set[WSTransport] = set()
_PREFIX = b"!b"


class EchoListener(WSListener):  # type: ignore[misc]
    """Echo data frames; broadcast text frames that start with ``!b``."""

    def on_ws_connected(self, transport: WSTransport) -> None:
        CLIENTS.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        CLIENTS.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT or kind == WSMsgType.BINARY:
            view = frame.get_payload_as_memoryview()
            if kind == WSMsgType.TEXT and view[:2] == _PREFIX:
                payload = bytes(view)
                for client in CLIENTS:
                    client.send(WSMsgType.TEXT, payload)
            else:
                transport.send(kind, view)
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()


async def main() -> None:
    args = parse(__doc__ or "")
    server = await ws_create_server(lambda _request: EchoListener(), args.host, args.port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(main())
