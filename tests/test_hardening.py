"""Hostile and broken clients, and security settings, over real sockets."""

from __future__ import annotations

import json
import math
import socket
import subprocess

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.conftest import SECRET, RawClient, identifier, make_app, tls_certificate
from tests.procs import ROOT, cli_command
from trio_cable import Config, Server
from trio_cable.config import ConfigError
from trio_cable.identity import issue_token
from trio_cable.protocol import frames

trustme = pytest.importorskip("trustme", reason="trustme (test certificates) is a dev dependency")


@pytest.fixture
def tls_files(tmp_path):
    return tls_certificate(tmp_path)


async def test_tls_serves_wss_and_https(nursery, config, tls_files):
    cert, key, client_context = tls_files
    config.tls_cert, config.tls_key = cert, key
    server = await nursery.start(Server(config, make_app()).serve)
    assert server.url.startswith("wss://")
    url = f"wss://127.0.0.1:{server.port}/cable"
    async with open_websocket_url(
        url, ssl_context=client_context, subprotocols=["actioncable-v1-json"]
    ) as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"
        ident = identifier(stream="secure")
        await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
        await ws.get_message()  # transmitted in subscribed()
        assert json.loads(await ws.get_message())["type"] == "confirm_subscription"
        big = "y" * 300_000  # several TLS records, partial writes
        await server.broadcast("secure", {"big": big})
        assert json.loads(await ws.get_message())["message"] == {"big": big}
    stream = await trio.open_ssl_over_tcp_stream(
        "127.0.0.1", server.port, ssl_context=client_context
    )
    await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    with trio.fail_after(5):
        try:
            while chunk := await stream.receive_some(4096):
                data += chunk
        except trio.BrokenResourceError:
            pass  # the server may close without a TLS close_notify
    assert data.startswith(b"HTTP/1.1 200")


async def test_plaintext_client_on_a_tls_port_harms_nobody(nursery, config, tls_files):
    cert, key, client_context = tls_files
    config.tls_cert, config.tls_key = cert, key
    config.handshake_timeout = 1.0
    server = await nursery.start(Server(config).serve)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b"GET /cable HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(5):
        try:
            data = await stream.receive_some(4096)
        except trio.BrokenResourceError:  # reset: the server closed with our bytes unread
            data = b""
    # Closed, perhaps after a TLS alert record (0x15): never a plaintext HTTP answer.
    assert data == b"" or data[:1] == b"\x15"
    url = f"wss://127.0.0.1:{server.port}/cable"
    async with open_websocket_url(
        url, ssl_context=client_context, subprotocols=["actioncable-v1-json"]
    ) as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"
    assert server.metrics.handshakes_failed_total >= 1


def test_tls_needs_both_files_and_readable_ones(tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        Config(tls_cert="x.pem").validate()
    with pytest.raises(ConfigError, match="cannot load"):
        Server(Config(tls_cert=str(tmp_path / "no.pem"), tls_key=str(tmp_path / "no.key")))


async def test_per_address_cap(nursery, config):
    config.max_connections_per_address = 3
    server = await nursery.start(Server(config).serve)
    clients = []
    for _ in range(3):
        client, head = await RawClient.open(server.port)
        assert head.startswith(b"HTTP/1.1 101")
        clients.append(client)
    _, head = await RawClient.open(server.port)
    assert head.startswith(b"HTTP/1.1 503") and b"retry-after" in head.lower()
    assert server.metrics.labeled["handshakes_refused_total"]["per_address"] == 1
    await clients[0].aclose()
    with trio.fail_after(5):
        while server.connections_by_address.get("127.0.0.1", 0) > 2:
            await trio.sleep(0.01)
    _, head = await RawClient.open(server.port)
    assert head.startswith(b"HTTP/1.1 101")


async def test_ping_flood_gets_bounded_pongs_and_harms_nobody(nursery, config, connect):
    rate = config.command_rate = 10.0  # burst 20
    server = await nursery.start(Server(config, make_app()).serve)
    flooder, _ = await RawClient.open(server.port)
    await flooder.read_frame()  # welcome
    start = trio.current_time()
    await flooder.send_raw(
        b"".join(frames.build_frame(frames.OP_PING, b"p", mask=b"abcd") for _ in range(500))
    )
    pongs = 0
    last = start
    # Every pong the flood earns, until the line has been quiet for half a second (quiet for
    # longer on a busy machine only makes the count more complete).
    with trio.fail_after(20):
        while True:
            with trio.move_on_after(0.5):
                frame = await flooder.read_frame()
                if frame and frame[0] == frames.OP_PONG:
                    pongs += 1
                    last = trio.current_time()
                continue
            break
    # At least the burst, at most the burst plus what refilled while the flood was handled
    # (a fixed window of 1 s and "<= 40" counted on the machine being quick).
    took = last - start
    assert 2 * rate <= pongs <= 2 * rate + math.floor(rate * took) + 1, (pongs, took)
    async with connect(to=server) as other:
        await other.subscribe(identifier())
    # The flooder itself is still served once it calms down.
    await flooder.send_frame(frames.OP_PING, b"calm")
    assert await flooder.read_frame() == (frames.OP_PONG, b"calm")


async def test_half_open_connections_are_found_by_the_kernel(server: Server, connect):
    async with connect() as _client:
        (conn,) = server.connections
        sock = conn.transport.sock
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 60_000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


async def test_slowloris_one_byte_at_a_time_is_cut_at_the_handshake_timeout(
    nursery, config, connect
):
    config.handshake_timeout = 1.0
    server = await nursery.start(Server(config, make_app()).serve)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    request = b"GET /cable HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
    start = trio.current_time()
    answer = b""
    # A timeout per byte (never reached: a byte every 0.2 s) would take 50 x 0.2 = 10 s.
    with trio.fail_after(8):
        for byte in request:
            try:
                await stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                break
            with trio.move_on_after(0.2):
                answer += await stream.receive_some(4096)
            if answer:
                break
    assert answer.startswith(b"HTTP/1.1 408")
    # The whole request's timeout, counted from the server's accept (just before or after
    # `start`), not a timeout per byte.
    assert 0.9 <= trio.current_time() - start < 1.0 + 5.0
    async with connect(to=server) as client:
        await client.subscribe(identifier())


def test_secrets_are_never_logged():
    jwt_secret = "jwt-secret-0123456789-abcdefghijklmnop"
    shared = "shared-secret-0123456789-abcdefghijklm"
    token = issue_token(jwt_secret, {"user": "x"}, ttl=60)
    args = [
        "serve",
        "--port",
        "0",
        "--log-level",
        "debug",
        "--secret",
        shared,
        "--jwt-secret",
        jwt_secret,
    ]
    proc = subprocess.Popen([*cli_command(), *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    url = None
    for line in proc.stderr:
        if "listening on" in line:
            url = line.rsplit(" ", 1)[1].strip()
            break
    assert url

    async def exercise() -> None:
        async with open_websocket_url(
            f"{url}?jid={token}", subprotocols=["actioncable-v1-json"]
        ) as ws:
            await ws.get_message()
        async with open_websocket_url(
            f"{url}?jid=bad.{token}", subprotocols=["actioncable-v1-json"]
        ) as ws:
            await ws.get_message()
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        body = b'{"stream":"s","data":"1"}'
        await stream.send_all(
            b"POST /_broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong-"
            + shared.encode()
            + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await stream.receive_some(100)

    trio.run(exercise)
    proc.terminate()
    _, rest = proc.communicate(timeout=10)
    log_text = rest
    for secret in (jwt_secret, shared, token):
        assert secret not in log_text
    assert "***" in repr(Config(secret=shared)) and shared not in repr(Config(secret=shared))


async def test_sids_are_unguessable(connect):
    import base64

    sids = []
    for _ in range(5):
        async with connect() as client:
            sids.append(client.welcome["sid"])
    for sid in sids:
        raw = base64.urlsafe_b64decode(sid + "=" * (-len(sid) % 4))
        assert len(raw) * 8 >= 96
    assert len(set(sids)) == 5


async def test_invalid_msgpack_identifier_and_wrong_types(connect):
    async with connect("actioncable-v1-msgpack") as client:
        import msgpack

        await client.ws.send_message(
            msgpack.packb({"command": "subscribe", "identifier": b"\x00binary"})
        )
        message = await client.recv()
        assert message == {"type": "disconnect", "reason": "invalid_request", "reconnect": False}


async def test_secret_fallback_for_broadcast_key_over_the_wire(nursery):
    server = await nursery.start(Server(Config(port=0, broadcast_key="only-this")).serve)
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(
        b"POST /_broadcast HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + SECRET.encode()
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert (await stream.receive_some(100)).startswith(b"HTTP/1.1 401")
