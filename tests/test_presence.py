"""Whispers and presence (PROTOCOL.md, sections Whispers and Presence) over real sockets."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import trio

from tests.conftest import SECRET, CableClient, client_of, eventually, identifier, make_app
from tests.redis_support import REDIS_SERVER, SKIP_REASON, RedisProcess
from trio_cable import Config, Server
from trio_cable.broker.memory import MemoryBroker
from trio_cable.broker.presence import PresenceState
from trio_cable.channels import Channel
from trio_cable.server.presence import InfoAnswers, PresenceCoalescer
from trio_cable.streams import sign_stream

EXT = "actioncable-v1-ext-json"
PLAIN = "actioncable-v1-json"
MSGPACK = "actioncable-v1-ext-msgpack"
ECHO = identifier()
PUBLIC = identifier("$pubsub", stream_name="room/1")


def signed(stream: str = "room/2") -> str:
    return identifier("$pubsub", signed_stream_name=sign_stream(SECRET, stream))


class WhisperingChannel(Channel):
    """An application channel that lets its clients whisper and joins them to presence."""

    async def subscribed(self) -> None:
        room = f"app/{self.params['room']}"
        self.stream_from(room, whisper=bool(self.params.get("whisper")))
        user = self.params.get("user")
        if user:
            await self.join_presence(room, user, {"name": f"user {user}"})


def make_config(**overrides: Any) -> Config:
    options: dict[str, Any] = {
        "port": 0,
        "secret": SECRET,
        "public_streams": True,
        "close_timeout": 1.0,
        "presence_window": 0.0,  # coalescing has its own tests
        **overrides,
    }
    return Config(**options)


@pytest.fixture
def start(nursery: trio.Nursery) -> Callable[..., Any]:
    async def _start(broker: Any = None, **overrides: Any) -> Server:
        app = make_app()
        app.channel(WhisperingChannel)
        server = Server(make_config(**overrides), app, broker=broker)
        started: Server = await nursery.start(server.serve)
        return started

    return _start


async def subscribed(client: CableClient, *idents: str) -> CableClient:
    for ident in idents:
        await client.subscribe(ident)
    return client


async def presence_event(client: CableClient, ident: str = PUBLIC) -> dict[str, Any]:
    """The next presence message (anything else on the way is an error)."""
    message = await client.recv(timeout=10)
    assert message.get("type") == "presence" and message["identifier"] == ident, message
    event: dict[str, Any] = message["message"]
    return event


async def join(client: CableClient, pid: str, info: Any = None, ident: str = PUBLIC) -> None:
    presence: dict[str, Any] = {"id": pid}
    if info is not None:
        presence["info"] = info
    await client.send({"command": "join", "identifier": ident, "presence": presence})


async def info(client: CableClient, ident: str = PUBLIC, **data: Any) -> dict[str, Any]:
    await client.send({"command": "presence", "identifier": ident, "data": data})
    return await presence_event(client, ident)


def lingering(server: Server) -> int:
    broker = server.broker
    assert isinstance(broker, MemoryBroker)
    return broker.presence.lingering


# -- whispers -------------------------------------------------------------------------------


@pytest.mark.parametrize("receiver_protocol", [EXT, PLAIN, MSGPACK])
async def test_whisper_reaches_the_others_not_the_sender_and_has_no_position(
    start, receiver_protocol
):
    server = await start()
    async with (
        client_of(server) as sender,
        client_of(server, receiver_protocol) as receiver,
    ):
        await subscribed(sender, ECHO, PUBLIC)
        await subscribed(receiver, PUBLIC)
        await sender.send({"command": "whisper", "identifier": PUBLIC, "data": {"typing": 1}})
        message = await receiver.recv(raw=True)
        # Transient: no stream_id / epoch / offset, even for the extended protocols.
        assert message == {"identifier": PUBLIC, "message": {"typing": 1}}
        await sender.expect_nothing_before_echo(ECHO)
        # Not stored: a history request from the start serves no whisper.
        assert server.metrics.whispers_total == 1


async def test_values_json_cannot_carry_are_refused_not_relayed(start):
    server = await start()
    async with client_of(server, MSGPACK) as sender, client_of(server) as receiver:
        await subscribed(sender, PUBLIC)
        await subscribed(receiver, ECHO, PUBLIC)
        # (bytes are refused by the msgpack codec already, as for every command)
        await sender.send({"command": "whisper", "identifier": PUBLIC, "data": [float("inf")]})
        await sender.send(
            {"command": "join", "identifier": PUBLIC, "presence": {"id": "1", "info": float("nan")}}
        )
        await eventually(lambda: server.metrics.invalid_requests_total == 2)
        await receiver.expect_nothing_before_echo(ECHO)
        await sender.send({"command": "whisper", "identifier": PUBLIC, "data": "still here"})
        assert await receiver.recv() == {"identifier": PUBLIC, "message": "still here"}


async def test_whisper_on_a_signed_stream_is_ignored_without_the_flag(start):
    server = await start()
    async with client_of(server) as sender, client_of(server) as receiver:
        await subscribed(sender, signed())
        await subscribed(receiver, ECHO, signed())
        await sender.send({"command": "whisper", "identifier": signed(), "data": "hi"})
        await eventually(lambda: server.metrics.whispers_ignored_total == 1)
        await receiver.expect_nothing_before_echo(ECHO)
        assert server.metrics.whispers_total == 0


async def test_whisper_on_a_signed_stream_with_the_flag(start):
    server = await start(streams_whisper=True)
    async with client_of(server) as sender, client_of(server) as receiver:
        await subscribed(sender, signed())
        await subscribed(receiver, signed())
        await sender.send({"command": "whisper", "identifier": signed(), "data": "hi"})
        assert await receiver.recv() == {"identifier": signed(), "message": "hi"}


async def test_application_channels_whisper_only_with_whisper_true(start):
    server = await start()
    loud = identifier("WhisperingChannel", room="a", whisper=True)
    quiet = identifier("WhisperingChannel", room="b")
    async with client_of(server) as sender, client_of(server) as receiver:
        await subscribed(sender, loud, quiet)
        await subscribed(receiver, ECHO, loud, quiet)
        await sender.send({"command": "whisper", "identifier": quiet, "data": 1})
        await sender.send({"command": "whisper", "identifier": loud, "data": 2})
        assert await receiver.recv() == {"identifier": loud, "message": 2}
        await receiver.expect_nothing_before_echo(ECHO)
        assert server.metrics.whispers_ignored_total == 1


async def test_whispers_are_rate_limited_like_every_command(start):
    server = await start(command_rate=5.0)
    async with client_of(server) as sender, client_of(server) as receiver:
        await subscribed(sender, PUBLIC)
        await subscribed(receiver, PUBLIC)
        for n in range(40):
            await sender.send({"command": "whisper", "identifier": PUBLIC, "data": n})
        await eventually(lambda: server.metrics.rate_limited_commands_total >= 20)
        assert server.metrics.whispers_total < 20


# -- presence -------------------------------------------------------------------------------


@pytest.mark.parametrize("ident", [PUBLIC, signed()], ids=["public", "signed"])
async def test_join_info_leave_between_two_clients(start, ident):
    server = await start()
    async with client_of(server) as alice, client_of(server, MSGPACK) as bob:
        await subscribed(alice, ident)
        await subscribed(bob, ident)
        await join(alice, "1", {"name": "Alice"}, ident)
        joined = {"type": "join", "info": {"name": "Alice"}, "id": "1"}
        assert await presence_event(alice, ident) == joined
        assert await presence_event(bob, ident) == joined
        await join(bob, "2", ident=ident)  # no info
        assert await presence_event(alice, ident) == {"type": "join", "id": "2"}
        assert await presence_event(bob, ident) == {"type": "join", "id": "2"}
        assert await info(bob, ident) == {
            "type": "info",
            "total": 2,
            "records": [{"info": {"name": "Alice"}, "id": "1"}, {"id": "2"}],
        }
        assert await info(bob, ident, return_records=False) == {"type": "info", "total": 2}
        await alice.send({"command": "leave", "identifier": ident})
        assert await presence_event(bob, ident) == {"type": "leave", "id": "1"}
        assert await server.presence("room/1" if ident == PUBLIC else "room/2") == {
            "type": "info",
            "total": 1,
            "records": [{"id": "2"}],
        }


async def test_presence_needs_a_presence_stream(start):
    server = await start()
    async with client_of(server) as client:
        await subscribed(client, ECHO)
        assert await info(client, ECHO) == {"type": "error", "total": 0}
        await join(client, "1", ident=ECHO)
        await eventually(lambda: server.metrics.presence_refused_total == 2)


async def test_empty_presence_has_no_records(start):
    server = await start()
    async with client_of(server) as client:
        await subscribed(client, PUBLIC)
        assert await info(client) == {"type": "info", "total": 0}


async def test_subscribe_with_presence_joins_after_the_confirm(start):
    server = await start()
    async with client_of(server) as client:
        await client.send(
            {"command": "subscribe", "identifier": PUBLIC, "presence": {"id": 7, "info": "x"}}
        )
        assert await client.recv() == {"identifier": PUBLIC, "type": "confirm_subscription"}
        assert await presence_event(client) == {"type": "join", "info": "x", "id": "7"}


async def test_one_id_per_session_and_stream(start):
    server = await start()
    async with client_of(server) as client:
        await subscribed(client, ECHO, PUBLIC)
        await join(client, "1")
        assert await presence_event(client) == {"type": "join", "id": "1"}
        await join(client, "1", {"again": True})  # the same id: its info changes, no event
        await join(client, "2")  # another id: refused
        await client.expect_nothing_before_echo(ECHO)
        assert server.metrics.presence_refused_total == 1
        assert (await info(client))["records"] == [{"info": {"again": True}, "id": "1"}]


async def test_ids_are_deduplicated_across_one_users_sessions(start):
    server = await start()
    async with client_of(server) as watcher:
        await subscribed(watcher, ECHO, PUBLIC)
        async with client_of(server) as tab1, client_of(server) as tab2:
            await subscribed(tab1, PUBLIC)
            await subscribed(tab2, PUBLIC)
            await join(tab1, "42")
            assert await presence_event(watcher) == {"type": "join", "id": "42"}
            assert await presence_event(tab2) == {"type": "join", "id": "42"}  # tab1's
            await join(tab2, "42")  # not new to the stream: nobody hears of it
            await tab1.send({"command": "leave", "identifier": PUBLIC})
            await tab1.send({"command": "unsubscribe", "identifier": PUBLIC})
            await eventually(lambda: server.metrics.presence_commands_total == 3)
            await watcher.expect_nothing_before_echo(ECHO)  # tab2 still holds 42
            assert (await info(watcher))["total"] == 1
            await tab2.send({"command": "unsubscribe", "identifier": PUBLIC})  # leaves at once
            assert await presence_event(watcher) == {"type": "leave", "id": "42"}


async def test_a_disconnected_session_lingers_and_a_new_session_of_its_id_makes_no_churn(start):
    server = await start(presence_ttl=0.5)
    async with client_of(server) as watcher:
        await subscribed(watcher, ECHO, PUBLIC)
        async with client_of(server, PLAIN) as first:
            await subscribed(first, PUBLIC)
            await join(first, "u1")
            assert await presence_event(watcher) == {"type": "join", "id": "u1"}
        await eventually(lambda: lingering(server) == 1, what="the record lingers")
        # Back as a new session (a plain client cannot resume) within the linger.
        async with client_of(server, PLAIN) as second:
            await subscribed(second, PUBLIC)
            await join(second, "u1")
            await eventually(lambda: lingering(server) == 0, what="the old record expired")
            await watcher.expect_nothing_before_echo(ECHO)
            assert await info(watcher) == {"type": "info", "total": 1, "records": [{"id": "u1"}]}
        # Gone for good: the leave comes once the linger is over, not before.
        left_at = trio.current_time()
        assert await presence_event(watcher) == {"type": "leave", "id": "u1"}
        assert trio.current_time() - left_at >= 0.5 - 0.05


async def test_without_a_linger_a_disconnect_leaves_at_once(start):
    server = await start(presence_ttl=0)
    async with client_of(server) as watcher:
        await subscribed(watcher, PUBLIC)
        async with client_of(server) as client:
            await subscribed(client, PUBLIC)
            await join(client, "u1")
            assert await presence_event(watcher) == {"type": "join", "id": "u1"}
        assert await presence_event(watcher) == {"type": "leave", "id": "u1"}
        assert lingering(server) == 0


async def test_a_resumed_session_keeps_its_presence_without_leave_or_join(start):
    server = await start(presence_ttl=0.2)
    async with client_of(server) as watcher:
        await subscribed(watcher, ECHO, PUBLIC)
        async with client_of(server) as before:
            await subscribed(before, PUBLIC)
            await join(before, "u1", {"n": 1})
            assert await presence_event(watcher) == {"type": "join", "info": {"n": 1}, "id": "u1"}
            sid = before.welcome["sid"]  # type: ignore[attr-defined]
        async with client_of(server, query=f"sid={sid}") as after:
            assert after.welcome.get("restored") is True  # type: ignore[attr-defined]
            broker = server.broker
            assert isinstance(broker, MemoryBroker)
            new_sid = after.welcome["sid"]  # type: ignore[attr-defined]
            await eventually(
                lambda: set(broker.presence.streams["room/1"].sessions) == {new_sid},
                what="the presence moved to the new session",
            )
            await trio.sleep(0.3)  # past the old session's linger
            await watcher.expect_nothing_before_echo(ECHO)
            assert (await info(watcher))["records"] == [{"info": {"n": 1}, "id": "u1"}]
            # Still its presence: leaving is heard.
            await after.send({"command": "leave", "identifier": PUBLIC})
            assert await presence_event(watcher) == {"type": "leave", "id": "u1"}


async def test_application_channels_join_presence(start):
    server = await start()
    room = identifier("WhisperingChannel", room="p")
    async with client_of(server) as watcher:
        await subscribed(watcher, room)
        async with client_of(server) as user:
            await user.send(
                {
                    "command": "subscribe",
                    "identifier": identifier("WhisperingChannel", room="p", user="9"),
                }
            )
            assert await presence_event(watcher, room) == {
                "type": "join",
                "info": {"name": "user 9"},
                "id": "9",
            }
        # Not joined itself, but the channel's stream has presence it may ask.
        assert await info(watcher, room) == {"type": "error", "total": 0}
        assert (await server.presence("app/p"))["total"] == 1


async def test_presence_endpoint_is_behind_the_broadcast_key(start):
    server = await start()
    async with client_of(server) as client:
        await subscribed(client, PUBLIC)
        await join(client, "5", {"a": 1})
        await presence_event(client)
        url = f"http://127.0.0.1:{server.port}/api/presence/room%2F1"

        def get(key: str | None) -> tuple[int, Any]:
            request = urllib.request.Request(url)
            if key:
                request.add_header("Authorization", f"Bearer {key}")
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, None

        assert (await trio.to_thread.run_sync(get, None))[0] == 401
        assert await trio.to_thread.run_sync(get, SECRET) == (
            200,
            {"type": "info", "total": 1, "records": [{"info": {"a": 1}, "id": "5"}]},
        )


async def test_presence_events_of_a_burst_are_coalesced(start):
    server = await start(presence_window=0.3)
    async with client_of(server) as watcher:
        await subscribed(watcher, PUBLIC)
        async with client_of(server) as a, client_of(server) as b:
            await subscribed(a, PUBLIC)
            await subscribed(b, PUBLIC)
            await join(a, "a")  # the first of a quiet stream goes out at once
            assert await presence_event(watcher) == {"type": "join", "id": "a"}
            await join(b, "b")  # held ...
            await a.send({"command": "leave", "identifier": PUBLIC})  # held ...
            await b.send({"command": "leave", "identifier": PUBLIC})  # ... b came and went
            await join(a, "a")  # ... a left and came back
            # One net event at the end of the window: a's join (b nets out to nothing).
            assert await presence_event(watcher) == {"type": "join", "id": "a"}
            assert server.metrics.presence_events_coalesced_total == 3
            await watcher.expect_silence(0.5)


# -- sans I/O -------------------------------------------------------------------------------


def test_presence_state_deduplicates_and_lingers():
    state = PresenceState()
    assert state.join("s", "sid1", "u", 1) == {"type": "join", "info": 1, "id": "u"}
    assert state.join("s", "sid2", "u", 2) is None
    assert state.info("s") == (1, [{"info": 2, "id": "u"}])
    assert state.leave("s", "sid1") is None
    state.linger("s", "sid2", 10.0)
    assert state.expire(9.0) == []
    assert state.join("s", "sid2", "u", 2) is None  # back: lingers no more
    assert state.expire(11.0) == []
    state.linger("s", "sid2", 20.0)
    assert state.expire(20.0) == [("s", {"type": "leave", "id": "u"})]
    assert state.info("s") == (0, []) and not state.streams


def test_coalescer_nets_each_window_out():
    coalescer = PresenceCoalescer(0.1)
    assert coalescer.offer("s", {"type": "join", "id": "1"}, 0.0)
    assert not coalescer.offer("s", {"type": "leave", "id": "1"}, 0.01)
    assert not coalescer.offer("s", {"type": "join", "id": "1"}, 0.02)
    assert not coalescer.offer("s", {"type": "join", "id": "2"}, 0.03)
    assert not coalescer.offer("s", {"type": "leave", "id": "2"}, 0.04)
    assert coalescer.offer("t", {"type": "join", "id": "1"}, 0.05)  # another stream
    assert coalescer.due(0.05) == []
    assert coalescer.due(0.1) == [("s", [{"type": "join", "id": "1"}])]
    assert coalescer.next_deadline is not None  # the burst may go on: a new window
    assert coalescer.due(1.0) == []
    assert coalescer.next_deadline is None
    assert coalescer.offer("s", {"type": "leave", "id": "1"}, 1.0)  # quiet again: at once


# -- Redis: presence shared by nodes ----------------------------------------------------------


@pytest.fixture
def redis(tmp_path: Any) -> Any:
    if REDIS_SERVER is None:
        pytest.skip(SKIP_REASON)
    proc = RedisProcess(tmp_path)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def two_nodes(start, redis) -> Callable[..., Any]:
    from trio_cable.broker.redis import RedisBroker

    async def _start(broker_options: Any = None, **overrides: Any) -> tuple[Server, Server]:
        options = {"heartbeat": 0.2, "command_timeout": 1.0, "connect_timeout": 0.5}
        options.update(broker_options or {})
        a = await start(RedisBroker(redis.url, **options), **overrides)
        b = await start(RedisBroker(redis.url, **options), **overrides)
        return a, b

    return _start


async def test_redis_presence_and_whispers_are_shared_by_nodes(two_nodes):
    a, b = await two_nodes()
    async with client_of(a) as alice, client_of(b, MSGPACK) as bob, client_of(b) as tab:
        await subscribed(alice, ECHO, PUBLIC)
        await subscribed(bob, ECHO, PUBLIC)
        await subscribed(tab, PUBLIC)
        await join(alice, "1", {"name": "Alice"})
        joined = {"type": "join", "info": {"name": "Alice"}, "id": "1"}
        assert await presence_event(bob) == joined
        assert await presence_event(tab) == joined
        assert await presence_event(alice) == joined
        # The same id from a session on the other node is the same member.
        await join(tab, "1", {"name": "Alice"})
        await eventually(lambda: b.metrics.presence_commands_total == 1)
        assert await info(bob) == {
            "type": "info",
            "total": 1,
            "records": [{"info": {"name": "Alice"}, "id": "1"}],
        }
        assert await a.presence("room/1") == await b.presence("room/1")
        # A whisper crosses nodes, and does not come back to its sender.
        await bob.send({"command": "whisper", "identifier": PUBLIC, "data": {"hi": 1}})
        assert await alice.recv() == {"identifier": PUBLIC, "message": {"hi": 1}}
        assert await tab.recv() == {"identifier": PUBLIC, "message": {"hi": 1}}
        await bob.expect_nothing_before_echo(ECHO)
        # Alice leaves: the id is still held on node b, nobody hears of it ...
        await alice.send({"command": "leave", "identifier": PUBLIC})
        await eventually(lambda: a.metrics.presence_commands_total == 2)
        await bob.expect_silence(0.3)  # (an event would come from node a through Redis)
        # ... until its last session leaves.
        await tab.send({"command": "unsubscribe", "identifier": PUBLIC})
        assert await presence_event(bob) == {"type": "leave", "id": "1"}
        assert await presence_event(alice) == {"type": "leave", "id": "1"}


async def test_redis_linger_and_resume_across_nodes_make_no_churn(two_nodes):
    a, b = await two_nodes(presence_ttl=0.5)
    async with client_of(b) as watcher:
        await subscribed(watcher, ECHO, PUBLIC)
        async with client_of(a) as before:
            await subscribed(before, PUBLIC)
            await join(before, "u1")
            assert await presence_event(watcher) == {"type": "join", "id": "u1"}
            sid = before.welcome["sid"]  # type: ignore[attr-defined]
        # Resumed on the other node (the drain's way): no leave, no join, then or later.
        async with client_of(b, query=f"sid={sid}") as after:
            assert after.welcome.get("restored") is True  # type: ignore[attr-defined]
            await trio.sleep(1.0)  # twice the linger: the old record's would have ended
            await watcher.expect_silence(0.3)
            assert await info(watcher) == {"type": "info", "total": 1, "records": [{"id": "u1"}]}
        # Gone for good: one leave, after the linger.
        assert await presence_event(watcher) == {"type": "leave", "id": "u1"}
        assert (await b.presence("room/1"))["total"] == 0


def test_info_answers_are_encoded_once_per_change():
    from trio_cable.protocol.cable import JSON, MSGPACK

    state = PresenceState()
    answers = InfoAnswers()
    state.join("s", "sid1", "1", {"a": 1})
    first = answers.encoder("s", *state.info("s"), True)
    assert answers.encoder("s", *state.info("s"), True) is first  # unchanged: the same bytes
    assert json.loads(first.encode(JSON, "id")) == {
        "type": "presence",
        "identifier": "id",
        "message": {"type": "info", "total": 1, "records": [{"info": {"a": 1}, "id": "1"}]},
    }
    state.join("s", "sid2", "2")
    changed = answers.encoder("s", *state.info("s"), True)
    assert changed is not first
    assert msgpack.unpackb(changed.encode(MSGPACK, "id"))["message"]["total"] == 2
    totals = answers.encoder("s", *state.info("s"), False)
    assert json.loads(totals.encode(JSON, "id"))["message"] == {"type": "info", "total": 2}


async def test_redis_presence_changes_made_while_redis_stalls_are_applied_later(two_nodes, redis):
    # Heartbeats far apart: the pub/sub link outlives the stall (what is tested is the
    # writer's retry, not the link's recovery).
    a, b = await two_nodes({"heartbeat": 2.0})
    async with client_of(b) as watcher, client_of(a) as client:
        await subscribed(watcher, PUBLIC)
        await subscribed(client, PUBLIC)
        redis.pause()  # nothing answers: the join's batch times out and is sent again
        try:
            await join(client, "late")
            await eventually(lambda: a.broker.stats["presence_retries"] >= 1, 15)  # type: ignore[attr-defined]
        finally:
            redis.resume()
        assert await presence_event(watcher) == {"type": "join", "id": "late"}  # once
        assert await info(watcher) == {"type": "info", "total": 1, "records": [{"id": "late"}]}
