"""Long polling (POST /lp): the server's sessions over raw HTTP, and the trio_cable client in
poll mode, across a drain and a takeover by a second node sharing a real Redis."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest
import trio

from tests.conftest import eventually, identifier, make_app
from tests.handoff import hand_over
from tests.redis_support import REDIS_SERVER, RedisProcess, redis_fixture  # noqa: F401
from tests.redis_support import SKIP_REASON as NO_REDIS
from trio_cable import Config, Server
from trio_cable.client import open_cable
from trio_cable.client.http import HTTPResponse, request

POLL_ID = "x-anycable-poll-id"


def lp_config(**extra: Any) -> Config:
    return Config(**{"port": 0, "public_streams": True, "close_timeout": 1.0, **extra})


async def post(
    server: Server, lines: list[dict[str, Any]], poll_id: str | None = None, query: str = ""
) -> tuple[HTTPResponse, list[dict[str, Any]]]:
    headers = [(POLL_ID, poll_id)] if poll_id else []
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    url = f"http://127.0.0.1:{server.port}/lp{query}"
    with trio.fail_after(30):
        response = await request(url, "POST", headers, body)
    if response.headers.get("content-type") != "application/x-ndjson":
        return response, []  # a refusal's text
    return response, [json.loads(line) for line in response.body.splitlines() if line.strip()]


def without_pings(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("type") != "ping"]


async def test_a_session_over_polls(nursery):
    server = await nursery.start(Server(lp_config(poll_interval=5.0), make_app()).serve)
    ident = identifier(stream="lp")
    response, messages = await post(server, [{"command": "subscribe", "identifier": ident}])
    assert response.status == 200
    poll_id = response.headers[POLL_ID]
    kinds = [m.get("type") for m in without_pings(messages)]
    assert kinds[0] == "welcome" and kinds[-1] == "confirm_subscription", messages
    assert server.metrics.value("long_poll_sessions") == 1
    await server.broadcast("lp", {"n": 1})
    answer: list[dict[str, Any]] = []
    with trio.fail_after(10):
        while not any("identifier" in m for m in answer):  # pings come in answers too
            answer += (await post(server, [], poll_id))[1]
    (data,) = [m for m in answer if "identifier" in m]
    assert data["message"] == {"n": 1} and data["offset"] == 1 and data["stream_id"] == "lp"
    # Commands go in a poll's body; the answer holds what they produced.
    _, messages = await post(
        server,
        [
            {
                "command": "message",
                "identifier": ident,
                "data": json.dumps({"action": "echo", "x": 1}),
            }
        ],
        poll_id,
    )
    assert {"action": "echo", "x": 1} in [m.get("message") for m in messages]
    stale, body = await post(server, [], "no-such-session")
    assert stale.status == 401 and body[0]["type"] == "disconnect"
    assert server.metrics.long_poll_stale_requests_total == 1


async def test_a_newer_poll_makes_the_waiting_one_answer_empty(nursery):
    """A client sends commands without waiting for its long poll to end; the waiting poll
    answers at once and empty (AnyCable's client aborts it: what it carried would be lost),
    and the new poll gets what the commands produced."""
    server = await nursery.start(
        Server(lp_config(poll_interval=20.0, ping_interval=60.0), make_app()).serve
    )
    response, _ = await post(server, [])
    poll_id = response.headers[POLL_ID]
    answers: list[list[dict[str, Any]]] = []
    answered = trio.Event()

    async def waiting(done: trio.Event) -> None:
        answers.append((await post(server, [], poll_id))[1])
        done.set()

    for _ in range(5):  # the ticker's first ping of a new session may answer the first one
        answers.clear()
        answered = trio.Event()
        nursery.start_soon(waiting, answered)
        await trio.sleep(0.3)
        if not answered.is_set():
            break
    assert not answered.is_set(), "a poll with nothing to answer returned"
    ident = identifier()
    _, newer = await post(server, [{"command": "subscribe", "identifier": ident}], poll_id)
    with trio.fail_after(10):  # long before the 20 s poll interval
        await answered.wait()
    assert answers == [[]]
    assert {"identifier": ident, "type": "confirm_subscription"} in newer


async def test_a_session_nobody_polls_ends(nursery, unsubscribed):
    server = await nursery.start(Server(lp_config(poll_keepalive_timeout=0.5), make_app()).serve)
    response, _ = await post(server, [{"command": "subscribe", "identifier": identifier()}])
    await eventually(lambda: not server.connections, what="the idle session ends")
    assert server.metrics.long_poll_timeouts_total == 1
    # Detached first (closing), then the subscriptions end (closed): wait for those too.
    await eventually(lambda: unsubscribed == [identifier()], what="unsubscribed")
    stale, _ = await post(server, [], response.headers[POLL_ID])
    assert stale.status == 401


async def test_refused_connection_is_401_with_the_reason(nursery):
    server = await nursery.start(Server(lp_config(), make_app()).serve)
    response, messages = await post(server, [], query="?reject=1")
    assert response.status == 401
    assert messages[-1]["reason"] == "unauthorized" and messages[-1]["reconnect"] is False


async def test_client_falls_back_from_a_refused_websocket_to_long_polling(nursery):
    server = await nursery.start(Server(lp_config(), make_app()).serve)
    events: list[str] = []
    # /blocked is no WebSocket endpoint (404), as a proxy that refuses WebSockets would say.
    async with open_cable(
        f"ws://127.0.0.1:{server.port}/blocked",
        transport="auto",
        poll_url=f"http://127.0.0.1:{server.port}/lp",
        on_event=lambda e: events.append(e.kind),
    ) as cable:
        sub = await cable.subscribe("EchoChannel", {"stream": "fb"})
        await server.broadcast("fb", "hello")
        with trio.fail_after(10):
            while (await sub.receive()).data != "hello":
                pass
    assert "fallback" in events


# -- poll mode across a drain ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(REDIS_SERVER is None, reason=NO_REDIS)
async def test_poll_mode_client_resumes_after_a_drain_with_nothing_lost(nursery, redis):
    def config(port: int = 0) -> Config:
        return lp_config(
            port=port,
            broker="redis",
            redis_url=redis.url,
            drain_period=0,
            reconnect_advice=0.5,
            sessions_ttl=30,
            poll_interval=2.0,
        )

    listener = socket.create_server(("127.0.0.1", 0))
    old = await nursery.start(Server(config(), make_app(), listen_socket=listener).serve)
    port = old.port
    events: list[tuple[str, bool | None]] = []
    received: list[Any] = []
    async with open_cable(
        f"ws://127.0.0.1:{port}/cable",
        transport="long_poll",
        on_event=lambda e: events.append((e.kind, e.restored)),
    ) as cable:
        sub = await cable.subscribe("EchoChannel", {"stream": "poll/feed"})

        async def receive_until(n: int) -> None:
            with trio.fail_after(30):
                while len(received) < n:
                    message = await sub.receive()
                    if isinstance(message.data, int):
                        received.append(message.data)

        for n in range(1, 6):
            await old.broadcast("poll/feed", n)
        await receive_until(5)
        await hand_over(old)
        new = await nursery.start(Server(config(port), make_app()).serve)
        await old.drain()
        for n in range(6, 11):  # while the client is away (or coming back)
            await new.broadcast("poll/feed", n)
        await eventually(lambda: new.hub.subscribers("poll/feed") == 1, what="resumed on B")
        for n in range(11, 14):
            await new.broadcast("poll/feed", n)
        await receive_until(13)
        await trio.sleep(0.3)  # a duplicate would arrive right behind
    assert received == list(range(1, 14))
    assert new.metrics.sessions_resumed_total == 1
    assert new.metrics.long_poll_sessions_total == 1
    assert [restored for kind, restored in events if kind == "connected"] == [False, True]


async def test_a_session_whose_client_does_not_collect_is_dropped_too_slow(nursery):
    server = await nursery.start(
        Server(lp_config(max_send_queue=16 * 1024, ping_interval=60.0), make_app()).serve
    )
    response, _ = await post(server, [{"command": "subscribe", "identifier": identifier()}])
    for _ in range(3):
        await server.broadcast("echo", "x" * 8 * 1024)  # EchoChannel streams from "echo"
    await eventually(lambda: server.metrics.too_slow_total == 1, what="too_slow")
    _, messages = await post(server, [], response.headers[POLL_ID])
    assert messages == [{"type": "disconnect", "reason": "too_slow", "reconnect": True}]


async def test_admission_control_applies_to_new_sessions_not_to_polls(nursery):
    server = await nursery.start(Server(lp_config(max_connections=1), make_app()).serve)
    first, _ = await post(server, [])
    refused, _ = await post(server, [])
    assert refused.status == 503 and int(refused.headers["retry-after"]) >= 1
    assert server.metrics.labeled["handshakes_refused_total"]["max_connections"] == 1
    again, _ = await post(server, [], first.headers[POLL_ID])  # the admitted session polls on
    assert again.status == 200
