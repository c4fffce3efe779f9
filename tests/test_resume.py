"""Session resume and reliable streams (history), over real sockets, JSON and msgpack."""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

from tests.conftest import eventually, identifier
from trio_cable import Server
from trio_cable.broker import HistoryUnavailable
from trio_cable.broker.memory import MemoryBroker

EXT = ["actioncable-v1-ext-json", "actioncable-v1-ext-msgpack"]


@pytest.mark.parametrize("subprotocol", EXT)
async def test_resume_restores_subscriptions_without_callbacks_and_history_fills_the_gap(
    server: Server, connect, unsubscribed, subprotocol
):
    ident = identifier(stream="resume")
    async with connect(subprotocol, query="user=ann") as client:
        old_sid = client.welcome["sid"]
        got = await client.subscribe(ident)
        assert got[0]["message"]["who"] == {"user": "ann"}
        await server.broadcast("resume", {"n": 1})
        assert (await client.recv())["message"] == {"n": 1}
        stream, epoch, offset = client.last_position
        assert (stream, offset) == ("resume", 1)
    # Published while the client is away:
    for n in (2, 3, 4):
        await server.broadcast("resume", {"n": n})
    # The first connection's end called unsubscribed (a resumable session too).
    await eventually(lambda: unsubscribed == [ident] and not server.connections)
    async with connect(subprotocol, query=f"sid={old_sid}", expect_welcome=False) as client:
        welcome = await client.recv()
        assert welcome["type"] == "welcome" and welcome["restored"] is True
        assert welcome["restored_ids"] == [ident]
        assert welcome["sid"] != old_sid
        history = {"streams": {"resume": {"epoch": epoch, "offset": offset}}}
        await client.send({"command": "history", "identifier": ident, "history": history})
        got = [await client.recv(raw=True) for _ in range(4)]
        assert [m.get("message") for m in got[:3]] == [{"n": 2}, {"n": 3}, {"n": 4}]
        assert [m["offset"] for m in got[:3]] == [2, 3, 4]
        assert all(m["epoch"] == epoch and m["stream_id"] == "resume" for m in got[:3])
        assert got[3] == {"identifier": ident, "type": "confirm_history"}
        # Live again, and the identity came back without the connect callback: the query
        # has no user, so the callback would have set {}.
        await server.broadcast("resume", {"n": 5})
        assert (await client.recv())["message"] == {"n": 5}
        await client.perform(ident, "echo", ok=1)
        assert (await client.recv())["message"] == {"action": "echo", "ok": 1}
    assert server.metrics.sessions_resumed_total == 1
    assert server.metrics.history_served_total == 1
    # ... and so did the restored connection's end, although no subscribe callback ran for it.
    await eventually(lambda: unsubscribed == [ident, ident])


async def test_restore_header_works_too(server, connect):
    async with connect("actioncable-v1-ext-json") as client:
        sid = client.welcome["sid"]
        await client.subscribe(identifier())
    headers = [("X-AnyCable-Restore-Sid", sid)]
    async with connect("actioncable-v1-ext-json", headers=headers, expect_welcome=False) as client:
        assert (await client.recv())["restored"] is True


async def test_unknown_or_reused_sid_gets_a_normal_welcome(server, connect):
    async with connect("actioncable-v1-ext-json", query="sid=nope") as client:
        assert "restored" not in client.welcome
    async with connect("actioncable-v1-ext-json") as client:
        sid = client.welcome["sid"]
    async with connect("actioncable-v1-ext-json", query=f"sid={sid}") as client:
        assert client.welcome.get("restored") is True
    # A session restores once: the new connection has its own sid now.
    async with connect("actioncable-v1-ext-json", query=f"sid={sid}") as client:
        assert "restored" not in client.welcome
    assert server.metrics.sessions_not_found_total == 2


async def test_plain_protocol_never_restores(server, connect):
    async with connect("actioncable-v1-ext-json") as client:
        sid = client.welcome["sid"]
    async with connect("actioncable-v1-json", query=f"sid={sid}") as client:
        assert client.welcome == {"type": "welcome", "sid": client.welcome["sid"]}


async def test_sessions_expire(nursery, config):
    from trio_websocket import open_websocket_url

    config.sessions_ttl = 0.3
    server = await nursery.start(Server(config).serve)
    url = f"ws://127.0.0.1:{server.port}/cable"

    async with open_websocket_url(url, subprotocols=["actioncable-v1-ext-json"]) as ws:
        sid = (await _next(ws))["sid"]
    # The session is saved (again) as the connection ends, just after it leaves the set.
    await eventually(lambda: not server.connections)
    await trio.sleep(0.6)  # twice the TTL; sleeping longer on a busy machine only helps
    async with open_websocket_url(
        f"{url}?sid={sid}", subprotocols=["actioncable-v1-ext-json"]
    ) as ws:
        assert "restored" not in await _next(ws)


@pytest.mark.parametrize("subprotocol", EXT)
async def test_subscribe_with_history(server, connect, subprotocol):
    since = time.time() - 1
    for n in range(3):
        await server.broadcast("hist", n)
    async with connect(subprotocol) as client:
        ident = identifier(stream="hist")
        await client.send(
            {"command": "subscribe", "identifier": ident, "history": {"since": since}}
        )
        got = [await client.recv() for _ in range(5)]
        assert got[0]["message"] == {"welcome_to": "hist", "who": {}}
        assert got[1] == {"identifier": ident, "type": "confirm_subscription"}
        assert [m["message"] for m in got[2:4]] == [0, 1]
        got.append(await client.recv())
        assert got[4]["message"] == 2
        assert got[5] == {"identifier": ident, "type": "confirm_history"}


@pytest.mark.parametrize(
    "history",
    [
        {"streams": {"h2": {"epoch": "not-the-epoch", "offset": 1}}},
        {"streams": {"h2": {"epoch": "EPOCH", "offset": 1}}},  # out of the window (limit 3)
        {"streams": {"h2": {"epoch": "EPOCH", "offset": 99}}},  # ahead of the stream
    ],
)
async def test_history_that_cannot_be_served_is_rejected_whole(nursery, config, connect, history):
    config.history_limit = 3
    server = await nursery.start(Server(config).serve)
    for n in range(10):
        await server.broadcast("h2", n)
    epoch = server.broker.epoch
    import json

    from trio_websocket import open_websocket_url

    url = f"ws://127.0.0.1:{server.port}/cable"
    async with open_websocket_url(url, subprotocols=["actioncable-v1-ext-json"]) as ws:
        await _next(ws)
        ident = json.dumps({"channel": "$pubsub", "signed_stream_name": _signed("h2")})
        await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
        assert (await _next(ws))["type"] == "confirm_subscription"
        positions = json.loads(json.dumps(history).replace("EPOCH", epoch))
        await ws.send_message(
            json.dumps({"command": "history", "identifier": ident, "history": positions})
        )
        assert await _next(ws) == {"identifier": ident, "type": "reject_history"}
        # In the window it works.
        ok = {"streams": {"h2": {"epoch": epoch, "offset": 8}}}
        await ws.send_message(
            json.dumps({"command": "history", "identifier": ident, "history": ok})
        )
        assert (await _next(ws))["offset"] == 9
        assert (await _next(ws))["offset"] == 10
        assert (await _next(ws))["type"] == "confirm_history"
    assert server.metrics.history_rejected_total == 1


async def _next(ws: Any) -> Any:
    """The next message that is not a ping (extended protocols get one right after the
    welcome, then every ping_interval)."""
    import json

    while True:
        message = json.loads(await ws.get_message())
        if message.get("type") != "ping":
            return message


def _signed(stream: str) -> str:
    from tests.conftest import SECRET
    from trio_cable.streams import sign_stream

    return sign_stream(SECRET, stream)


async def test_history_only_covers_the_subscriptions_own_streams(server, connect):
    await server.broadcast("secret-stream", {"private": True})
    async with connect("actioncable-v1-ext-json") as client:
        ident = identifier(stream="public")
        await client.subscribe(ident)
        history = {
            "since": 0,
            "streams": {"secret-stream": {"epoch": server.broker.epoch, "offset": 0}},
        }
        await client.send({"command": "history", "identifier": ident, "history": history})
        assert await client.recv() == {"identifier": ident, "type": "confirm_history"}


async def test_history_for_unknown_subscription_or_plain_protocol_is_rejected(server, connect):
    async with connect("actioncable-v1-ext-json") as client:
        ident = identifier()
        await client.send({"command": "history", "identifier": ident, "history": {"since": 0}})
        assert await client.recv() == {"identifier": ident, "type": "reject_history"}
    async with connect("actioncable-v1-json") as client:
        await client.subscribe(ident)
        await client.send({"command": "history", "identifier": ident, "history": {"since": 0}})
        assert await client.recv() == {"identifier": ident, "type": "reject_history"}


async def test_plain_clients_get_no_stream_positions(server, connect):
    async with connect("actioncable-v1-json") as plain, connect("actioncable-v1-ext-json") as ext:
        ident = identifier(stream="pos")
        await plain.subscribe(ident)
        await ext.subscribe(ident)
        await server.broadcast("pos", 1)
        assert await plain.recv(raw=True) == {"identifier": ident, "message": 1}
        message = await ext.recv(raw=True)
        assert message["stream_id"] == "pos" and message["offset"] == 1 and message["epoch"]


# -- the memory broker alone --------------------------------------------------------------------


async def test_memory_broker_history_window_and_ttl():
    now = [1000.0]
    broker = MemoryBroker(history_limit=3, history_ttl=10, clock=lambda: now[0])
    for n in range(5):
        broker.store("s", n)
        now[0] += 1
    epoch = broker.epoch
    assert [e.data for e in await broker.history_since_offset("s", epoch, 2)] == [2, 3, 4]
    assert await broker.history_since_offset("s", epoch, 5) == []
    with pytest.raises(HistoryUnavailable):
        await broker.history_since_offset("s", epoch, 1)
    with pytest.raises(HistoryUnavailable):
        await broker.history_since_offset("s", "other", 3)
    assert [e.data for e in await broker.history_since_time("s", 1003)] == [3, 4]
    now[0] += 20  # all expired
    assert await broker.history_since_time("s", 0) == []
    with pytest.raises(HistoryUnavailable):
        await broker.history_since_offset("s", epoch, 3)


async def test_memory_broker_sessions():
    now = [0.0]
    broker = MemoryBroker(clock=lambda: now[0])
    await broker.save_session("a", {"x": 1}, ttl=5)
    assert await broker.take_session("a") == {"x": 1}
    assert await broker.take_session("a") is None
    await broker.save_session("b", {"x": 2}, ttl=5)
    now[0] = 6
    assert await broker.take_session("b") is None


async def test_memory_broker_session_is_a_snapshot():
    # As with Redis: what is taken is what was saved, not the saver's live objects.
    broker = MemoryBroker()
    identifiers = {"user_id": 1}
    subscriptions = [{"identifier": "a", "streams": ["s1"]}]
    await broker.save_session("a", {"identifiers": identifiers, "subscriptions": subscriptions}, 5)
    identifiers["user_id"] = 2
    subscriptions[0]["streams"].append("s2")
    taken = await broker.take_session("a")
    assert taken == {"identifiers": {"user_id": 1}, "subscriptions": [
        {"identifier": "a", "streams": ["s1"]}]}  # fmt: skip


async def test_two_nodes_share_one_memory_broker(nursery, config, connect):
    """A client resumes on another node of the same broker (a drain moves clients this way)."""
    import json

    from trio_websocket import open_websocket_url

    broker = MemoryBroker()
    config.port = 0
    a = await nursery.start(Server(config, broker=broker).serve)
    b = await nursery.start(Server(config, broker=broker).serve)
    ident = json.dumps({"channel": "$pubsub", "signed_stream_name": _signed("shared")})
    proto = ["actioncable-v1-ext-json"]
    async with open_websocket_url(f"ws://127.0.0.1:{a.port}/cable", subprotocols=proto) as ws:
        sid = (await _next(ws))["sid"]
        await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
        assert (await _next(ws))["type"] == "confirm_subscription"
        await b.broadcast("shared", "from b")
        message = await _next(ws)
        assert message["message"] == "from b"
    await a.broadcast("shared", "missed")
    async with open_websocket_url(
        f"ws://127.0.0.1:{b.port}/cable?sid={sid}", subprotocols=proto
    ) as ws:
        assert (await _next(ws))["restored_ids"] == [ident]
        history = {"streams": {"shared": {"epoch": message["epoch"], "offset": message["offset"]}}}
        await ws.send_message(
            json.dumps({"command": "history", "identifier": ident, "history": history})
        )
        assert (await _next(ws))["message"] == "missed"
        assert (await _next(ws))["type"] == "confirm_history"


async def test_session_ended_without_reconnect_is_not_resumable(server, connect):
    async with connect("actioncable-v1-ext-json", query="user=eve") as client:
        sid = client.welcome["sid"]
        await client.subscribe(identifier())
        await server.remote_disconnect({"user": "eve"})
        assert (await client.recv())["reason"] == "remote"
    with trio.fail_after(5):
        while server.connections:
            await trio.sleep(0.01)
    async with connect("actioncable-v1-ext-json", query=f"sid={sid}") as client:
        assert "restored" not in client.welcome


async def test_restore_with_a_token_of_another_identity_is_refused(nursery, config):

    from trio_websocket import open_websocket_url

    from trio_cable.identity import issue_token

    server = await nursery.start(Server(config).serve)
    url = f"ws://127.0.0.1:{server.port}/cable"
    proto = ["actioncable-v1-ext-json"]
    alice = issue_token(config.secret, {"user": "alice"}, ttl=60)
    mallory = issue_token(config.secret, {"user": "mallory"}, ttl=60)
    async with open_websocket_url(f"{url}?jid={alice}", subprotocols=proto) as ws:
        sid = (await _next(ws))["sid"]
    # Mallory learned the sid, but her token names another identity: no restore.
    async with open_websocket_url(f"{url}?jid={mallory}&sid={sid}", subprotocols=proto) as ws:
        assert "restored" not in await _next(ws)
    async with open_websocket_url(f"{url}?jid={alice}", subprotocols=proto) as ws:
        sid = (await _next(ws))["sid"]
    async with open_websocket_url(f"{url}?jid={alice}&sid={sid}", subprotocols=proto) as ws:
        assert (await _next(ws))["restored"] is True


async def test_subscribe_with_history_while_subscribed_awaits(nursery, config):
    """Broadcasts published while an async subscribed() runs come after the history, once."""
    import json

    from trio_websocket import open_websocket_url

    from trio_cable import CableApp, Channel

    app = CableApp()
    entered = trio.Event()
    proceed = trio.Event()

    @app.channel
    class SlowStart(Channel):
        async def subscribed(self) -> None:
            self.stream_from("slow")
            self.transmit({"hello": True})
            entered.set()
            await proceed.wait()

    server = await nursery.start(Server(config, app).serve)
    for n in range(3):
        await server.broadcast("slow", n)
    ident = json.dumps({"channel": "SlowStart"})
    url = f"ws://127.0.0.1:{server.port}/cable"
    async with open_websocket_url(url, subprotocols=["actioncable-v1-ext-json"]) as ws:
        await _next(ws)
        command = {"command": "subscribe", "identifier": ident, "history": {"since": 0}}
        await ws.send_message(json.dumps(command))
        await entered.wait()
        for n in range(3, 6):
            await server.broadcast("slow", n)  # live, while subscribed() awaits
        proceed.set()
        got = [await _next(ws) for _ in range(9)]
        with trio.move_on_after(0.5):
            while True:  # nothing else, in particular no second copy of 3, 4, 5
                extra = await _next(ws)
                assert extra["type"] == "ping", extra
    assert got[0]["message"] == {"hello": True}
    assert got[1]["type"] == "confirm_subscription"
    assert [m["message"] for m in got[2:8]] == [0, 1, 2, 3, 4, 5]
    assert got[8]["type"] == "confirm_history"


async def test_memory_broker_forgets_idle_streams_and_renews_their_epoch():
    now = [0.0]
    broker = MemoryBroker(history_limit=10, history_ttl=10, clock=lambda: now[0])
    first = broker.store("old", 1)
    for i in range(3000):  # ever-new stream names must not grow memory for ever
        broker.store(f"s{i}", i)
        now[0] += 0.01
    now[0] += 20
    for i in range(2048):  # enough writes to run the periodic sweep
        broker.store("hot", i)
    assert len(broker._histories) < 100
    again = broker.store("old", 2)
    assert again.epoch != first.epoch and again.offset == 1
    with pytest.raises(HistoryUnavailable):
        await broker.history_since_offset("old", first.epoch, first.offset)
