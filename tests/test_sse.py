"""The SSE transport (GET /events) against a real server over real sockets."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.conftest import eventually, identifier, make_app
from tests.handoff import hand_over
from trio_cable import Config, Server
from trio_cable.broker.memory import MemoryBroker
from trio_cable.client import CableClosed, open_event_stream
from trio_cable.client.http import Event, EventStreamParser, HTTPResponse, open_request
from trio_cable.streams import sign_stream


class SSEClient:
    """An event-stream reader: the response head, then events as they come."""

    def __init__(self, connection: Any, head: HTTPResponse) -> None:
        self.connection = connection
        self.head = head
        self.parser = EventStreamParser()
        self.pending: list[Event] = []
        self.ended = False
        self._chunks: AsyncIterator[bytes] = connection.chunks()

    @classmethod
    async def open(
        cls, server: Server, query: str, headers: list[tuple[str, str]] | None = None
    ) -> SSEClient:
        url = f"http://127.0.0.1:{server.port}/events?{query}"
        connection = await open_request(
            url, headers=[("accept", "text/event-stream")] + (headers or [])
        )
        head = await connection.head()
        return cls(connection, head)

    async def event(self, timeout: float = 10.0) -> Event:
        with trio.fail_after(timeout):
            while not self.pending:
                try:
                    chunk = await self._chunks.__anext__()
                except StopAsyncIteration:
                    self.ended = True
                    raise EOFError("the stream ended") from None
                self.pending.extend(self.parser.feed(chunk))
        return self.pending.pop(0)

    async def until(self, kind: str, timeout: float = 10.0) -> list[Event]:
        """Events up to and including the first of *kind* (pings left out)."""
        seen: list[Event] = []
        while True:
            event = await self.event(timeout)
            if event.event == "ping":
                continue
            seen.append(event)
            if event.event == kind:
                return seen

    async def rest(self, timeout: float = 10.0) -> list[Event]:
        """Every event until the stream ends."""
        seen: list[Event] = []
        try:
            while True:
                seen.append(await self.event(timeout))
        except EOFError:
            return seen

    async def aclose(self) -> None:
        await self.connection.aclose()


def sse_config(**extra: Any) -> Config:
    return Config(port=0, secret="s3Krit", public_streams=True, close_timeout=1.0, **extra)


@pytest.fixture
async def sse_server(nursery: trio.Nursery) -> Server:
    return await nursery.start(Server(sse_config(), make_app()).serve)


def data_of(events: list[Event]) -> list[Any]:
    return [json.loads(e.data).get("message") for e in events if e.event == "message"]


async def test_public_stream_gets_welcome_confirm_and_broadcasts_with_ids(sse_server):
    client = await SSEClient.open(sse_server, "stream=chat/1")
    assert client.head.status == 200
    assert client.head.headers["content-type"].startswith("text/event-stream")
    first = await client.until("confirm_subscription")
    assert [e.event for e in first] == ["welcome", "confirm_subscription"]
    assert json.loads(first[0].data)["sid"]
    await sse_server.broadcast("chat/1", {"n": 1})
    await sse_server.broadcast("chat/1", "two\nlines")
    one, two = await client.event(), await client.event()
    epoch = json.loads(one.data)["epoch"]
    assert (one.id, two.id) == (f"1/{epoch}/chat/1", f"2/{epoch}/chat/1")
    assert data_of([one, two]) == [{"n": 1}, "two\nlines"]
    assert sse_server.metrics.sse_connections_total == 1
    assert sse_server.metrics.value("sse_connections") == 1
    await client.aclose()
    await eventually(lambda: not sse_server.connections, what="the session ends with its client")


async def test_raw_mode_sends_only_data(sse_server):
    client = await SSEClient.open(sse_server, "stream=raw&raw=1")
    await eventually(lambda: sse_server.hub.subscribers("raw"), what="subscribed")
    await sse_server.broadcast("raw", {"n": 1})
    await sse_server.broadcast("raw", "plain text")
    one, two = await client.event(), await client.event()
    assert (one.event, json.loads(one.data)) == ("message", {"n": 1})
    assert two.data == "plain text" and two.id and two.id.startswith("2/")
    await client.aclose()


async def test_signed_stream_and_application_channel(sse_server):
    signed = await SSEClient.open(
        sse_server, f"signed_stream={quote(sign_stream('s3Krit', 'room'))}"
    )
    channel = await SSEClient.open(sse_server, "channel=EchoChannel&stream=ignored&user=ann")
    ident = quote(identifier(stream="echoed"))
    by_identifier = await SSEClient.open(sse_server, f"identifier={ident}")
    await signed.until("confirm_subscription")
    transmitted = await channel.until("confirm_subscription")
    # channel= takes the other query parameters as its params (stream= is the transport's).
    assert json.loads(transmitted[1].data)["message"]["who"] == {"user": "ann"}
    await by_identifier.until("confirm_subscription")
    await sse_server.broadcast("room", 1)
    await sse_server.broadcast("echoed", 2)
    assert data_of([await signed.event()]) == [1]
    assert data_of([await by_identifier.event()]) == [2]
    for client in (signed, channel, by_identifier):
        await client.aclose()


async def test_refusals_have_statuses_eventsource_gives_up_on(sse_server):
    rejected = await SSEClient.open(sse_server, f"identifier={quote(identifier(reject=1))}")
    assert rejected.head.status == 400  # the subscription was rejected
    assert "reject_subscription" in [e.event for e in await rejected.rest()]
    unauthorized = await SSEClient.open(sse_server, "channel=EchoChannel&reject=1")
    assert unauthorized.head.status == 401
    events = await unauthorized.rest()
    assert [e.event for e in events] == ["disconnect"] and events[0].retry == 31_536_000_000
    raw = await SSEClient.open(sse_server, f"raw=1&identifier={quote(identifier(reject=1))}")
    assert raw.head.status == 400  # also in raw mode, where the rejection is no event
    nothing = await SSEClient.open(sse_server, "")
    assert nothing.head.status == 400
    bad_id = await SSEClient.open(sse_server, "stream=x", [("last-event-id", "nonsense")])
    assert bad_id.head.status == 400


async def test_last_event_id_resumes_with_history_once_and_in_order(sse_server):
    client = await SSEClient.open(sse_server, "stream=feed")
    await client.until("confirm_subscription")
    for n in range(3):
        await sse_server.broadcast("feed", n)
    got = [await client.event() for _ in range(3)]
    await client.aclose()
    last_id = got[-1].id
    assert last_id is not None
    for n in range(3, 6):  # published while the client is away
        await sse_server.broadcast("feed", n)
    again = await SSEClient.open(sse_server, "stream=feed", [("last-event-id", last_id)])
    events = await again.until("confirm_history")
    assert data_of(events) == [3, 4, 5]
    await sse_server.broadcast("feed", 6)
    assert data_of([await again.event()]) == [6]
    await again.aclose()
    stale = await SSEClient.open(sse_server, "stream=feed", [("last-event-id", "2/old/feed")])
    assert "reject_history" in [e.event for e in await stale.until("reject_history")]
    await stale.aclose()


async def test_a_client_with_no_position_yet_comes_back_with_the_confirm_time(sse_server):
    """A connection that drops before any broadcast has no stream position: its confirm
    carries the time as the event id, and coming back with it brings what was missed."""
    client = await SSEClient.open(sse_server, "stream=early")
    confirm = (await client.until("confirm_subscription"))[-1]
    assert confirm.id is not None and confirm.id.startswith("@")
    await client.aclose()
    for n in range(2):
        await sse_server.broadcast("early", n)
    again = await SSEClient.open(sse_server, "stream=early", [("last-event-id", confirm.id)])
    events = await again.until("confirm_history")
    assert data_of(events) == [0, 1]
    confirm_again = next(e for e in events if e.event == "confirm_subscription")
    assert confirm_again.id is None  # no new mark (a fresh parser): the client has a position
    await again.aclose()
    raw = await SSEClient.open(sse_server, "stream=early&raw=1")
    await eventually(lambda: sse_server.hub.subscribers("early") == 1, what="subscribed")
    await sse_server.broadcast("early", 2)
    assert (await raw.event()).data == "2"
    assert raw.parser.last_event_id.startswith("3/")  # after an id-only event with the time
    await raw.aclose()


async def test_history_since(sse_server):
    await sse_server.broadcast("old", "before")
    client = await SSEClient.open(sse_server, "stream=old&history_since=1")
    assert data_of(await client.until("confirm_history")) == ["before"]
    await client.aclose()


async def test_drain_sends_retry_from_the_advice_and_ends_the_stream(nursery):
    server = await nursery.start(
        Server(sse_config(drain_period=0, reconnect_advice=2.0), make_app()).serve
    )
    client = await SSEClient.open(server, "stream=d")
    await client.until("confirm_subscription")
    await server.drain()
    events = [e for e in await client.rest() if e.event != "ping"]
    notice = json.loads(events[-1].data)
    assert (events[-1].event, notice["reason"], notice["reconnect"]) == (
        "disconnect",
        "server_restart",
        True,
    )
    assert events[-1].retry == notice["reconnect_after"] and 0 <= events[-1].retry <= 2000
    # A new client of the draining node is told when to come back, with a 200: EventSource
    # gives up for good on any other status.
    late = await SSEClient.open(server, "stream=d")
    assert late.head.status == 200
    (refusal,) = await late.rest()
    assert refusal.event == "disconnect" and refusal.retry is not None
    assert 1000 <= refusal.retry <= 2000


async def test_sse_clients_get_no_pong_timeout_but_heartbeats(nursery):
    server = await nursery.start(
        Server(sse_config(ping_interval=0.2, pong_timeout=0.2), make_app()).serve
    )
    client = await SSEClient.open(server, "stream=quiet")
    pings = 0
    with trio.fail_after(10):
        while pings < 10:  # 2 s: five times interval + timeout
            pings += (await client.event()).event == "ping"
    assert len(server.connections) == 1
    await client.aclose()


async def test_a_client_that_does_not_read_is_dropped_too_slow(nursery):
    server = await nursery.start(Server(sse_config(max_send_queue=64 * 1024), make_app()).serve)
    client = await SSEClient.open(server, "stream=flood")
    await client.until("confirm_subscription")
    big = "x" * 32 * 1024
    with trio.fail_after(20):
        while server.metrics.too_slow_total == 0:
            await server.broadcast("flood", big)
            await trio.sleep(0)
    await eventually(lambda: not server.connections, what="the slow client is gone")
    await client.aclose()


async def test_cors_and_origin_check(nursery):
    server = await nursery.start(
        Server(sse_config(allowed_origins=["app.example"]), make_app()).serve
    )
    ok = await SSEClient.open(server, "stream=c", [("origin", "https://app.example")])
    assert ok.head.headers["access-control-allow-origin"] == "https://app.example"
    await ok.aclose()
    refused = await SSEClient.open(server, "stream=c", [("origin", "https://evil.example")])
    assert refused.head.status == 403


async def test_admission_control_answers_a_retry(nursery):
    server = await nursery.start(
        Server(sse_config(max_connections=1, reconnect_advice=1.0), make_app()).serve
    )
    first = await SSEClient.open(server, "stream=a")
    await first.until("confirm_subscription")
    second = await SSEClient.open(server, "stream=a")
    assert second.head.status == 200
    (refusal,) = await second.rest()
    assert json.loads(refusal.data)["reason"] == "server_busy" and refusal.retry is not None
    assert server.metrics.labeled["handshakes_refused_total"]["max_connections"] == 1
    await first.aclose()


# -- the Python client (open_event_stream) ---------------------------------------------------


async def test_python_event_stream_follows_a_stream_across_a_drain_and_takeover(nursery):
    broker = MemoryBroker()
    listener = socket.create_server(("127.0.0.1", 0))
    config = sse_config(drain_period=0, reconnect_advice=0.5)
    old = await nursery.start(
        Server(config, make_app(), broker=broker, listen_socket=listener).serve
    )
    port = old.port
    kinds: list[str] = []
    received: list[int] = []
    async with open_event_stream(
        f"http://127.0.0.1:{port}/events", stream="py/feed", on_event=lambda e: kinds.append(e.kind)
    ) as feed:

        async def until(n: int) -> None:
            with trio.fail_after(20):
                while len(received) < n:
                    received.append((await feed.receive()).data)

        await eventually(lambda: old.hub.subscribers("py/feed") == 1, what="subscribed")
        for n in range(1, 4):
            await old.broadcast("py/feed", n)
        await until(3)
        await hand_over(old)
        config.port = port
        new = await nursery.start(Server(config, make_app(), broker=broker).serve)
        await old.drain()
        for n in range(4, 7):
            await new.broadcast("py/feed", n)
        await until(6)
        await trio.sleep(0.2)  # a duplicate would arrive right behind
        assert feed.last_event_id.startswith("6/")
    assert received == [1, 2, 3, 4, 5, 6]
    assert kinds.count("connected") == 2 and "history_confirmed" in kinds
    assert new.metrics.history_served_total == 1


async def test_python_event_stream_stops_on_a_refusal(sse_server):
    async with open_event_stream(
        f"http://127.0.0.1:{sse_server.port}/events", channel="EchoChannel", params={"reject": "1"}
    ) as feed:
        with pytest.raises(CableClosed) as info:
            await feed.receive()
    assert info.value.reason in ("unauthorized", "refused")


async def test_sse_over_tls_with_big_messages(nursery, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    config = sse_config(tls_cert=str(cert_path), tls_key=str(key_path))
    server = await nursery.start(Server(config, make_app()).serve)
    url = f"https://127.0.0.1:{server.port}/events"
    async with open_event_stream(url, stream="tls", ssl_context=context) as feed:
        await eventually(lambda: server.hub.subscribers("tls") == 1, what="subscribed")
        big = "z" * 300_000  # several TLS records, partial writes
        for n in range(3):
            await server.broadcast("tls", {"n": n, "big": big})
        with trio.fail_after(20):
            got = [(await feed.receive()).data for _ in range(3)]
    assert [m["n"] for m in got] == [0, 1, 2] and all(m["big"] == big for m in got)


async def test_post_carries_several_subscribes_as_json_lines(sse_server):
    body = b"".join(
        json.dumps({"command": "subscribe", "identifier": identifier(stream=name)}).encode() + b"\n"
        for name in ("p1", "p2")
    )
    url = f"http://127.0.0.1:{sse_server.port}/events"
    connection = await open_request(url, "POST", [("accept", "text/event-stream")], body)
    client = SSEClient(connection, await connection.head())
    assert client.head.status == 200
    await client.until("confirm_subscription")
    await client.until("confirm_subscription")
    await sse_server.broadcast("p1", "one")
    await sse_server.broadcast("p2", "two")
    assert data_of([await client.event(), await client.event()]) == ["one", "two"]
    await client.aclose()
    empty = await open_request(url, "POST", [], b"")
    assert (await empty.head()).status == 400
    await empty.aclose()


async def test_sse_clients_see_presence_and_whispers_of_their_stream(sse_server):
    """Presence events are events of their own type; whispers are messages without an id
    (transient: nothing for Last-Event-ID to come back to)."""
    sse = await SSEClient.open(sse_server, "stream=room")
    await sse.until("confirm_subscription")
    ident = json.dumps({"channel": "$pubsub", "stream_name": "room"})
    url = f"ws://127.0.0.1:{sse_server.port}/cable"
    async with open_websocket_url(url, subprotocols=["actioncable-v1-ext-json"]) as ws:
        await ws.get_message()
        for command in (
            {"command": "subscribe", "identifier": ident},
            {"command": "join", "identifier": ident, "presence": {"id": "42", "info": "ann"}},
            {"command": "whisper", "identifier": ident, "data": {"typing": True}},
        ):
            await ws.send_message(json.dumps(command))
        joined = (await sse.until("presence"))[-1]
        assert json.loads(joined.data)["message"] == {"type": "join", "info": "ann", "id": "42"}
        whisper = await sse.event()
        while whisper.event == "ping":
            whisper = await sse.event()
        assert json.loads(whisper.data)["message"] == {"typing": True}
        assert whisper.id is not None and whisper.id.startswith("@")  # unchanged: no position
    await sse.aclose()
