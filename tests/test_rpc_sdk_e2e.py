"""End to end: WebSocket clients -> trio_cable with ``--rpc-host`` -> trio_cable.rpc served by
uvicorn (ASGI) and wsgiref (WSGI).  Both halves of issue 17 against each other: the user is
identified from the WebSocket request's cookie by the Python application, subscriptions are
confirmed and rejected there, an action's transmission and broadcast reach the clients, the
state the application set comes back in later calls, and a closed connection's subscriptions
and disconnect callback run in the application."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from tests.conftest import CableClient, eventually
from tests.rpc_sdk_support import BROADCAST_KEY, RPC_KEY, make_app, serve_asgi, serve_wsgi
from trio_cable import Config, Server
from trio_cable.rpc import HTTPBroadcaster

pytest.importorskip("trio_cable.server.rpc_executor")  # the server's half (branch rpc-executor)

SERVERS = {"asgi": serve_asgi, "wsgi": serve_wsgi}


@asynccontextmanager
async def client_of(server: Server, cookie: str | None) -> AsyncIterator[CableClient]:
    headers = [("cookie", cookie)] if cookie else []
    url = f"ws://127.0.0.1:{server.port}/cable"
    async with open_websocket_url(
        url, subprotocols=["actioncable-v1-ext-json"], extra_headers=headers
    ) as ws:
        yield CableClient(ws, "actioncable-v1-ext-json")


@pytest.mark.parametrize("channel", ["ChatChannel", "AsyncChatChannel"])
@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
async def test_clients_through_trio_cable_to_the_python_sdk(kind: str, channel: str) -> None:
    events: list[tuple[Any, ...]] = []
    async with trio.open_nursery() as nursery:
        # The server's port is needed by the application (its broadcaster), and the
        # application's URL by the server: bind the application first, on a free port.
        rpc = make_app("http://placeholder/_broadcast", events)
        app = rpc.asgi if kind == "asgi" else rpc.wsgi
        with SERVERS[kind](app) as base:
            config = Config(
                port=0,
                rpc_host=base,
                rpc_secret=RPC_KEY,
                broadcast_key=BROADCAST_KEY,
                rpc_disconnect_rate=0.0,
                close_timeout=1.0,
            )
            server = await nursery.start(Server(config).serve)
            assert isinstance(rpc.broadcaster, HTTPBroadcaster)
            rpc.broadcaster.url = f"http://127.0.0.1:{server.port}/_broadcast"
            await _scenario(server, channel, events)
        nursery.cancel_scope.cancel()


def without_presence(messages: list[Any], presence: list[Any]) -> list[Any]:
    """*messages* without the presence events (kept in *presence*)."""
    presence.extend(m for m in messages if m.get("type") == "presence")
    return [m for m in messages if m.get("type") != "presence"]


async def _scenario(server: Server, channel: str, events: list[Any]) -> None:
    lobby = json.dumps({"channel": channel, "room": "lobby"})
    secret = json.dumps({"channel": channel, "room": "secret"})

    # No session: refused by the application.
    async with client_of(server, "session=forged") as stranger:
        assert await stranger.recv(timeout=30) == {
            "type": "disconnect",
            "reason": "unauthorized",
            "reconnect": False,
        }

    async with (
        client_of(server, "theme=dark; session=ann-session") as ann,
        client_of(server, "session=bob-session") as bob,
    ):
        for client in (ann, bob):
            assert (await client.recv(timeout=30))["type"] == "welcome"
        # Confirmed, with what subscribed transmitted before the confirm; and rejected.
        assert await ann.subscribe(lobby) == [
            {"identifier": lobby, "message": {"hello": "lobby"}},
            {"identifier": lobby, "type": "confirm_subscription"},
        ]
        # The channel joins presence in subscribed: the join is heard after the confirm.
        presence: list[Any] = []
        assert without_presence(
            await ann.subscribe(secret, expect="reject_subscription"), presence
        ) == [
            {"identifier": secret, "message": {"sorry": "secret"}},
            {"identifier": secret, "type": "reject_subscription"},
        ]
        await bob.subscribe(lobby)

        async def recv(client: Any) -> Any:
            while True:
                message = await client.recv(timeout=30)
                if message.get("type") != "presence":
                    return message
                presence.append(message)

        # An action that transmits to its client and broadcasts to the room.
        await ann.perform(lobby, "speak", text="hi")
        got = [await recv(ann), await recv(ann)]
        broadcast = {"identifier": lobby, "message": {"from": "ann", "text": "hi"}}
        assert {"identifier": lobby, "message": {"echo": "hi"}} in got
        assert broadcast in got
        assert await recv(bob) == broadcast
        # The connection state the application changed (visits 1 -> 2) comes back next time.
        await ann.perform(lobby, "speak", text="again")
        for _ in range(2):
            await recv(ann)
        assert await recv(bob) == {
            "identifier": lobby,
            "message": {"from": "ann", "text": "again"},
        }
        assert any(m["identifier"] == lobby and m["message"]["type"] == "join" for m in presence), (
            presence
        )

    # Both closed: each connection's subscriptions and the disconnect callback ran in the
    # application, with the identifiers and the state it had set.
    await eventually(lambda: len([e for e in events if e[0] == "disconnect"]) == 2, 30)
    assert ("unsubscribed", lobby, {"user_id": "ann"}, {"joined": "lobby"}) in events
    assert ("unsubscribed", lobby, {"user_id": "bob"}, {"joined": "lobby"}) in events
    assert ("disconnect", {"user_id": "ann"}, {"visits": 3}) in events
    assert ("disconnect", {"user_id": "bob"}, {"visits": 1}) in events


async def test_the_django_example_through_trio_cable(tmp_path: Path) -> None:
    # The README's three commands: the Django site, trio-cable serve --rpc-host, a browser
    # that logs in and opens the WebSocket with its session cookie.
    pytest.importorskip("django")
    from tests.test_example_django import SECRET, _free_port, django_site, log_in

    port = _free_port()
    with django_site(tmp_path, f"http://127.0.0.1:{port}/_broadcast") as site:
        async with httpx.AsyncClient(timeout=30) as browser:
            session = await log_in(browser, site, "ann")
        config = Config(port=port, secret=SECRET, rpc_host=f"{site}/anycable", close_timeout=1.0)
        async with trio.open_nursery() as nursery:
            server = await nursery.start(Server(config).serve)
            async with client_of(server, None) as stranger:
                assert (await stranger.recv(timeout=30))["reason"] == "unauthorized"
            async with client_of(server, f"sessionid={session}") as ann:
                assert (await ann.recv(timeout=30))["type"] == "welcome"
                lobby = '{"channel":"ChatChannel","room":"lobby"}'
                await ann.subscribe(lobby)
                await ann.perform(lobby, "speak", text="hello from Django")
                message = await ann.recv(timeout=30)
                if message.get("type") == "presence":  # the channel joined ann to presence
                    message = await ann.recv(timeout=30)
                assert message == {
                    "identifier": lobby,
                    "message": {"from": "ann", "text": "hello from Django"},
                }
            nursery.cancel_scope.cancel()
