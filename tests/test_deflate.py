"""permessage-deflate (RFC 7692): negotiation, the frame kernels' RSV1, inflate limits, and
compressed broadcasts and commands over real sockets.

The negotiation and the compressor are sans-I/O and tested without sockets; the rest talks to
a real server with a hand-driven client, which sees the RSV1 bit and the raw deflated bytes.
"""

from __future__ import annotations

import json
import os
import zlib

import pytest
import trio

from tests.conftest import RawClient, eventually, identifier
from trio_cable import _speedups_py
from trio_cable.config import Config, ConfigError
from trio_cable.protocol.codes import COMPRESSED, OP_BINARY, OP_CLOSE, OP_TEXT
from trio_cable.protocol.deflate import (
    DeflateParams,
    DeflateSettings,
    InflateError,
    compressor,
    inflate,
    negotiate_deflate,
    parse_offers,
)
from trio_cable.server.node import Server

try:
    from trio_cable import _speedups as _compiled  # type: ignore[attr-defined]
except ImportError:
    _compiled = None

KERNELS = [
    pytest.param(_speedups_py, id="pure"),
    pytest.param(
        _compiled, id="compiled", marks=pytest.mark.skipif(_compiled is None, reason="not built")
    ),
]
MASK = b"\x11\x22\x33\x44"
OFFER = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
SETTINGS = DeflateSettings()


def deflate_raw(data: bytes) -> bytes:
    """What a client sends for *data*: raw DEFLATE, sync-flushed, without the 4-byte tail."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH))[:-4]


def inflate_raw(data: bytes) -> bytes:
    """What a client does with a compressed server frame (a fresh inflater: no takeover)."""
    return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")


# -- negotiation (sans I/O) -------------------------------------------------------------------


def test_offers_are_parsed_in_order_with_their_parameters() -> None:
    header = (
        'x-webkit-deflate-frame, permessage-deflate; server_max_window_bits="10"; '
        "client_max_window_bits, permessage-deflate"
    )
    assert parse_offers(header) == [
        {"server_max_window_bits": "10", "client_max_window_bits": None},
        {},
    ]


@pytest.mark.parametrize(
    ("header", "window"),
    [
        ("permessage-deflate", 15),
        ("permessage-deflate; client_max_window_bits", 15),
        ("permessage-deflate; client_max_window_bits=10", 15),
        ("permessage-deflate; server_no_context_takeover; client_no_context_takeover", 15),
        ("permessage-deflate; server_max_window_bits=9", 9),
        # An offer the server cannot honour is skipped for the next one.
        ("permessage-deflate; server_max_window_bits=8, permessage-deflate", 15),
    ],
)
def test_acceptable_offers(header: str, window: int) -> None:
    params = negotiate_deflate(header, SETTINGS)
    assert params == DeflateParams(window, SETTINGS.level, SETTINGS.threshold)
    response = params.response()
    # Always both no-context-takeover parameters: no zlib state kept per connection.
    assert response.startswith(
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
    )
    assert ("server_max_window_bits=9" in response) == (window == 9)


@pytest.mark.parametrize(
    "header",
    [
        "permessage-deflate; server_max_window_bits=8",  # zlib cannot deflate with 256 bytes
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits",  # needs a value
        "permessage-deflate; server_max_window_bits=0x0f",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; server_no_context_takeover=1",
        "permessage-deflate; mystery_param",
        "permessage-deflate; client_max_window_bits; client_max_window_bits",  # repeated
        "x-webkit-deflate-frame",
        "",
    ],
)
def test_offers_that_are_declined(header: str) -> None:
    assert negotiate_deflate(header, SETTINGS) is None


def test_compressed_messages_stand_alone() -> None:
    """One compressor serves every message of a window size: each must inflate with a fresh
    inflater (no back reference to an earlier message), which a broadcast shared between
    recipients that joined at different times needs."""
    comp = compressor(DeflateParams())
    messages = [os.urandom(64) + b"the same words again " * 40 for _ in range(5)]
    out = [comp.compress(m) for m in messages]
    assert all(inflate_raw(o) == m for o, m in zip(out, messages, strict=True))
    assert len(out[1]) < len(messages[1]) // 3
    # The same message compresses to the same bytes however many came before it.
    assert comp.compress(messages[0]) == out[0]


def test_inflate_is_capped_and_refuses_bad_data() -> None:
    bomb = deflate_raw(b"\x00" * (10 << 20))  # 10 MiB of zeros: ~10 KiB compressed
    assert len(bomb) < 20_000
    with pytest.raises(InflateError) as info:
        inflate(bomb, 1 << 20)
    assert info.value.code == 1009
    assert inflate(deflate_raw(b"x" * 1000), 1000) == b"x" * 1000
    with pytest.raises(InflateError) as info:
        inflate(deflate_raw(b"x" * 1001), 1000)
    assert info.value.code == 1009
    with pytest.raises(InflateError) as info:
        inflate(b"\xff\xff\xff\xff", 1000)
    assert info.value.code == 1007


def test_compression_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="compression_level"):
        Config(compression_level=10).validate()
    with pytest.raises(ConfigError, match="compression_level"):
        Config(compression_level=0).validate()
    with pytest.raises(ConfigError, match="compression_threshold"):
        Config(compression_threshold=-1).validate()


# -- the frame kernels' RSV1 ------------------------------------------------------------------


def _messages(k, data: bytes, **options) -> list:
    parser = k.FrameParser(**options)
    parser.feed(data)
    out: list = []
    try:
        while (message := parser.next_message()) is not None:
            out.append(message)
    except k.FrameError as exc:
        out.append(("error", exc.code, exc.reason))
    return out


@pytest.mark.parametrize("k", KERNELS)
def test_rsv1_marks_a_compressed_message_only_when_negotiated(k) -> None:
    body = deflate_raw("héllo ".encode() * 20)
    frame = k.build_frame(OP_TEXT, body, True, MASK, 4)
    assert _messages(k, frame, compression=True) == [(OP_TEXT | COMPRESSED, body)]
    # Not negotiated: RSV1 is a reserved bit like the others.
    assert _messages(k, frame) == [("error", 1002, "reserved bits set")]
    # A fragmented compressed message: RSV1 on the first frame only; the deflated bytes are
    # not UTF-8 and must not be validated as text before they are inflated.
    frames = k.build_frame(OP_BINARY, body[:7], False, MASK, 4) + k.build_frame(
        0, body[7:], True, MASK, 0
    )
    assert _messages(k, frames, compression=True) == [(OP_BINARY | COMPRESSED, body)]
    # An uncompressed message on a compressed connection is a plain one.
    plain = k.build_frame(OP_TEXT, b"plain", True, MASK, 0)
    assert _messages(k, plain, compression=True) == [(OP_TEXT, b"plain")]


@pytest.mark.parametrize("k", KERNELS)
@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([(OP_TEXT, False, 0), (0, True, 4)], "RSV1 set on a continuation or control frame"),
        ([(9, True, 4)], "RSV1 set on a continuation or control frame"),
        ([(OP_TEXT, True, 2)], "reserved bits set"),  # RSV2
        ([(OP_TEXT, True, 6)], "reserved bits set"),  # RSV1 + RSV2
    ],
)
def test_misplaced_reserved_bits_are_protocol_errors(k, frames, reason: str) -> None:
    data = b"".join(k.build_frame(op, b"ab", fin, MASK, rsv) for op, fin, rsv in frames)
    assert _messages(k, data, compression=True)[-1] == ("error", 1002, reason)


# -- over real sockets ------------------------------------------------------------------------


@pytest.fixture
def config(config: Config) -> Config:
    config.compression = True
    config.compression_threshold = 256
    return config


async def _subscribe(client: RawClient, stream: str, *, compress: bool = False) -> None:
    command = json.dumps({"command": "subscribe", "identifier": identifier(stream=stream)}).encode()
    if compress:
        await client.send_frame(OP_TEXT, deflate_raw(command), rsv=4)
    else:
        await client.send_frame(OP_TEXT, command)
    while True:
        frame = await client.read_frame_rsv(timeout=30)
        assert frame is not None
        _opcode, payload, rsv = frame
        text = inflate_raw(payload) if rsv & 4 else payload
        if json.loads(text).get("type") == "confirm_subscription":
            return


async def _next(client: RawClient) -> tuple[int, bytes, int]:
    """The next frame that is not a ping (the server pings every few seconds)."""
    while True:
        frame = await client.read_frame_rsv(timeout=30)
        assert frame is not None, "connection closed"
        _opcode, payload, rsv = frame
        text = inflate_raw(payload) if rsv & 4 else payload
        if json.loads(text).get("type") != "ping":
            return frame


async def _open(port: int, offer: str = OFFER) -> RawClient:
    client, head = await RawClient.open(port, extra_headers=offer)
    assert b" 101 " in head
    frame = await client.read_frame_rsv(timeout=30)  # welcome (small: not compressed)
    assert frame is not None and frame[2] == 0
    return client


async def test_a_client_that_offers_gets_compressed_broadcasts(server: Server) -> None:
    client, head = await RawClient.open(server.port, extra_headers=OFFER)
    assert (
        b"sec-websocket-extensions: permessage-deflate; server_no_context_takeover; "
        b"client_no_context_takeover\r\n" in head.lower()
    )
    await client.read_frame_rsv(timeout=30)
    plain = await _open(server.port, offer="")  # offers nothing: gets plain frames
    await _subscribe(client, "news")
    await _subscribe(plain, "news")
    big = {"text": "a realistic payload, repeated " * 40}
    before = server.metrics.compressed_frames_total
    await server.broadcast("news", big)
    await server.broadcast("news", {"small": 1})  # under the threshold: plain
    for reader, compressed in ((client, True), (plain, False)):
        opcode, payload, rsv = await _next(reader)
        assert opcode == OP_TEXT and bool(rsv & 4) == compressed
        text = inflate_raw(payload) if compressed else payload
        assert json.loads(text)["message"] == big
        if compressed:
            assert len(payload) < len(text) // 4
        opcode, payload, rsv = await _next(reader)
        assert rsv == 0 and json.loads(payload)["message"] == {"small": 1}
    assert server.metrics.compressed_frames_total == before + 1
    await client.aclose()
    await plain.aclose()


async def test_a_broadcast_is_compressed_once_for_all_recipients(server: Server) -> None:
    clients = [await _open(server.port) for _ in range(5)]
    for c in clients:
        await _subscribe(c, "room")
    before = server.metrics.compressed_frames_total
    await server.broadcast("room", {"text": "x" * 2000})
    payloads = set()
    for c in clients:
        _opcode, payload, rsv = await _next(c)
        assert rsv == 4
        payloads.add(payload)
    assert len(payloads) == 1  # the same bytes for every recipient
    assert server.metrics.compressed_frames_total == before + 1
    for c in clients:
        await c.aclose()


async def test_compressed_commands_are_inflated(server: Server) -> None:
    client = await _open(server.port)
    await _subscribe(client, "cmds", compress=True)
    command = {
        "command": "message",
        "identifier": identifier(stream="cmds"),
        "data": json.dumps({"action": "echo", "text": "é" * 300}),
    }
    await client.send_frame(OP_TEXT, deflate_raw(json.dumps(command).encode()), rsv=4)
    _opcode, payload, rsv = await _next(client)
    assert rsv == 4  # the echo is over the threshold: compressed, for this client alone
    assert json.loads(inflate_raw(payload))["message"]["text"] == "é" * 300
    assert server.metrics.compressed_messages_total >= 2
    await client.aclose()


async def test_a_zip_bomb_closes_that_client_only(server: Server) -> None:
    bystander = await _open(server.port)
    await _subscribe(bystander, "calm")
    attacker = await _open(server.port)
    # 64 KiB is the test server's max message size; this inflates to 8 MiB.
    await attacker.send_frame(OP_BINARY, deflate_raw(b"[" * (8 << 20)), rsv=4)
    _frames, code = await attacker.read_until_close(timeout=30)
    assert code == 1009
    await server.broadcast("calm", {"still": "here"})
    _opcode, payload, _rsv = await _next(bystander)
    assert json.loads(payload)["message"] == {"still": "here"}
    await bystander.aclose()
    await attacker.aclose()


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xff\xfe\xfd\xfc", 1007),  # not DEFLATE
        (deflate_raw(b"\xc3\x28 not utf-8"), 1007),  # inflates to bad UTF-8 in a text frame
    ],
)
async def test_bad_compressed_data_is_refused(server: Server, payload: bytes, code: int) -> None:
    client = await _open(server.port)
    await client.send_frame(OP_TEXT, payload, rsv=4)
    _frames, got = await client.read_until_close(timeout=30)
    assert got == code
    await client.aclose()


async def test_rsv1_without_negotiation_is_a_protocol_error(server: Server) -> None:
    client = await _open(server.port, offer="")
    await client.send_frame(OP_TEXT, deflate_raw(b"{}"), rsv=4)
    frames, code = await client.read_until_close(timeout=30)
    assert code == 1002 and frames[-1][0] == OP_CLOSE
    await client.aclose()


async def test_no_extension_when_compression_is_off(nursery: trio.Nursery, config: Config) -> None:
    config.compression = False
    srv: Server = await nursery.start(Server(config).serve)
    client, head = await RawClient.open(srv.port, extra_headers=OFFER)
    assert b"sec-websocket-extensions" not in head.lower()
    await client.aclose()


async def test_echo_endpoint_compresses_its_echoes(server: Server) -> None:
    client, head = await RawClient.open(
        server.port, path="/echo", subprotocol=None, extra_headers=OFFER
    )
    assert b"permessage-deflate" in head
    data = os.urandom(100) * 10
    await client.send_frame(OP_BINARY, deflate_raw(data), rsv=4)
    opcode, payload, rsv = await client.read_frame_rsv(timeout=30)  # type: ignore[misc]
    assert (opcode, rsv) == (OP_BINARY, 4) and inflate_raw(payload) == data

    await eventually(lambda: server.metrics.compressed_messages_total >= 1)
    await client.aclose()


# -- the trio_cable client --------------------------------------------------------------------


@pytest.mark.parametrize("offer", [True, False])
async def test_the_client_negotiates_when_asked(server: Server, offer: bool) -> None:
    from trio_cable.client import open_cable

    big = {"text": "words for the wire " * 100}
    before = server.metrics.compressed_frames_total
    inflated_before = server.metrics.compressed_messages_total
    async with open_cable(server.url, compression=offer) as cable:
        sub = await cable.subscribe("EchoChannel", {"stream": "client"})
        await server.broadcast("client", big)
        with trio.fail_after(30):
            async for message in sub:
                if message.data == big:
                    break
        await sub.perform("echo", {"text": "é" * 500})
        with trio.fail_after(30):
            async for message in sub:
                if message.data == {"text": "é" * 500, "action": "echo"}:
                    break
    if offer:
        assert server.metrics.compressed_frames_total >= before + 2  # broadcast and echo
        assert server.metrics.compressed_messages_total > inflated_before
    else:
        assert server.metrics.compressed_frames_total == before


async def test_not_negotiated_while_shedding_load(server: Server) -> None:
    """While adaptive admission holds the limits down, new connections go uncompressed (a
    compressing client's replies are deflated for it alone); afterwards they compress again."""
    limiter = server.adaptive.limiter
    full = limiter.total_tokens
    limiter.total_tokens = max(1, full // 2)  # as adaptive admission does when the loop lags
    assert server.adaptive.shedding
    client, head = await RawClient.open(server.port, extra_headers=OFFER)
    assert b"sec-websocket-extensions" not in head.lower()
    await client.aclose()
    limiter.total_tokens = full
    assert not server.adaptive.shedding
    client, head = await RawClient.open(server.port, extra_headers=OFFER)
    assert b"permessage-deflate" in head
    await client.aclose()
