"""picows client connections for both dialects and a bounded-concurrency connector."""

from __future__ import annotations

import asyncio
import json
import random
import zlib
from collections.abc import Callable

from picows import (
    WSFrame,
    WSInvalidStatusError,
    WSListener,
    WSMsgType,
    WSTransport,
    ws_connect,
)

CABLE_SUBPROTOCOL = "actioncable-v1-json"
#: What a browser offers (Chromium's offer).  The client inflates what comes compressed; it
#: sends its own messages uncompressed, which permessage-deflate allows.
DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
_TAIL = b"\x00\x00\xff\xff"
CHANNEL_ID = "1"
IDENTIFIER = json.dumps({"channel": "BenchmarkChannel", "id": CHANNEL_ID})
_CONNECT_TIMEOUT = 30.0

DataHandler = Callable[["Client", bytes], None]


def _ignore(_client: Client, _payload: bytes) -> None:
    pass


class Client(WSListener):  # type: ignore[misc]
    """One connection.  Data frames go to ``on_data`` unless a pending ``expect`` takes them."""

    def __init__(self) -> None:
        super().__init__()
        self.transport: WSTransport | None = None
        self.on_data: DataHandler = _ignore
        self.closed = False
        self._want: bytes | None = None
        self._waiter: asyncio.Future[bytes] | None = None
        #: Payload bytes of the data frames received, as they came (compressed or not).
        self.wire_bytes = 0
        # One inflater for the connection, made at the first compressed frame: it decodes
        # servers that keep their context (websockets) and those that do not (trio_cable).
        self._inflater: zlib._Decompress | None = None

    def expect(self, marker: bytes) -> asyncio.Future[bytes]:
        """A future for the next data frame containing *marker*."""
        self._want = marker
        self._waiter = asyncio.get_running_loop().create_future()
        return self._waiter

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.closed = True

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT or kind == WSMsgType.BINARY:
            payload = frame.get_payload_as_bytes()
            self.wire_bytes += len(payload)
            if frame.rsv1:
                if self._inflater is None:
                    self._inflater = zlib.decompressobj(-15)
                payload = self._inflater.decompress(payload + _TAIL)
            waiter = self._waiter
            if waiter is not None and self._want is not None and self._want in payload:
                self._waiter = None
                if not waiter.done():
                    waiter.set_result(payload)
                return
            self.on_data(self, payload)
        elif kind == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
        elif kind == WSMsgType.CLOSE:
            transport.disconnect()

    def send_text(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, data)

    def send(self, binary: bool, data: bytes) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.BINARY if binary else WSMsgType.TEXT, data)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.disconnect()


def cable_command(command: str, **fields: object) -> bytes:
    """An Action Cable command for the benchmark identifier."""
    return json.dumps({"command": command, "identifier": IDENTIFIER, **fields}).encode()


def cable_action(action: str, **data: object) -> bytes:
    """A ``message`` command performing *action* on BenchmarkChannel."""
    return cable_command("message", data=json.dumps({"action": action, **data}))


_RETRIES = 20


async def connect_one(
    url: str, dialect: str, compression: bool = False, *, source: str | None = None,
    identifier: str = IDENTIFIER, client: Client | None = None,
) -> Client:  # fmt: skip
    """Open one connection, retrying a refused handshake (503/429) with jittered backoff;
    with *compression*, offering permessage-deflate; from the local address *source* if
    given (every 127.0.0.x is the loopback: each has its own ephemeral ports); in the cable
    dialect subscribed to *identifier*; *client* is the listener to use (cable dialect)."""
    for attempt in range(_RETRIES):
        try:
            return await _connect_once(url, dialect, compression, source, identifier, client)
        except WSInvalidStatusError:
            if attempt == _RETRIES - 1:
                raise
            await asyncio.sleep(random.uniform(0.05, 0.2) * min(attempt + 1, 5))
    raise AssertionError("unreachable")


async def _connect_once(
    url: str, dialect: str, compression: bool = False, source: str | None = None,
    identifier: str = IDENTIFIER, listener: Client | None = None,
) -> Client:  # fmt: skip
    """Open one connection; in the cable dialect also wait for welcome and subscribe."""
    offer = {"Sec-WebSocket-Extensions": DEFLATE_OFFER} if compression else {}
    local = {"local_addr": (source, 0)} if source else {}
    if dialect == "cable":
        client = listener or Client()
        welcome = client.expect(b'"welcome"')
        headers = {"Sec-WebSocket-Protocol": CABLE_SUBPROTOCOL, **offer}
        await ws_connect(lambda: client, url, extra_headers=headers, **local)
        await welcome
        confirmed = client.expect(b'"confirm_subscription"')
        client.send_text(json.dumps({"command": "subscribe", "identifier": identifier}).encode())
        await confirmed
        return client
    _t, made = await ws_connect(Client, url, extra_headers=offer or None, **local)
    return made  # type: ignore[no-any-return]


async def connect_many(
    url: str, dialect: str, count: int, concurrency: int = 200, compression: bool = False,
    source: str | None = None,
) -> list[Client]:  # fmt: skip
    """Open *count* connections, at most *concurrency* handshakes at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one() -> Client:
        async with gate:
            return await connect_one(url, dialect, compression, source=source)

    async with asyncio.timeout(_CONNECT_TIMEOUT + count / 200):
        return list(await asyncio.gather(*(one() for _ in range(count))))
