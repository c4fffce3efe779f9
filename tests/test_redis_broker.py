"""The Redis broker against a real ``redis-server`` (started here on a free port): several
``Server`` nodes in one process, each with its own :class:`RedisBroker`, over real sockets.

Also reproduces the coredis 6.9 behaviours the broker works around (issue 7), so that a
coredis upgrade that changes them shows up here."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import RawClient, client_of, identifier, make_app
from tests.procs import ROOT, cli_command
from tests.redis_support import (
    REDIS_SERVER,
    SKIP_REASON,
    RedisProcess,
    RedisProxy,
    free_port,
)
from trio_cable import Config, Server
from trio_cable.broker import HistoryUnavailable
from trio_cable.broker.memory import MemoryBroker
from trio_cable.protocol import frames

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

coredis = pytest.importorskip("coredis")
from coredis.retry import NoRetryPolicy  # noqa: E402

from trio_cable.broker.redis import RedisBroker, RedisUnavailable, _Pool  # noqa: E402

EXT = "actioncable-v1-ext-json"


@pytest.fixture
def redis(tmp_path: Path) -> Any:
    proc = RedisProcess(tmp_path)
    proc.start()
    yield proc
    proc.stop()


# Short, for quick fault tests, but not so short that a busy machine trips them: the link
# is declared lost after 3 heartbeats + command_timeout (1.6 s) without a message.
BROKER_OPTIONS: dict[str, Any] = {"heartbeat": 0.2, "command_timeout": 1.0, "connect_timeout": 0.5}


def make_broker(redis: RedisProcess, **kwargs: Any) -> RedisBroker:
    return RedisBroker(redis.url, **{**BROKER_OPTIONS, **kwargs})


@pytest.fixture
def start_nodes(nursery: trio.Nursery, redis: RedisProcess) -> Callable[..., Any]:
    async def _start(count: int, **broker_kwargs: Any) -> list[Server]:
        nodes = []
        for _ in range(count):
            config = Config(port=0, secret="s3Krit", close_timeout=1.0, sessions_ttl=30)
            server = Server(config, make_app(), broker=make_broker(redis, **broker_kwargs))
            nodes.append(await nursery.start(server.serve))
        return nodes

    return _start


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


# -- across nodes -------------------------------------------------------------------------------


async def test_broadcast_on_one_node_reaches_clients_on_every_node(start_nodes):
    a, b, c = await start_nodes(3)
    ident = identifier(stream="chat")
    async with client_of(b) as on_b, client_of(c, "actioncable-v1-json") as on_c:
        await on_b.subscribe(ident)
        await on_c.subscribe(ident)
        await a.broadcast("chat", {"text": "hi"})
        got = await on_b.recv(raw=True)
        assert got["message"] == {"text": "hi"}
        assert (got["stream_id"], got["offset"]) == ("chat", 1)
        epoch = got["epoch"]
        assert await on_c.recv(raw=True) == {"identifier": ident, "message": {"text": "hi"}}
        # Offsets continue on whichever node publishes; a JSON *string* stays a string.
        await c.broadcast("chat", '{"a":1}')
        got = await on_b.recv(raw=True)
        assert (got["message"], got["epoch"], got["offset"]) == ('{"a":1}', epoch, 2)
        assert (await on_c.recv())["message"] == '{"a":1}'


async def test_session_created_on_a_resumes_on_b_with_exactly_the_missed_messages(start_nodes):
    a, b, c = await start_nodes(3)
    ident = identifier(stream="resume")
    async with client_of(a, query="user=ann") as client:
        old_sid = client.welcome["sid"]
        await client.subscribe(ident)
        await c.broadcast("resume", {"n": 1})
        assert (await client.recv())["message"] == {"n": 1}
        _, epoch, offset = client.last_position
    for n in (2, 3, 4):
        await c.broadcast("resume", {"n": n})
    async with client_of(b, query=f"sid={old_sid}") as client:
        assert client.welcome["restored"] is True and client.welcome["restored_ids"] == [ident]
        history = {"streams": {"resume": {"epoch": epoch, "offset": offset}}}
        await client.send({"command": "history", "identifier": ident, "history": history})
        got = [await client.recv(raw=True) for _ in range(4)]
        assert [m.get("message") for m in got[:3]] == [{"n": 2}, {"n": 3}, {"n": 4}]
        assert [m["offset"] for m in got[:3]] == [2, 3, 4]
        assert got[3] == {"identifier": ident, "type": "confirm_history"}
        await a.broadcast("resume", {"n": 5})
        assert (await client.recv())["message"] == {"n": 5}
        await client.perform(ident, "echo", who="me")  # identity restored without callback
        assert (await client.recv())["message"] == {"action": "echo", "who": "me"}
        await client.expect_silence(0.3)
    assert b.metrics.sessions_resumed_total == 1
    # The session restores once, on whichever node.
    async with client_of(c, query=f"sid={old_sid}") as client:
        assert "restored" not in client.welcome


async def test_resume_while_other_nodes_keep_publishing_is_exactly_once_in_order(
    start_nodes, nursery, redis
):
    """History and pub/sub race: node B's pub/sub copies arrive 0.2 s late (its pub/sub
    connection goes through a delaying proxy), so its history reads see messages it has not
    delivered yet; the read barrier keeps them from arriving twice (as history, then live).
    (The delay used to be a monkeypatch of the broker's private ``_dispatch``.)"""
    (a,) = await start_nodes(1)
    slow_link = await nursery.start(RedisProxy(redis.port, pubsub_delay=0.2).serve)
    config = Config(port=0, secret="s3Krit", close_timeout=1.0, sessions_ttl=30)
    broker = RedisBroker(slow_link.url, **BROKER_OPTIONS)
    b = await nursery.start(Server(config, make_app(), broker=broker).serve)
    ident = identifier(stream="busy")
    total = 150
    # The first connection is a raw WebSocket client, so that it can wait for the server to
    # close TCP: the server saves the session before it closes the socket, so from then on the
    # session is in Redis.  (It was a 50 ms sleep after the close handshake: a busy machine,
    # or a slow Redis, could still be saving then, and the resume found no session.)
    client, head = await RawClient.open(a.port, subprotocol=EXT)
    assert head.startswith(b"HTTP/1.1 101"), head

    async def next_message() -> dict[str, Any]:
        while True:
            frame = await client.read_frame(timeout=10)
            assert frame is not None and frame[0] == frames.OP_TEXT, frame
            message = json.loads(frame[1])
            if message.get("type") != "ping":
                return message

    old_sid = (await next_message())["sid"]
    await client.send_frame(
        frames.OP_TEXT, json.dumps({"command": "subscribe", "identifier": ident}).encode()
    )
    while (await next_message()).get("type") != "confirm_subscription":
        pass
    async with trio.open_nursery() as nursery:

        async def publisher() -> None:
            for n in range(1, total + 1):
                await b.broadcast("busy", n)
                await trio.sleep(0.002)

        nursery.start_soon(publisher)
        seen = []
        while len(seen) < 20:
            message = await next_message()
            seen.append(message["message"])
            position = (message["stream_id"], message["epoch"], message["offset"])
        await client.send_frame(frames.OP_CLOSE, (1000).to_bytes(2, "big"))
        # Frames already on their way, then the close answer, then the end of TCP.
        await client.read_until_close(timeout=10)
        assert await client.read_frame(timeout=10) is None
        async with client_of(b, query=f"sid={old_sid}") as again:
            assert again.welcome["restored"] is True
            _, epoch, offset = position
            history = {"streams": {"busy": {"epoch": epoch, "offset": offset}}}
            await again.send({"command": "history", "identifier": ident, "history": history})
            while seen[-1] != total:
                message = await again.recv()
                if message.get("type") == "confirm_history":
                    continue
                seen.append(message["message"])
            await again.expect_silence(0.3)
    assert seen == list(range(1, total + 1))


async def test_anycable_publications_and_remote_disconnect_reach_every_node(start_nodes, redis):
    a, b = await start_nodes(2)
    ident = identifier(stream="rails")
    async with client_of(a) as on_a, client_of(b, "actioncable-v1-json") as on_b:
        await on_a.subscribe(ident)
        await on_b.subscribe(ident)
        body = json.dumps({"stream": "rails", "data": json.dumps({"from": "rails"})})
        assert redis.command("PUBLISH", "__anycable__", body).startswith(b":2")
        assert (await on_a.recv(raw=True)) == {"identifier": ident, "message": {"from": "rails"}}
        assert (await on_b.recv(raw=True)) == {"identifier": ident, "message": {"from": "rails"}}
        # A list of publications; garbage is counted and ignored, the link stays up.
        redis.command("PUBLISH", "__anycable__", "{not json")
        batch = [{"stream": "rails", "data": "1"}, {"stream": "rails", "data": "2"}]
        redis.command("PUBLISH", "__anycable__", json.dumps(batch))
        assert [(await on_b.recv())["message"] for _ in range(2)] == [1, 2]
        assert a.broker.stats["anycable_invalid"] == 1
    async with client_of(b, query="user=ann") as ann, client_of(a, query="user=bob") as bob:
        command = {
            "command": "disconnect",
            "payload": {"identifier": json.dumps({"user": "ann"}), "reconnect": False},
        }
        redis.command("PUBLISH", "__anycable__", json.dumps(command))
        assert await ann.recv() == {"type": "disconnect", "reason": "remote", "reconnect": False}
        # A node's own remote_disconnect reaches the other nodes too.
        await b.remote_disconnect({"user": "bob"}, reconnect=True)
        assert await bob.recv() == {"type": "disconnect", "reason": "remote", "reconnect": True}


# -- redisx: AnyCable's Redis Streams broadcaster ----------------------------------------------

REDIS_CLI = shutil.which("redis-cli")


def xadd_as_anycable(redis: RedisProcess, publication: Any, stream: str = "__anycable__") -> None:
    """What AnyCable's documentation says a Rails app does with the redisx adapter:
    ``redis-cli XADD __anycable__ "*" payload '<publication JSON>'``."""
    body = json.dumps(publication)
    if REDIS_CLI is None:  # the same command over a raw socket
        assert redis.command("XADD", stream, "*", "payload", body).startswith(b"$")
        return
    out = subprocess.run(
        [REDIS_CLI, "-p", str(redis.port), "XADD", stream, "*", "payload", body],
        capture_output=True, text=True, timeout=10, check=True,
    )  # fmt: skip
    assert out.stdout.strip().count("-") == 1, out.stdout  # an entry id, "1709754437079-0"


def _int_reply(reply: bytes) -> int:
    assert reply.startswith(b":"), reply
    return int(reply[1:].split(b"\r\n", 1)[0])


async def test_redisx_publication_reaches_both_nodes_once_with_offsets_and_history(
    start_nodes, redis
):
    # A fresh Redis: neither the stream nor the group exists; the nodes create them.
    a, b = await start_nodes(2, broadcast_adapter="redisx", redisx_block=0.2)
    await wait_for(lambda: b"bx" in redis.command("XINFO", "GROUPS", "__anycable__"))
    ident = identifier(stream="rails")
    async with client_of(a) as on_a, client_of(b) as on_b:
        await on_a.subscribe(ident)
        await on_b.subscribe(ident)
        xadd_as_anycable(redis, {"stream": "rails", "data": json.dumps({"from": "rails"})})
        first_a, first_b = await on_a.recv(raw=True), await on_b.recv(raw=True)
        assert first_a["message"] == first_b["message"] == {"from": "rails"}
        assert (first_a["stream_id"], first_a["offset"]) == ("rails", 1)
        assert (first_b["epoch"], first_b["offset"]) == (first_a["epoch"], 1)
        # Once: the next message on each is the next publication, offset 2 (had both nodes
        # taken the entry, its second copy would be offset 2).
        xadd_as_anycable(redis, [{"stream": "rails", "data": "2"}])
        for client in (on_a, on_b):
            got = await client.recv(raw=True)
            assert (got["message"], got["offset"]) == (2, 2)
        assert a.broker.stats["redisx_entries"] + b.broker.stats["redisx_entries"] == 2
        # In the history (the data as published: clients decode it), for a client that
        # missed them; acknowledged and deleted from the publications stream.
        history = await b.broker.history_since_offset("rails", first_a["epoch"], 0)
        assert [(e.offset, e.data) for e in history] == [(1, '{"from": "rails"}'), (2, "2")]
        async with client_of(b) as late:  # and a client that asks gets them, decoded
            await late.subscribe(ident)
            since = {"streams": {"rails": {"epoch": first_a["epoch"], "offset": 0}}}
            await late.send({"command": "history", "identifier": ident, "history": since})
            got = [await late.recv(raw=True) for _ in range(3)]
            assert [(m.get("message"), m.get("offset")) for m in got[:2]] == [
                ({"from": "rails"}, 1), (2, 2)
            ]  # fmt: skip
            assert got[2] == {"identifier": ident, "type": "confirm_history"}
        await wait_for(lambda: _int_reply(redis.command("XLEN", "__anycable__")) == 0)
        assert redis.command("XPENDING", "__anycable__", "bx").startswith(b"*4\r\n:0")
        # PUBLISH __anycable__ is not read in this mode (one way in, or twice delivered).
        assert redis.command("PUBLISH", "__anycable__", "{}") == b":0\r\n"

        # The stream deleted under the nodes (and its group with it): made again, served.
        assert redis.command("DEL", "__anycable__") == b":1\r\n"
        await wait_for(lambda: b"bx" in redis.command("XINFO", "GROUPS", "__anycable__"))
        # Garbage costs its entry only (acknowledged, counted), not the reader.
        xadd_as_anycable(redis, "{not a publication")
        xadd_as_anycable(redis, {"stream": "rails", "data": "3"})
        for client in (on_a, on_b):
            got = await client.recv(raw=True)
            assert (got["message"], got["offset"]) == (3, 3)
        assert a.broker.stats["anycable_invalid"] + b.broker.stats["anycable_invalid"] == 1
        await wait_for(lambda: _int_reply(redis.command("XLEN", "__anycable__")) == 0)


async def test_redisx_entry_of_a_dead_consumer_is_claimed_and_published(start_nodes, redis):
    # A node took an entry and died before acknowledging it (here: a reader that never
    # acknowledges).  The group exists already.
    assert redis.command("XGROUP", "CREATE", "__anycable__", "bx", "$", "MKSTREAM") == b"+OK\r\n"
    xadd_as_anycable(redis, {"stream": "orphan", "data": json.dumps("rescued")})
    taken = redis.command("XREADGROUP", "GROUP", "bx", "dead", "COUNT", "1",
                          "STREAMS", "__anycable__", ">")  # fmt: skip
    assert b"rescued" in taken
    (node,) = await start_nodes(1, broadcast_adapter="redisx", redisx_claim_idle=0.5)
    await wait_for(lambda: node.broker.stats["redisx_claimed"] == 1)
    epoch, last = await node.broker.stream_position("orphan")
    assert epoch is not None and last == 1
    history = await node.broker.history_since_offset("orphan", epoch, 0)
    assert [e.data for e in history] == ['"rescued"']
    await wait_for(lambda: _int_reply(redis.command("XLEN", "__anycable__")) == 0)


def test_redisx_needs_the_redis_broker() -> None:
    from trio_cable.config import ConfigError

    with pytest.raises(ConfigError, match="redisx reads a Redis stream"):
        Config(broadcast_adapter="redisx").validate()
    with pytest.raises(ConfigError, match="unknown adapter"):
        Config(broker="redis", broadcast_adapter="kafka").validate()
    assert Config(broker="redis", broadcast_adapter="redisx").validate().redisx_group == "bx"


# -- history semantics: the same answers as the in-memory broker -----------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_history_semantics_match_the_memory_broker(kind, nursery, redis):
    if kind == "memory":
        broker: Any = MemoryBroker(history_limit=3)
    else:
        broker = make_broker(redis, history_limit=3)
    await nursery.start(broker.run)
    for n in range(10):
        await broker.publish("h", n)
    if kind == "memory":
        epoch = broker.epoch
    else:
        epoch, last = await broker.stream_position("h")
        assert last == 10
    found = await broker.history_since_offset("h", epoch, 7)
    assert [(e.offset, e.data, e.epoch) for e in found] == [
        (8, 7, epoch),
        (9, 8, epoch),
        (10, 9, epoch),
    ]
    assert await broker.history_since_offset("h", epoch, 10) == []
    for bad in [(epoch, 1), (epoch, 6), (epoch, 11), ("other", 9)]:
        with pytest.raises(HistoryUnavailable):
            await broker.history_since_offset("h", *bad)
    assert [e.offset for e in await broker.history_since_time("h", 0)] == [8, 9, 10]
    assert await broker.history_since_time("h", found[-1].time + 60) == []
    assert await broker.history_since_time("nothing-here", 0) == []
    await broker.save_session("sid1", {"a": [1, "x"]}, 5)
    assert await broker.take_session("sid1") == {"a": [1, "x"]}
    assert await broker.take_session("sid1") is None
    await broker.save_session("sid2", {"a": 1}, 0.05)
    await trio.sleep(0.15)
    assert await broker.take_session("sid2") is None


async def test_lost_history_changes_the_epoch(nursery, redis):
    broker = make_broker(redis)
    await nursery.start(broker.run)
    await broker.publish("s", "x")
    epoch, _ = await broker.stream_position("s")
    redis.command("FLUSHALL")
    with pytest.raises(HistoryUnavailable):
        await broker.history_since_offset("s", epoch, 1)
    await broker.publish("s", "y")
    new_epoch, last = await broker.stream_position("s")
    assert new_epoch != epoch and last == 1


# -- faults -------------------------------------------------------------------------------------


async def test_redis_restart_nodes_survive_reconnect_and_reject_lost_history(start_nodes, redis):
    a, b = await start_nodes(2)
    ident = identifier(stream="live")
    async with client_of(a) as on_a, client_of(b) as on_b:
        await on_a.subscribe(ident)
        await on_b.subscribe(ident)
        await a.broadcast("live", 1)
        assert (await on_b.recv())["message"] == 1
        assert (await on_a.recv())["message"] == 1
        _, old_epoch, old_offset = on_b.last_position
        redis.stop()
        await wait_for(lambda: not a.broker.connected and not b.broker.connected)
        # Still serving: local broadcasts reach local clients; new clients get in.
        await a.broadcast("live", "local only")
        assert await on_a.recv(raw=True) == {"identifier": ident, "message": "local only"}
        await on_b.expect_silence(0.2)
        async with client_of(b) as newcomer:
            await newcomer.subscribe(ident)
        redis.start()
        await wait_for(lambda: a.broker.connected and b.broker.connected)
        assert a.broker.stats["redis_disconnects"] == 1 and a.broker.stats["redis_reconnects"] == 1
        await a.broadcast("live", 2)
        got = await on_b.recv(raw=True)
        assert got["message"] == 2 and got["offset"] == 1 and got["epoch"] != old_epoch
        assert (await on_a.recv())["message"] == 2
        # The history before the restart is gone: rejected, never a silent gap.
        history = {"streams": {"live": {"epoch": old_epoch, "offset": old_offset}}}
        await on_b.send({"command": "history", "identifier": ident, "history": history})
        assert await on_b.recv() == {"identifier": ident, "type": "reject_history"}
    assert b.metrics.history_rejected_total == 1


async def test_unreachable_redis_at_start_is_a_clear_error(nursery):
    port = free_port()
    broker = RedisBroker(f"redis://:secret@127.0.0.1:{port}/0", connect_timeout=0.5)
    with pytest.raises(BaseException) as caught:
        async with trio.open_nursery() as inner:
            await inner.start(broker.run)
    errors = list(_leaves(caught.value))
    assert len(errors) == 1 and isinstance(errors[0], RedisUnavailable)
    message = str(errors[0])
    assert f"cannot connect to redis://:***@127.0.0.1:{port}/0" in message
    assert "secret" not in message


def test_cli_exits_non_zero_when_redis_is_unreachable():
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    result = subprocess.run(
        [*cli_command(), "serve", "--port=0", "--broker=redis", f"--redis-url={url}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert f"cannot connect to redis://127.0.0.1:{port}/0" in result.stderr


@pytest.mark.slow  # a stalled Redis, its timeouts and its recovery: ~2 s
async def test_stalled_redis_is_detected_and_commands_time_out(nursery, redis):
    broker = make_broker(redis)
    await nursery.start(broker.run)
    redis.pause()
    try:
        started = trio.current_time()
        # coredis' own stream timeout (TimeoutError) or the broker's bound around it
        # (TooSlowError), whichever fires first; anything else is a different failure.
        with pytest.raises((TimeoutError, trio.TooSlowError)):
            await broker.take_session("x")
        # Bounded by the timeouts (1.5 s at most here), with room for a loaded machine.
        assert trio.current_time() - started < broker.command_timeout + broker.connect_timeout + 3
        await wait_for(lambda: not broker.connected, timeout=5)  # the heartbeat noticed
    finally:
        redis.resume()
    await wait_for(lambda: broker.connected, timeout=10)
    await broker.save_session("x", {"ok": True}, 5)
    assert await broker.take_session("x") == {"ok": True}


async def test_publish_is_shielded_from_cancellation_and_not_repeated(nursery, redis):
    broker = make_broker(redis)
    await nursery.start(broker.run)
    got: list[Any] = []
    broker.bind(got.append, lambda command: None)
    broker.subscribe("s")
    with trio.CancelScope() as scope:
        scope.cancel()
        await broker.publish("s", "cancelled but shielded")
    await wait_for(lambda: len(got) == 1)
    assert got[0].offset == 1 and got[0].data == "cancelled but shielded"
    # A stall longer than the timeout: the outcome is unknown, and it is not re-sent.
    redis.pause()
    with trio.move_on_after(5):
        await broker.publish("s", "during a stall")
    redis.resume()
    await wait_for(lambda: len(got) == 2)
    await trio.sleep(0.3)
    assert [b.offset for b in got] == [1, 2]
    assert (await broker.stream_position("s"))[1] == 2
    assert broker.stats["publish_unknown"] == 1


# -- the coredis 6.9 behaviours themselves -----------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def _cancel_blocking_reads(client: Any, count: int) -> None:
    for _ in range(count):
        with trio.move_on_after(0.1):
            await client.blpop(["nothing"], timeout=0)


# The reproductions of coredis' own behaviours wait out their stalls: slow (the broker's
# workaround runs in the quick loop).
@pytest.mark.parametrize("pool_class", [pytest.param("coredis", marks=pytest.mark.slow), "broker"])
async def test_cancelled_blocking_reads_leak_pool_slots(pool_class, redis):
    """coredis 6.9: each cancelled BLPOP loses a pool slot; then every command waits
    forever (no pool timeout by default).  The broker's pool gives the slot back."""
    cls = coredis.pool.ConnectionPool if pool_class == "coredis" else _Pool
    pool = cls.from_url(redis.url, max_connections=2)
    client = coredis.Redis(connection_pool=pool, retry_policy=NoRetryPolicy())
    async with client:
        await _cancel_blocking_reads(client, 2)
        with trio.move_on_after(1) as scope:
            assert await client.ping() == b"PONG"
        assert scope.cancelled_caught is (pool_class == "coredis")


@pytest.mark.slow
async def test_coredis_default_retries_repeat_a_write_after_a_timeout(redis):
    """coredis 6.9's default retry policy re-sends after a timeout: one INCR applied 3
    times.  The broker's client never retries writes (see the publish test above)."""
    client = coredis.Redis.from_url(redis.url, stream_timeout=0.2)
    async with client:
        await client.ping()
        redis.pause()
        try:
            with pytest.raises(TimeoutError, match="INCR timed out"):
                await client.incr("counter")
        finally:
            redis.resume()
        await trio.sleep(0.2)
        assert await client.get("counter") == b"3"


@pytest.mark.slow
async def test_coredis_cancelled_write_is_still_applied_and_no_timeout_by_default(redis):
    client = coredis.Redis.from_url(redis.url)  # no timeouts at all by default
    async with client:
        await client.ping()
        redis.pause()
        try:
            with trio.move_on_after(1) as scope:
                await client.incr("counter")  # hangs as long as Redis stalls
            assert scope.cancelled_caught
        finally:
            redis.resume()
        await trio.sleep(0.2)
        assert await client.get("counter") == b"1"  # cancelled, yet applied


@pytest.mark.slow
async def test_coredis_pubsub_reconnects_silently_and_loses_messages(redis, nursery):
    """With its default retry policy the pub/sub helper resubscribes by itself and says
    nothing about what was published meanwhile: the broker does its own reconnecting and
    counts every loss (see the restart test).

    The link is cut by a proxy, not by restarting Redis: after a restart the client may be
    back before the first publication (it was, on a busy machine), and then nothing is lost
    to show.  Here a publication is made while Redis itself says nobody is subscribed."""
    proxy = await nursery.start(RedisProxy(redis.port).serve)
    client = coredis.Redis.from_url(proxy.url, stream_timeout=1, connect_timeout=1)
    got: list[bytes] = []
    async with client, client.pubsub(channels=["ch"], ignore_subscribe_messages=True) as ps:
        await client.publish("ch", "before")
        with trio.fail_after(5):
            while not got:
                message = await ps.get_message(timeout=1)
                if message:
                    got.append(message["data"])
        proxy.cut()
        with trio.fail_after(10):  # Redis has seen the subscriber's connection end
            while not redis.command("PUBSUB", "NUMSUB", "ch").endswith(b":0\r\n"):
                await trio.sleep(0.02)
        assert redis.command("PUBLISH", "ch", "lost") == b":0\r\n"  # delivered to nobody
        proxy.restore()
        published = 0
        with trio.fail_after(15):
            while not got[1:]:
                try:
                    published += 1
                    await client.publish("ch", f"m{published}")
                except (coredis.exceptions.ConnectionError, TimeoutError):
                    pass  # the command connection is reconnecting too
                message = await ps.get_message(timeout=0.1)  # never raises: silent
                if message:
                    got.append(message["data"])
    assert got[0] == b"before"
    # Back by itself, and what was published while it was away is simply not there.
    assert got[1].startswith(b"m") and b"lost" not in got
