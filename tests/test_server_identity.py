"""Signed/public streams, JWT identification and broadcasting into the server, over sockets."""

from __future__ import annotations

import json
import time

import jwt as pyjwt
import pytest
import trio

from tests.conftest import ALL_PROTOCOLS, SECRET, identifier
from trio_cable import Server
from trio_cable.identity import issue_token
from trio_cable.streams import sign_stream

# -- Signed and public streams ---------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
@pytest.mark.parametrize("channel", ["$pubsub", "Turbo::StreamsChannel"])
async def test_signed_stream_subscription_receives_broadcasts(
    server, connect, subprotocol, channel
):
    async with connect(subprotocol) as client:
        ident = identifier(channel, signed_stream_name=sign_stream(SECRET, "chat/2023"))
        await client.subscribe(ident)
        await server.broadcast("chat/2023", {"text": "hello"})
        assert await client.recv() == {"identifier": ident, "message": {"text": "hello"}}


async def test_signed_stream_test_vector_over_the_wire(server, connect):
    signed = "ImNoYXQvMjAyMyI=--2b2e054b6413bf3bc7e8bbad2f68962aa2ba19821800ccbd8de6fd7314e8320c"
    async with connect() as client:
        ident = identifier("$pubsub", signed_stream_name=signed)
        await client.subscribe(ident)
        await server.broadcast("chat/2023", "x")
        assert (await client.recv())["message"] == "x"


@pytest.mark.parametrize(
    "signed",
    [
        sign_stream("wrong secret", "chat/2023"),
        sign_stream(SECRET, "chat/2023")[:-1] + "0",  # tampered digest
        "ImNoYXQvMjAyNCI=" + sign_stream(SECRET, "chat/2023")[16:],  # tampered name
        "no-separator",
        "a--b--c",
        "",
        42,
    ],
)
@pytest.mark.parametrize("channel", ["$pubsub", "Turbo::StreamsChannel"])
async def test_bad_signatures_are_rejected(server, connect, signed, channel):
    async with connect() as client:
        await client.subscribe(
            identifier(channel, signed_stream_name=signed), expect="reject_subscription"
        )


async def test_public_streams_are_off_by_default(connect):
    async with connect() as client:
        await client.subscribe(
            identifier("$pubsub", stream_name="open"), expect="reject_subscription"
        )


async def test_public_streams_when_enabled(nursery, config, connect):
    config.public_streams = True
    srv = await nursery.start(Server(config).serve)
    from trio_websocket import open_websocket_url

    async with open_websocket_url(
        f"ws://127.0.0.1:{srv.port}/cable", subprotocols=["actioncable-v1-json"]
    ) as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"
        ident = identifier("$pubsub", stream_name="open")
        await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
        assert json.loads(await ws.get_message()) == {
            "identifier": ident,
            "type": "confirm_subscription",
        }
        await srv.broadcast("open", {"a": 1})
        assert json.loads(await ws.get_message()) == {"identifier": ident, "message": {"a": 1}}
        # Turbo::StreamsChannel never takes unsigned names.
        ident2 = identifier("Turbo::StreamsChannel", stream_name="open")
        await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident2}))
        assert json.loads(await ws.get_message()) == {
            "identifier": ident2,
            "type": "reject_subscription",
        }


# -- JWT identification ----------------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
@pytest.mark.parametrize("carrier", ["query", "header", "subprotocol"])
async def test_valid_jwt_identifies_without_connect_callback(connect, subprotocol, carrier):
    token = issue_token(SECRET, {"user": "jwt-user"}, ttl=60)
    kwargs: dict = {}
    if carrier == "query":
        kwargs["query"] = f"jid={token}&user=ignored"
    elif carrier == "header":
        kwargs["headers"] = [("X-JID", token)]
        kwargs["query"] = "user=ignored"
    else:
        kwargs["extra_subprotocols"] = [f"anycable-token.{token}"]
        kwargs["query"] = "user=ignored"
    async with connect(subprotocol, **kwargs) as client:
        got = await client.subscribe(identifier())
        # The connect callback would have set user=ignored; the token's identity is used.
        assert got[0]["message"]["who"] == {"user": "jwt-user"}


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_expired_jwt_gets_token_expired(connect, subprotocol):
    token = pyjwt.encode(
        {"ext": json.dumps({"user": 1}), "exp": int(time.time()) - 10}, SECRET, "HS256"
    )
    async with connect(subprotocol, query=f"jid={token}", expect_welcome=False) as client:
        assert await client.recv() == {
            "type": "disconnect",
            "reason": "token_expired",
            "reconnect": False,
        }


@pytest.mark.parametrize(
    "token",
    [
        pyjwt.encode({"ext": json.dumps({"user": 1})}, "other secret", "HS256"),
        "not.a.jwt",
        # alg "none", built by hand: header.payload.<empty signature>
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJleHQiOiJ7XCJ1c2VyXCI6MX0ifQ.",
    ],
)
async def test_invalid_jwt_gets_unauthorized(connect, token):
    async with connect(query=f"jid={token}", expect_welcome=False) as client:
        assert await client.recv() == {
            "type": "disconnect",
            "reason": "unauthorized",
            "reconnect": False,
        }


async def test_enforce_jwt_refuses_connections_without_token(nursery, config):
    config.enforce_jwt = True
    srv = await nursery.start(Server(config).serve)
    from trio_websocket import open_websocket_url

    url = f"ws://127.0.0.1:{srv.port}/cable"
    async with open_websocket_url(url, subprotocols=["actioncable-v1-json"]) as ws:
        assert json.loads(await ws.get_message()) == {
            "type": "disconnect",
            "reason": "unauthorized",
            "reconnect": False,
        }
    token = issue_token(SECRET, {"user": 7}, ttl=60)
    async with open_websocket_url(f"{url}?jid={token}", subprotocols=["actioncable-v1-json"]) as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"


async def test_custom_jwt_param(nursery, config):
    config.jwt_param = "token"
    srv = await nursery.start(Server(config).serve)
    from trio_websocket import open_websocket_url

    token = pyjwt.encode({"ext": "{}", "exp": int(time.time()) - 10}, SECRET, "HS256")
    url = f"ws://127.0.0.1:{srv.port}/cable?token={token}"
    async with open_websocket_url(url, subprotocols=["actioncable-v1-json"]) as ws:
        assert json.loads(await ws.get_message())["reason"] == "token_expired"


# -- Broadcasting into the server from other programs ----------------------------------------


async def _post(
    server: Server, body: bytes, key: str | None = SECRET, path: str = "/_broadcast"
) -> tuple[int, bytes]:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), rest


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_http_broadcast(server, connect, subprotocol):
    async with connect(subprotocol) as client:
        ident = identifier(stream="web")
        await client.subscribe(ident)
        status, _ = await _post(
            server, json.dumps({"stream": "web", "data": json.dumps({"a": 1})}).encode()
        )
        assert status == 201
        assert await client.recv() == {"identifier": ident, "message": {"a": 1}}
        batch = [
            {"stream": "web", "data": '"{\\"a\\":1}"'},  # a JSON string holding JSON text
            {"stream": "web", "data": "not json"},  # not JSON: sent as the raw string
            {"stream": "elsewhere", "data": "1"},
            {"stream": "web", "data": "[1,2]"},
        ]
        status, _ = await _post(server, json.dumps(batch).encode())
        assert status == 201
        assert (await client.recv())["message"] == '{"a":1}'
        assert (await client.recv())["message"] == "not json"
        assert (await client.recv())["message"] == [1, 2]


async def test_http_broadcast_exclude_socket(server, connect):
    async with connect() as a, connect() as b:
        ident = identifier(stream="ex")
        await a.subscribe(ident)
        await b.subscribe(ident)
        body = {"stream": "ex", "data": "1", "meta": {"exclude_socket": a.welcome["sid"]}}
        assert (await _post(server, json.dumps(body).encode()))[0] == 201
        assert (await b.recv())["message"] == 1
        await a.expect_nothing_before_echo(ident)


@pytest.mark.parametrize(("key", "status"), [(None, 401), ("wrong", 401), (SECRET, 201)])
async def test_http_broadcast_requires_key(server, key, status):
    assert (await _post(server, b'{"stream":"s","data":"1"}', key=key))[0] == status


async def test_http_broadcast_without_key_configured(nursery, config):
    config.secret = None
    srv = await nursery.start(Server(config).serve)
    assert (await _post(srv, b'{"stream":"s","data":"1"}', key=None))[0] == 201


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b"[]x",
        b'{"data":"1"}',
        b'{"stream":5,"data":"1"}',
        b'{"stream":"s"}',
        b"42",
        b'[{"stream":"s","data":"1"}, 3]',
    ],
)
async def test_http_broadcast_bad_body(server, connect, body):
    status, text = await _post(server, body)
    assert status == 400, text
    async with connect() as client:
        await client.subscribe(identifier())


async def test_http_broadcast_needs_post(server):
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(b"GET /_broadcast HTTP/1.1\r\nHost: x\r\n\r\n")
    data = await stream.receive_some(4096)
    assert data.startswith(b"HTTP/1.1 405")


# -- BenchmarkChannel ------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_benchmark_channel(connect, subprotocol):
    async with connect(subprotocol) as a, connect(subprotocol) as b:
        ident = identifier("BenchmarkChannel")
        await a.subscribe(ident)
        await b.subscribe(ident)
        await a.perform(ident, "echo", payload="p")
        assert await a.recv() == {
            "identifier": ident,
            "message": {"action": "echo", "payload": "p"},
        }
        await a.perform(ident, "broadcast", payload="q")
        got_a = [await a.recv(), await a.recv()]
        assert {"identifier": ident, "message": {"action": "broadcast", "payload": "q"}} in got_a
        assert {
            "identifier": ident,
            "message": {"action": "broadcastResult", "payload": "q"},
        } in got_a
        assert await b.recv() == {
            "identifier": ident,
            "message": {"action": "broadcast", "payload": "q"},
        }


async def test_benchmark_channel_is_off_by_default(nursery, config):
    config.benchmark_channel = False
    srv = await nursery.start(Server(config).serve)
    from trio_websocket import open_websocket_url

    async with open_websocket_url(
        f"ws://127.0.0.1:{srv.port}/cable", subprotocols=["actioncable-v1-json"]
    ) as ws:
        await ws.get_message()
        ident = identifier("BenchmarkChannel")
        await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
        assert json.loads(await ws.get_message())["type"] == "reject_subscription"
