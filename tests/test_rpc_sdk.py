"""trio_cable.rpc, the application side of AnyCable's HTTP RPC, driven over real HTTP.

The RPC application is served by uvicorn (ASGI) and by wsgiref (WSGI) on free ports; the
tests post the contract's bodies (PROTOCOL.md, "AnyCable HTTP RPC") as the real-time server
would and check the answers field by field.  Broadcasts go to a real trio_cable server and
are checked arriving at a WebSocket client.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.redis_support import REDIS_SERVER, SKIP_REASON, RedisProcess
from tests.rpc_sdk_support import BROADCAST_KEY, RPC_KEY, make_app, serve_asgi, serve_wsgi
from trio_cable import Config, Server
from trio_cable.client import open_cable
from trio_cable.rpc import (
    Channel,
    Connection,
    HTTPBroadcaster,
    RedisBroadcaster,
    RPCApp,
    derived_key,
    publication,
    remote_disconnect,
)

ROOT = Path(__file__).resolve().parent.parent
URL = "ws://cable.example/cable?x=1"
SERVERS = {"asgi": serve_asgi, "wsgi": serve_wsgi}


def env(**extra: Any) -> dict[str, Any]:
    return {"url": URL, "headers": {"cookie": "theme=dark; session=ann-session"}, **extra}


async def post(
    client: httpx.AsyncClient,
    base: str,
    method: str,
    body: Any,
    *,
    key: str | None = RPC_KEY,
    sid: str = "sid-1",
) -> httpx.Response:
    headers = {
        "content-type": "application/json",
        "x-anycable-meta-sid": sid,
        "x-anycable-meta-protov": "v1",
    }
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(f"{base}/{method}", content=content, headers=headers)


async def call(client: httpx.AsyncClient, base: str, method: str, body: Any) -> dict[str, Any]:
    response = await post(client, base, method, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    answer: dict[str, Any] = response.json()
    return answer


async def command(
    client: httpx.AsyncClient,
    base: str,
    name: str,
    identifier: str,
    *,
    data: str | None = None,
    istate: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A ``command`` call for ann's connection, as the real-time server makes it."""
    body: dict[str, Any] = {
        "command": name,
        "identifier": identifier,
        "connection_identifiers": '{"user_id":"ann"}',
        "env": env(cstate={"visits": "1"}, istate=istate or {}),
    }
    if data is not None:
        body["data"] = data
    return await call(client, base, "command", body)


@pytest.mark.parametrize("channel", ["ChatChannel", "AsyncChatChannel"])
@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
async def test_the_contract_over_http(kind: str, channel: str) -> None:
    events: list[tuple[Any, ...]] = []
    config = Config(port=0, public_streams=True, broadcast_key=BROADCAST_KEY)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(config).serve)
        rpc = make_app(f"http://127.0.0.1:{server.port}/_broadcast", events)
        app = rpc.asgi if kind == "asgi" else rpc.wsgi
        with SERVERS[kind](app) as base:
            async with httpx.AsyncClient(timeout=30) as client:
                await _scenario(client, base, server.url, channel, events)
        nursery.cancel_scope.cancel()


async def _scenario(
    client: httpx.AsyncClient, base: str, cable_url: str, channel: str, events: list[Any]
) -> None:
    # connect: identified from the session cookie; the welcome carries the sid.
    answer = await call(client, base, "connect", {"env": env(cstate={})})
    assert answer == {
        "status": 1,
        "identifiers": '{"user_id":"ann"}',
        "transmissions": ['{"type":"welcome","sid":"sid-1"}'],
        "env": {"cstate": {"visits": "1"}},
    }
    # ... and refused without a known session.
    stranger = {"env": {"url": URL, "headers": {"cookie": "session=forged"}}}
    answer = await call(client, base, "connect", stranger)
    assert answer["status"] == 2
    assert answer["transmissions"] == [
        '{"type":"disconnect","reason":"unauthorized","reconnect":false}'
    ]

    ids = '{"user_id":"ann"}'  # the disconnect call's
    lobby = json.dumps({"channel": channel, "room": "lobby"})

    # subscribe, confirmed: transmissions before the confirm, whisper and presence streams.
    answer = await command(client, base, "subscribe", lobby)
    assert answer == {
        "status": 1,
        "disconnect": False,
        "stop_streams": False,
        "streams": ["chat/lobby"],
        "stopped_streams": [],
        "transmissions": [
            json.dumps({"identifier": lobby, "message": {"hello": "lobby"}}, separators=(",", ":")),
            json.dumps(
                {"identifier": lobby, "type": "confirm_subscription"}, separators=(",", ":")
            ),
        ],
        "env": {
            "cstate": {},
            "istate": {"joined": '"lobby"', "$w": "chat/lobby", "$p": "chat/lobby"},
        },
        "presence": {"type": "join", "id": "ann", "info": '{"name":"ann"}'},
    }
    istate = {"joined": '"lobby"', "$w": "chat/lobby", "$p": "chat/lobby"}

    # subscribe, rejected: no streams, the reject after what was transmitted.
    secret = json.dumps({"channel": channel, "room": "secret"})
    answer = await command(client, base, "subscribe", secret)
    assert answer["status"] == 2
    assert answer["streams"] == []
    assert [json.loads(t) for t in answer["transmissions"]] == [
        {"identifier": secret, "message": {"sorry": "secret"}},
        {"identifier": secret, "type": "reject_subscription"},
    ]

    # an action that transmits and broadcasts: the broadcast reaches a WebSocket client of
    # the real-time server, the connection state changes.
    async with open_cable(cable_url) as cable:
        sub = await cable.subscribe("$pubsub", {"stream_name": "chat/lobby"})
        answer = await command(
            client,
            base,
            "message",
            lobby,
            data=json.dumps({"action": "speak", "text": "hi"}),
            istate=istate,
        )
        assert answer["status"] == 1
        assert answer["transmissions"] == [
            json.dumps({"identifier": lobby, "message": {"echo": "hi"}}, separators=(",", ":"))
        ]
        assert answer["env"] == {"cstate": {"visits": "2"}, "istate": {}}
        with trio.fail_after(30):
            async for message in sub:
                assert message.data == {"from": "ann", "text": "hi"}
                break

    # state deleted and the whisper stream stopped: "" deletes a key.
    answer = await command(
        client, base, "message", lobby, data='{"action":"forget"}', istate=istate
    )
    assert answer["stopped_streams"] == ["chat/lobby"]
    assert answer["env"]["istate"] == {"joined": "", "$w": ""}

    # an action that closes the connection; an unknown action fails.
    answer = await command(client, base, "message", lobby, data='{"action":"bye"}', istate=istate)
    assert answer["status"] == 1 and answer["disconnect"] is True
    # a callback is not an action
    answer = await command(client, base, "message", lobby, data='{"action":"unsubscribed"}')
    assert answer["status"] == 2 and "unknown action" in answer["error_msg"]
    assert events == []

    # unsubscribe: the callback sees the subscription's state; every stream stops.
    answer = await command(client, base, "unsubscribe", lobby, istate=istate)
    assert answer["status"] == 1 and answer["stop_streams"] is True
    assert answer["env"]["istate"] == {"$w": ""}
    assert events.pop() == ("unsubscribed", lobby, {"user_id": "ann"}, {"joined": "lobby"})

    # disconnect: each subscription's unsubscribed with its own state, then the callback.
    other = json.dumps({"channel": channel, "room": "kitchen"})
    answer = await call(
        client,
        base,
        "disconnect",
        {
            "identifiers": ids,
            "subscriptions": [lobby, other],
            "env": env(
                cstate={"visits": "3"},
                istate={lobby: json.dumps(istate), other: json.dumps({"joined": '"kitchen"'})},
            ),
        },
    )
    assert answer == {"status": 1}
    assert events == [
        ("unsubscribed", lobby, {"user_id": "ann"}, {"joined": "lobby"}),
        ("unsubscribed", other, {"user_id": "ann"}, {"joined": "kitchen"}),
        ("disconnect", {"user_id": "ann"}, {"visits": 3}),
    ]


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
async def test_http_refusals(kind: str) -> None:
    rpc = make_app("http://127.0.0.1:9/_broadcast", [])
    rpc.max_body = 4096
    app = rpc.asgi if kind == "asgi" else rpc.wsgi
    good = {"env": env()}
    with SERVERS[kind](app) as base:
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await post(client, base, "connect", good)).status_code == 200
            # the RPC key: missing or wrong
            assert (await post(client, base, "connect", good, key=None)).status_code == 401
            assert (await post(client, base, "connect", good, key="nope")).status_code == 401
            # unknown paths and methods
            assert (await post(client, base, "subscribe", good)).status_code == 404
            response = await client.get(f"{base}/connect", headers={"authorization": RPC_KEY})
            assert response.status_code == 404
            # unreadable bodies: 422 with the reason
            for body in (b"{not json", b"[1, 2]", b'{"env": []}', b'{"env": {"headers": 1}}'):
                response = await post(client, base, "connect", body)
                assert response.status_code == 422, body
                assert response.text.startswith("unreadable body"), response.text
            for command in (
                {"command": "dance", "identifier": "{}"},
                {"command": "subscribe"},
                {"command": "subscribe", "identifier": "{}", "connection_identifiers": "[1]"},
                {"command": "message", "identifier": '{"channel":"ChatChannel"}', "data": {}},
            ):
                response = await post(client, base, "command", command)
                assert response.status_code == 422, command
            response = await post(client, base, "disconnect", {"subscriptions": "x"})
            assert response.status_code == 422
            # too big
            big = {"env": {"url": URL, "headers": {"cookie": "x" * 5000}}}
            assert (await post(client, base, "connect", big)).status_code == 413


def _handle(rpc: RPCApp, method: str, body: Any) -> dict[str, Any]:
    response = rpc.handle(
        f"/rpc/{method}", {"Authorization": "Bearer k"}, json.dumps(body).encode()
    )
    assert response.status == 200, response.body
    answer: dict[str, Any] = json.loads(response.body)
    return answer


def test_callback_errors_answer_status_error() -> None:
    rpc = RPCApp(rpc_secret="k")

    @rpc.connect
    def connect(conn: Connection) -> dict[str, Any]:
        raise RuntimeError("database down")

    @rpc.channel
    class Boom(Channel):
        def subscribed(self) -> None:
            self.stream_from("never")
            raise RuntimeError("boom")

        def unsubscribed(self) -> None:
            raise RuntimeError("boom")

    answer = _handle(rpc, "connect", {"env": env()})
    assert answer == {"status": 0, "error_msg": "connect failed: RuntimeError"}
    identifier = '{"channel":"Boom"}'
    answer = _handle(rpc, "command", {"command": "subscribe", "identifier": identifier})
    assert answer["status"] == 0
    assert answer["streams"] == []  # a failed subscribe starts nothing
    assert answer["transmissions"] == [
        f'{{"identifier":{json.dumps(identifier)},"type":"reject_subscription"}}'
    ]
    answer = _handle(rpc, "command", {"command": "subscribe", "identifier": '{"channel":"Nope"}'})
    assert answer["status"] == 2 and answer["error_msg"] == "unknown channel"
    answer = _handle(rpc, "disconnect", {"subscriptions": [identifier, identifier]})
    assert answer == {"status": 0, "error_msg": "2 callbacks failed"}


def test_secrets_and_keys() -> None:
    # The key derived from a global secret as anycable-go derives it (hex HMAC-SHA256).
    expected = hmac.new(b"s3Krit", b"rpc-cable", hashlib.sha256).hexdigest()
    assert derived_key("s3Krit", "rpc") == expected
    rpc = RPCApp(secret="s3Krit")
    assert rpc.authorized(f"Bearer {derived_key('s3Krit', 'rpc')}")
    assert not rpc.authorized("Bearer s3Krit")
    assert not rpc.authorized(None)
    assert RPCApp(rpc_secret="k", secret="s3Krit").authorized("Bearer k")
    with pytest.warns(UserWarning, match="every caller"):
        assert RPCApp().authorized(None)
    with pytest.raises(ValueError):
        derived_key("", "rpc")


def test_publication_format() -> None:
    assert publication("s", {"a": 1}) == {"stream": "s", "data": '{"a":1}'}
    # a string that looks like JSON travels as a JSON string
    assert publication("s", '{"a":1}')["data"] == '"{\\"a\\":1}"'
    assert publication("s", 1, exclude_socket="sid") == {
        "stream": "s",
        "data": "1",
        "meta": {"exclude_socket": "sid"},
    }
    assert remote_disconnect({"user_id": 1}) == {
        "command": "disconnect",
        "payload": {"identifier": '{"user_id":1}', "reconnect": False},
    }
    with pytest.raises(ValueError):
        publication("", 1)


async def test_http_broadcaster_to_trio_cable() -> None:
    # Sync and async, one publication and several, a refused key, a remote disconnect.
    config = Config(port=0, public_streams=True, broadcast_key=BROADCAST_KEY)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(config).serve)
        url = f"http://127.0.0.1:{server.port}/_broadcast"
        broadcaster = HTTPBroadcaster(url, key=BROADCAST_KEY)
        async with open_cable(server.url) as cable:
            sub = await cable.subscribe("$pubsub", {"stream_name": "news"})
            await broadcaster.abroadcast("news", {"n": 1})
            await trio.to_thread.run_sync(broadcaster.broadcast, "news", '{"n":2}')
            await trio.to_thread.run_sync(
                broadcaster.broadcast_many, [("news", 3), ("elsewhere", 0), ("news", [4])]
            )
            got = []
            with trio.fail_after(30):
                async for message in sub:
                    got.append(message.data)
                    if len(got) == 4:
                        break
            assert got == [{"n": 1}, '{"n":2}', 3, [4]]
        from trio_cable.rpc import BroadcastError

        with pytest.raises(BroadcastError) as refused:
            await HTTPBroadcaster(url, key="wrong").abroadcast("news", 1)
        assert refused.value.status == 401
        await trio.to_thread.run_sync(broadcaster.disconnect, {"user_id": 1})
        await broadcaster.aclose()
        broadcaster.close()
        nursery.cancel_scope.cancel()


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    proc = RedisProcess(tmp_path)
    proc.start()
    yield proc
    proc.stop()


async def test_redis_broadcaster_to_trio_cable(redis_server: RedisProcess) -> None:
    # PUBLISH __anycable__, read by trio_cable's Redis broker as anycable-rails' broadcasts.
    config = Config(port=0, public_streams=True, broker="redis", redis_url=redis_server.url)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(config).serve)
        broadcaster = RedisBroadcaster(redis_server.url)
        async with open_cable(server.url) as cable:
            sub = await cable.subscribe("$pubsub", {"stream_name": "news"})
            await trio.to_thread.run_sync(broadcaster.broadcast, "news", {"n": 1})
            await trio.to_thread.run_sync(broadcaster.broadcast, "news", "two")
            got = []
            with trio.fail_after(30):
                async for message in sub:
                    got.append(message.data)
                    if len(got) == 2:
                        break
            assert got == [{"n": 1}, "two"]
        broadcaster.close()
        nursery.cancel_scope.cancel()


def test_importable_without_trio() -> None:
    # An application server that never loads Trio (Django under gunicorn, FastAPI on asyncio):
    # trio_cable.rpc imports with Trio made unimportable, and so does trio_cable's package
    # namespace (its names are imported on first use).
    code = (
        "import sys\n"
        "sys.modules['trio'] = None\n"
        "import trio_cable, trio_cable.rpc\n"
        "from trio_cable.rpc import RPCApp, Channel, HTTPBroadcaster, sign_stream, issue_token\n"
        "from trio_cable import Unauthorized\n"
        "rpc = RPCApp(rpc_secret='k'); rpc.wsgi; rpc.asgi\n"
        "answer = rpc.handle('/connect', {'authorization': 'Bearer k'}, b'{}')\n"
        "print(answer.status, sorted(m for m in sys.modules\n"
        "      if m.split('.')[0] in ('trio', 'anyio', 'httpx', 'redis', 'h11', 'django')\n"
        "      or m.startswith(('trio_cable.server', 'trio_cable.client'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["200", "['trio']"]  # the None placeholder only


async def test_mounted_in_starlette() -> None:
    # Under a Starlette (and so FastAPI) Mount, next to the site's own routes.
    starlette = pytest.importorskip("starlette")
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route

    assert starlette.__version__
    rpc = make_app("http://127.0.0.1:9/_broadcast", [])

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("the site")

    site = Starlette(routes=[Route("/", home), Mount("/anycable", app=rpc.asgi)])
    with serve_asgi(site, prefix="") as base:
        async with httpx.AsyncClient(timeout=30) as client:
            assert (await client.get(f"{base}/")).text == "the site"
            answer = await call(client, f"{base}/anycable", "connect", {"env": env()})
            assert answer["identifiers"] == '{"user_id":"ann"}'
            assert (await post(client, f"{base}/anycable", "nothing", {})).status_code == 404


async def test_served_async_sync_callbacks_run_in_a_worker_thread() -> None:
    # A plain def callback may block (an ORM, a sync broadcaster): under ASGI it runs in a
    # worker thread, and async def callbacks run on the loop itself.
    threads: dict[str, int] = {}
    rpc = RPCApp(rpc_secret="k")

    @rpc.connect
    def connect(conn: Connection) -> dict[str, Any]:
        threads["connect"] = threading.get_ident()
        return {}

    @rpc.channel
    class Mixed(Channel):
        async def subscribed(self) -> None:
            threads["subscribed"] = threading.get_ident()

        def unsubscribed(self) -> None:
            threads["unsubscribed"] = threading.get_ident()

    headers = {"authorization": "Bearer k"}
    command = {"command": "subscribe", "identifier": '{"channel":"Mixed"}'}
    for path, body in [("/connect", {}), ("/command", command)]:
        response = await rpc.handle_async(path, headers, json.dumps(body).encode())
        assert json.loads(response.body)["status"] == 1
    await rpc.handle_async(
        "/command", headers, json.dumps({**command, "command": "unsubscribe"}).encode()
    )
    here = threading.get_ident()
    assert threads["subscribed"] == here
    assert threads["connect"] != here and threads["unsubscribed"] != here
    # Served from sync code (WSGI), everything runs in the caller's thread.
    threads.clear()
    for path, body in [("/connect", {}), ("/command", command)]:
        rpc.handle(path, headers, json.dumps(body).encode())
    assert threads == {"connect": here, "subscribed": here}


def test_what_json_cannot_carry_fails_the_call() -> None:
    class User:
        id = 42

    rpc = RPCApp(rpc_secret="k")

    @rpc.connect
    def connect(conn: Connection) -> dict[str, Any]:
        return {"user": User()}  # a classic slip: identifiers travel as JSON

    @rpc.channel
    class Stateful(Channel):
        def subscribed(self) -> None:
            self.stream_from("s", whisper=True)
            self.state["when"] = {1, 2}  # a set: not JSON

    answer = _handle(rpc, "connect", {"env": env()})
    assert answer["status"] == 0 and "not JSON serializable" in answer["error_msg"]
    identifier = '{"channel":"Stateful"}'
    answer = _handle(rpc, "command", {"command": "subscribe", "identifier": identifier})
    assert answer["status"] == 0
    assert answer["transmissions"] == [
        json.dumps({"identifier": identifier, "type": "reject_subscription"}, separators=(",", ":"))
    ]


def test_a_rejected_subscribe_starts_nothing() -> None:
    rpc = RPCApp(rpc_secret="k")

    @rpc.channel
    class Fickle(Channel):
        def subscribed(self) -> None:
            self.stream_from("s", whisper=True)
            self.join_presence(1)
            self.state["x"] = 1
            self.reject()

    answer = _handle(rpc, "command", {"command": "subscribe", "identifier": '{"channel":"Fickle"}'})
    assert answer["status"] == 2
    assert answer["streams"] == [] and "presence" not in answer
    assert answer["env"] == {"cstate": {}, "istate": {}}
