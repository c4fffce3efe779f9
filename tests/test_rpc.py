"""The AnyCable HTTP RPC executor against a real HTTP application (tests/rpc_support.py, a
stdlib server in a thread) and real WebSocket clients: the contract (bodies, headers, env,
state), what the answers make the server do, who never reaches the application."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from tests.conftest import SECRET, ClientFactory, eventually
from tests.rpc_support import RpcTestApp
from trio_cable import Config, Server
from trio_cable.identity import issue_token
from trio_cable.streams import sign_stream

RPC_KEY = hmac.new(SECRET.encode(), b"rpc-cable", hashlib.sha256).hexdigest()


def chat(room: str = "1") -> str:
    return json.dumps({"channel": "Chat", "room": room})


@pytest.fixture
def rpc_app() -> AsyncIterator[RpcTestApp]:
    app = RpcTestApp(key=RPC_KEY)  # the key anycable-go derives from the shared secret
    app.start()
    yield app
    app.stop()


def rpc_config(app: RpcTestApp, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "port": 0,
        "secret": SECRET,
        "rpc_host": app.url,
        "close_timeout": 1.0,
        "rpc_disconnect_rate": 0.0,
    }
    values.update(overrides)
    return Config(**values)


@pytest.fixture
async def rpc_server(nursery: trio.Nursery, rpc_app: RpcTestApp) -> Server:
    return await nursery.start(Server(rpc_config(rpc_app)).serve)


COOKIE = [("cookie", "user=ann; theme=dark"), ("x-other", "not passed")]


async def test_connect_sends_the_contract_and_identifies_from_the_cookie(
    rpc_server: Server, rpc_app: RpcTestApp, connect: ClientFactory
) -> None:
    async with connect(
        "actioncable-v1-ext-json", query="x=1", headers=COOKIE, to=rpc_server
    ) as client:
        # The application's own welcome is replaced by the server's (with the sid); its
        # other transmissions follow it.
        assert client.welcome["sid"]
        assert await client.recv() == {"type": "hello", "user": "ann"}
        (call,) = rpc_app.calls("/connect")
        assert call.path == "/_anycable/connect"
        assert call.headers["authorization"] == f"Bearer {RPC_KEY}"
        assert call.headers["x-anycable-meta-sid"] == client.welcome["sid"]
        assert call.headers["x-anycable-meta-protov"] == "v1"
        assert call.headers["content-type"] == "application/json"
        env = call.body["env"]
        assert env["url"] == f"ws://127.0.0.1:{rpc_server.port}/cable?x=1"
        assert env["headers"] == {"cookie": "user=ann; theme=dark", "REMOTE_ADDR": "127.0.0.1"}


async def test_a_refused_connect_is_unauthorized(
    rpc_server: Server, connect: ClientFactory
) -> None:
    async with connect(to=rpc_server, expect_welcome=False) as client:
        assert await client.recv() == {
            "type": "disconnect",
            "reason": "unauthorized",
            "reconnect": False,
        }
    assert rpc_server.metrics.unauthorized_total == 1


async def test_subscribe_streams_transmits_and_keeps_channel_state(
    rpc_server: Server, rpc_app: RpcTestApp, connect: ClientFactory
) -> None:
    async with connect(headers=COOKIE, to=rpc_server) as client:
        await client.recv()  # hello
        got = await client.subscribe(chat("7"))
        # Its transmission first, then the server's confirm (the application's is dropped).
        assert got == [
            {"identifier": chat("7"), "message": {"joined": "7", "user": "ann"}},
            {"identifier": chat("7"), "type": "confirm_subscription"},
        ]
        (sub,) = rpc_app.calls("/command")
        assert sub.body["command"] == "subscribe"
        assert sub.body["identifier"] == chat("7")
        assert json.loads(sub.body["connection_identifiers"]) == {"user": "ann"}
        assert sub.body["env"]["cstate"] == {"visits": "1"}  # set by connect
        assert "istate" not in sub.body["env"]
        # The stream the answer named delivers broadcasts.
        await rpc_server.broadcast("chat/7", {"text": "hi"})
        assert await client.recv() == {"identifier": chat("7"), "message": {"text": "hi"}}
        # Channel state: sent with each command, updated by each answer.
        for n in (1, 2):
            await client.perform(chat("7"), "count")
            assert await client.recv() == {"identifier": chat("7"), "message": {"count": n}}
        last = rpc_app.calls("/command")[-1].body
        assert last["command"] == "message"
        assert json.loads(last["data"]) == {"action": "count"}
        assert last["env"]["istate"] == {"room": "7", "count": "1"}
        await client.subscribe(json.dumps({"channel": "Secret"}), expect="reject_subscription")
        # stop_streams: no more broadcasts (the echo says the mute was applied: one
        # connection's commands are handled in order).
        await client.perform(chat("7"), "mute")
        await client.perform(chat("7"), "say", text="after mute")
        assert (await client.recv())["message"]["echo"] == "after mute"
        await rpc_server.broadcast("chat/7", {"text": "unheard"})
        await client.perform(chat("7"), "say", text="marker")
        assert (await client.recv())["message"]["echo"] == "marker"


async def test_disconnect_is_called_with_identifiers_subscriptions_and_state(
    rpc_server: Server, rpc_app: RpcTestApp, connect: ClientFactory
) -> None:
    async with connect(headers=COOKIE, to=rpc_server) as client:
        await client.recv()
        await client.subscribe(chat("1"))
        await client.subscribe(chat("2"))
        await client.perform(chat("2"), "count")
        await client.recv()
        sid = client.welcome.get("sid")
    await eventually(lambda: rpc_app.calls("/disconnect"), what="a disconnect call")
    (call,) = rpc_app.calls("/disconnect")
    body = call.body
    assert json.loads(body["identifiers"]) == {"user": "ann"}
    assert body["subscriptions"] == [chat("1"), chat("2")]
    assert body["env"]["cstate"] == {"visits": "1"}
    assert json.loads(body["env"]["istate"][chat("2")]) == {"room": "2", "count": "1"}
    assert call.headers["x-anycable-meta-sid"] == sid
    # No unsubscribe commands for a connection that ended: the one disconnect says it.
    assert [c.body["command"] for c in rpc_app.calls("/command")] == [
        "subscribe",
        "subscribe",
        "message",
    ]


async def test_an_answer_that_says_disconnect_closes_the_connection(
    rpc_server: Server, rpc_app: RpcTestApp, connect: ClientFactory
) -> None:
    async with connect(headers=COOKIE, to=rpc_server) as client:
        await client.recv()
        await client.subscribe(chat())
        await client.perform(chat(), "leave")
        with trio.fail_after(5):
            with pytest.raises(ConnectionClosed):
                await client.recv()


async def test_jwt_and_signed_streams_never_reach_the_application(
    rpc_server: Server, rpc_app: RpcTestApp, connect: ClientFactory
) -> None:
    token = issue_token(SECRET, {"user": "bob"}, ttl=60)
    signed = sign_stream(SECRET, "news")
    pubsub = json.dumps({"channel": "$pubsub", "signed_stream_name": signed})
    async with connect(query=f"jid={token}", to=rpc_server) as client:
        await client.subscribe(pubsub)
        await rpc_server.broadcast("news", {"n": 1})
        assert await client.recv() == {"identifier": pubsub, "message": {"n": 1}}
    await eventually(lambda: rpc_server.metrics.rpc_disconnects_skipped_total == 1)
    assert rpc_app.applied == []
    # A JWT-identified client on an application channel: commands carry the token's
    # identifiers, and its disconnect is owed.
    async with connect(query=f"jid={token}", to=rpc_server) as client:
        await client.subscribe(chat())
    await eventually(lambda: rpc_app.calls("/disconnect"))
    assert not rpc_app.calls("/connect")
    (sub,) = rpc_app.calls("/command")
    assert json.loads(sub.body["connection_identifiers"]) == {"user": "bob"}


async def test_a_restored_session_calls_nothing_and_keeps_its_state(
    rpc_server: Server, rpc_app: RpcTestApp, connect: ClientFactory
) -> None:
    async with connect("actioncable-v1-ext-json", headers=COOKIE, to=rpc_server) as client:
        await client.recv()
        await client.subscribe(chat("5"))
        await client.perform(chat("5"), "count")
        assert (await client.recv())["message"] == {"count": 1}
        sid = client.welcome["sid"]
    before = len(rpc_app.applied)
    await eventually(lambda: rpc_app.calls("/disconnect"))
    async with connect(
        "actioncable-v1-ext-json", query=f"sid={sid}", headers=COOKIE, to=rpc_server
    ) as client:
        assert client.welcome["restored_ids"] == [chat("5")]
        assert len(rpc_app.calls("/connect")) == 1  # no new connect
        # Channel and connection state came back with the session.
        await client.perform(chat("5"), "count")
        assert (await client.recv())["message"] == {"count": 2}
        # And its streams (broadcasts flow once the client did something else than ask
        # for history: the history gate).
        await rpc_server.broadcast("chat/5", {"text": "still here"})
        assert (await client.recv())["message"] == {"text": "still here"}
        last = rpc_app.calls("/command")[-1].body
        assert last["env"]["cstate"] == {"visits": "1"}
        assert json.loads(last["connection_identifiers"]) == {"user": "ann"}
    assert len(rpc_app.applied) > before


async def test_the_secret_and_headers_are_configurable(
    nursery: trio.Nursery, connect: ClientFactory
) -> None:
    app = RpcTestApp(key="explicit-key")
    app.start()
    try:
        config = rpc_config(app, rpc_secret="explicit-key", rpc_headers=["cookie", "x-other"])
        server = await nursery.start(Server(config).serve)
        async with connect(headers=COOKIE, to=server):
            (call,) = app.calls("/connect")
            assert call.body["env"]["headers"]["x-other"] == "not passed"
        # A wrong key: the application answers 401, the client is told to come back later
        # (it is the server's configuration that is wrong, not the client).
        await eventually(lambda: app.calls("/disconnect"))
        app.key = "another"
        async with connect(headers=COOKIE, to=server, expect_welcome=False) as client:
            message = await client.recv()
            assert message["type"] == "disconnect"
            assert message["reason"] == "server_restart" and message["reconnect"] is True
        assert server.metrics.labeled["rpc_errors_total"]["http_401"] == 1
    finally:
        app.stop()


def test_rpc_settings_are_checked_and_the_key_derived() -> None:
    from trio_cable.config import ConfigError, load_config

    assert Config(secret=SECRET).effective_rpc_secret == RPC_KEY
    assert Config(secret=SECRET, rpc_secret="k").effective_rpc_secret == "k"
    assert Config().effective_rpc_secret is None
    config = load_config(
        {"rpc_headers": "cookie, x-api-key"}, environ={"TRIO_CABLE_RPC_HOST": "https://app/rpc"}
    )
    assert config.rpc_host == "https://app/rpc"
    assert config.rpc_headers == ["cookie", "x-api-key"]
    with pytest.raises(ConfigError, match="rpc_host: 'app:3000' must be an http"):
        Config(rpc_host="app:3000").validate()
    with pytest.raises(ConfigError, match="rpc_max_concurrency"):
        Config(rpc_concurrency=50, rpc_max_concurrency=10).validate()
    with pytest.raises(ConfigError, match="rpc_min_concurrency: 40 is above rpc_concurrency"):
        Config(rpc_concurrency=28, rpc_min_concurrency=40).validate()
    # All three equal: a fixed limit, as anycable-go's, that no overload signal lowers.
    from trio_cable.channels import CableApp
    from trio_cable.server import Server

    fixed = Config(rpc_host="http://127.0.0.1:1", rpc_concurrency=8, rpc_min_concurrency=8,
                   rpc_max_concurrency=8)  # fmt: skip
    adaptive = Server(fixed, CableApp()).executor.adaptive  # type: ignore[attr-defined]
    adaptive.overloaded(100.0)
    assert adaptive.value == 8
    for k in range(200):
        adaptive.succeeded(0.001, 101.0 + k / 100, queued=True)
    assert adaptive.value == 8
    with pytest.raises(ConfigError, match="rpc_command_timeout"):
        Config(rpc_timeout=5, rpc_command_timeout=1).validate()


async def test_a_request_that_timed_out_is_never_sent_again(
    nursery: trio.Nursery, rpc_app: RpcTestApp, connect: ClientFactory
) -> None:
    # The application takes longer than --rpc-timeout: it may well have done the work, so
    # the server must not ask again, though it has time left for retries.
    rpc_app.delay = 1.0
    config = rpc_config(rpc_app, rpc_timeout=0.3, rpc_command_timeout=5.0, rpc_retries=3)
    server = await nursery.start(Server(config).serve)
    async with connect(headers=COOKIE, to=server, expect_welcome=False) as client:
        message = await client.recv(timeout=10)
    # The refusal comes after the server gave up: a retry would have been sent before it.
    assert message["type"] == "disconnect" and message["reason"] == "server_restart"
    assert message["reconnect"] is True
    assert len(rpc_app.calls("/connect")) == 1
    assert server.metrics.labeled["rpc_errors_total"]["timeout"] == 1
    assert server.metrics.rpc_limit_decreases_total == 1  # a timeout is an overload signal
    assert "overloaded" not in server.metrics.labeled["rpc_retries_total"]
    # A timeout is also a breaker failure, but one is not enough to open it.
    rpc_app.delay = 0.0
    async with connect(headers=COOKIE, to=server) as client:
        assert await client.recv() == {"type": "hello", "user": "ann"}


async def test_whispers_and_presence_from_the_channel_state_and_answers(
    rpc_server: Server, rpc_app: RpcTestApp, connect: ClientFactory
) -> None:
    room = json.dumps({"channel": "Room", "room": "9"})
    bob_cookie = [("cookie", "user=bob")]
    async with (
        connect(headers=COOKIE, to=rpc_server) as ann,
        connect(headers=bob_cookie, to=rpc_server) as bob,
    ):
        await ann.recv()
        await bob.recv()
        await ann.subscribe(room)
        await bob.subscribe(room)
        # The application's $w: whispers go to the room's other subscribers.
        await ann.send({"command": "whisper", "identifier": room, "data": {"typing": True}})
        assert await bob.recv() == {"identifier": room, "message": {"typing": True}}
        # The answer's presence event joins the application's $p stream.
        await ann.perform(room, "join")
        await eventually(lambda: rpc_app.calls("/command")[-1].body["command"] == "message")

        async def present() -> list[Any]:
            return (await rpc_server.broker.presence_info("room/9"))[1]

        with trio.fail_after(10):
            while not await present():
                await trio.sleep(0.02)
        (record,) = await present()
        assert record["id"] == "ann" and record["info"] == {"name": "ann"}
        await ann.perform(room, "part")
        with trio.fail_after(10):
            while await present():
                await trio.sleep(0.02)
