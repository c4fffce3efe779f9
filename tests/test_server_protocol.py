"""PROTOCOL.md over real sockets: handshake, server -> client, client -> server (JSON, msgpack)."""

from __future__ import annotations

import json
import time

import pytest
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from tests.conftest import (
    ALL_PROTOCOLS,
    RawClient,
    eventually,
    identifier,
    make_app,
)
from trio_cable import Server
from trio_cable.protocol import frames

# -- Handshake --------------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_each_subprotocol_is_selected_and_welcomed(connect, subprotocol):
    async with connect(subprotocol) as client:
        welcome = client.welcome
        assert set(welcome) == {"type", "sid"}
        # >= 96 random bits: token_urlsafe(16) is 22 characters of base64.
        assert isinstance(welcome["sid"], str) and len(welcome["sid"]) >= 16


async def test_sids_are_unique(connect):
    sids = set()
    for _ in range(20):
        async with connect() as client:
            sids.add(client.welcome["sid"])
    assert len(sids) == 20


async def test_client_preference_order_wins(server: Server):
    url = f"ws://127.0.0.1:{server.port}/cable"
    offered = ["bogus", "actioncable-v1-ext-msgpack", "actioncable-v1-json"]
    async with open_websocket_url(url, subprotocols=offered) as ws:
        assert ws.subprotocol == "actioncable-v1-ext-msgpack"


async def test_token_subprotocol_is_never_selected(server: Server):
    url = f"ws://127.0.0.1:{server.port}/cable"
    offered = ["anycable-token.abc", "actioncable-v1-json"]
    async with open_websocket_url(url, subprotocols=offered) as ws:
        assert ws.subprotocol == "actioncable-v1-json"


async def test_unknown_subprotocol_is_refused_with_http_error(server: Server):
    client, head = await RawClient.open(server.port, subprotocol="graphql-ws")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert b"no supported subprotocol" in client.buffer + await _rest(client)


async def test_no_subprotocol_is_refused(server: Server):
    _client, head = await RawClient.open(server.port, subprotocol=None)
    assert head.startswith(b"HTTP/1.1 400"), head


async def test_actioncable_unsupported_is_selected_when_offered(server: Server):
    _client, head = await RawClient.open(
        server.port, subprotocol="graphql-ws, actioncable-unsupported"
    )
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"sec-websocket-protocol: actioncable-unsupported" in head.lower()


async def _rest(client: RawClient) -> bytes:
    data = b""
    with trio.move_on_after(2):
        while chunk := await client.stream.receive_some(4096):
            data += chunk
    return data


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ("", b"101"),
        ("Origin: https://evil.example\r\n", b"403"),
        ("Origin: https://app.example.com\r\n", b"101"),
        ("Origin: https://sub.trusted.org\r\n", b"101"),
        ("Origin: https://trusted.org.evil\r\n", b"403"),
    ],
)
async def test_origin_allow_list(nursery, config, headers, status):
    config.allowed_origins = ["app.example.com", "*.trusted.org"]
    srv = await nursery.start(Server(config).serve)
    headers = headers or "Origin: https://app.example.com\r\n"
    _, head = await RawClient.open(srv.port, extra_headers=headers)
    assert head.split(b" ")[1] == status, head


async def test_missing_origin_is_refused_when_an_allow_list_is_set(nursery, config):
    config.allowed_origins = ["app.example.com"]
    srv = await nursery.start(Server(config).serve)
    _, head = await RawClient.open(srv.port)
    assert head.startswith(b"HTTP/1.1 403"), head


@pytest.mark.parametrize(
    ("request_text", "status"),
    [
        (b"GET /cable HTTP/1.1\r\nHost: x\r\n\r\n", b"426"),
        (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
        (
            b"GET /nope HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            b"404",
        ),
        (
            b"GET /cable HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Protocol: actioncable-v1-json\r\n\r\n",
            b"426",
        ),
        (
            b"GET /cable HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n"
            b"Sec-WebSocket-Protocol: actioncable-v1-json\r\n\r\n",
            b"400",
        ),
        (
            b"POST /cable HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Content-Length: 0\r\n\r\n",
            b"405",
        ),
        (b"this is not http\r\n\r\n", b"400"),
        (b"GET /" + b"a" * 20000, b"431"),  # a head that never ends
    ],
)
async def test_http_errors_are_clear_and_harmless(server: Server, connect, request_text, status):
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(request_text)
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    assert data.split(b" ")[1] == status, data[:200]
    # The server goes on serving.
    async with connect() as client:
        await client.subscribe(identifier())


async def test_slow_handshake_times_out(nursery, config):
    config.handshake_timeout = 0.3
    srv = await nursery.start(Server(config).serve)
    stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
    await stream.send_all(b"GET /cable HTTP/1.1\r\n")
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408")


async def test_health(server: Server):
    status, body = await _http(server, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    doc = json.loads(body)
    assert doc["status"] == "ok" and doc["connections"] == 0


async def test_metrics_endpoint(server: Server, connect):
    async with connect() as client:
        await client.subscribe(identifier())
        status, body = await _http(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    text = body.decode()
    assert "trio_cable_connections 1.0" in text
    assert "trio_cable_subscriptions_total 1.0" in text


async def test_metrics_samples_are_recent_raw_lags(server: Server):
    """``/metrics/samples`` has the lag monitor's raw samples, cut by ``?since=``."""

    async def samples(since: float = 0.0) -> dict:
        request = f"GET /metrics/samples?since={since!r} HTTP/1.1\r\nHost: x\r\n\r\n"
        status, body = await _http(server, request.encode())
        assert status == 200
        return json.loads(body)

    start = time.monotonic()
    await trio.sleep(0.3)  # the probe samples every 50 ms
    doc = await samples()
    lags = doc["loop_lag_seconds"]
    assert len(lags) >= 2 and isinstance(doc["gc_full_pause_seconds"], list)
    assert all(0 <= lag < 5 for _t, lag in lags)
    assert sum(t >= start for t, _lag in lags) >= 2
    later = await samples(since=lags[-1][0])
    assert later["loop_lag_seconds"][0] == lags[-1]
    assert all(t >= lags[-1][0] for t, _lag in later["loop_lag_seconds"])


async def _http(server: Server, request: bytes) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(request)
    data = b""
    with trio.fail_after(5):
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


# -- Server -> client ------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_ping_is_sent_with_unix_seconds(connect, subprotocol):
    before = time.time()
    async with connect(subprotocol, query="pi=1") as client:
        ping = await client.recv(pings=True, timeout=10)
        assert ping["type"] == "ping"
        # Whole unix seconds (the server's int(time.time()) when it sent the ping): an int,
        # not a float, not a bool, and not trio's clock (which starts at a random offset).
        assert type(ping["message"]) is int, ping
        assert int(before) <= ping["message"] <= time.time(), (before, ping)


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_transmissions_come_before_confirm(connect, subprotocol):
    async with connect(subprotocol, query="user=ann") as client:
        ident = identifier(stream="room1")
        got = await client.subscribe(ident)
        assert got == [
            {"identifier": ident, "message": {"welcome_to": "room1", "who": {"user": "ann"}}},
            {"identifier": ident, "type": "confirm_subscription"},
        ]


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_reject_subscription(connect, subprotocol):
    async with connect(subprotocol) as client:
        ident = identifier(reject=True)
        got = await client.subscribe(ident, expect="reject_subscription")
        assert got[0] == {"identifier": ident, "message": {"before": "reject"}}
        # A rejected identifier can be subscribed again later (it is not remembered).
        await client.subscribe(ident, expect="reject_subscription")


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_identifier_is_echoed_byte_for_byte(connect, subprotocol):
    async with connect(subprotocol) as client:
        # Odd key order and spacing: a re-serialized identifier would differ.
        ident = '{ "stream":"x",  "channel" : "EchoChannel"}'
        got = await client.subscribe(ident)
        assert all(m["identifier"] == ident for m in got)


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_unknown_channel_is_rejected(connect, subprotocol):
    async with connect(subprotocol) as client:
        ident = identifier("NoSuchChannel")
        await client.subscribe(ident, expect="reject_subscription")


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_failing_subscribed_callback_rejects_only_that_subscription(connect, subprotocol):
    async with connect(subprotocol) as client:
        await client.subscribe(identifier(explode=True), expect="reject_subscription")
        await client.subscribe(identifier())


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_broadcast_reaches_subscribers(server: Server, connect, subprotocol):
    async with connect(subprotocol) as a, connect("actioncable-v1-json") as b:
        ident_a = identifier(stream="news")
        ident_b = '{"channel":"EchoChannel","stream":"news"}'
        await a.subscribe(ident_a)
        await b.subscribe(ident_b)
        await server.broadcast("news", {"headline": "hi", "n": [1, 2.5, None, True]})
        assert await a.recv() == {
            "identifier": ident_a,
            "message": {"headline": "hi", "n": [1, 2.5, None, True]},
        }
        assert await b.recv() == {
            "identifier": ident_b,
            "message": {"headline": "hi", "n": [1, 2.5, None, True]},
        }
        await server.broadcast("other", {"x": 1})
        await a.expect_nothing_before_echo(ident_a)


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_broadcast_of_a_string_arrives_as_a_string(server: Server, connect, subprotocol):
    async with connect(subprotocol) as client:
        ident = identifier(stream="s")
        await client.subscribe(ident)
        await server.broadcast("s", '{"a":1}')
        assert await client.recv() == {"identifier": ident, "message": '{"a":1}'}


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_unauthorized_connection_gets_disconnect_with_reconnect_false(connect, subprotocol):
    async with connect(subprotocol, query="reject=1", expect_welcome=False) as client:
        message = await client.recv()
        assert message == {"type": "disconnect", "reason": "unauthorized", "reconnect": False}
        with pytest.raises(ConnectionClosed) as info:
            await client.recv()
        assert info.value.reason.code == 1000


# -- Client -> server ------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_message_dispatches_on_action(connect, subprotocol):
    async with connect(subprotocol) as client:
        ident = identifier()
        await client.subscribe(ident)
        await client.perform(ident, "echo", text="hello", n=1)
        assert await client.recv() == {
            "identifier": ident,
            "message": {"action": "echo", "text": "hello", "n": 1},
        }
        # No action: "receive" gets the whole object.
        await client.send({"command": "message", "identifier": ident, "data": json.dumps({"x": 2})})
        assert await client.recv() == {"identifier": ident, "message": {"received": {"x": 2}}}


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_action_that_raises_or_does_not_exist_leaves_connection_working(connect, subprotocol):
    async with connect(subprotocol) as client:
        ident = identifier()
        await client.subscribe(ident)
        await client.perform(ident, "explode")
        await client.perform(ident, "no_such_action")
        await client.perform(ident, "_private")
        await client.perform(ident, "transmit", message="x")  # base-class methods are not actions
        # None of them answered (an answer would come before the echo's), and it still works.
        await client.expect_nothing_before_echo(ident)


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_duplicate_subscribe_is_ignored(connect, subprotocol):
    async with connect(subprotocol) as client:
        ident = identifier()
        await client.subscribe(ident)
        await client.send({"command": "subscribe", "identifier": ident})
        await client.expect_nothing_before_echo(ident)  # no second transmit, no second confirm


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_unsubscribe_stops_broadcasts_and_calls_unsubscribed(
    server, connect, unsubscribed, subprotocol
):
    async with connect(subprotocol) as client:
        # The record starts empty in every test, and each parametrization has its own
        # identifier: a call recorded by another test or protocol cannot satisfy this one.
        ident = identifier(stream="u", protocol=subprotocol)
        await client.subscribe(ident)
        assert unsubscribed == []
        await client.send({"command": "unsubscribe", "identifier": ident})
        # Called on the unsubscribe command itself, while the client is still connected.
        await eventually(lambda: unsubscribed == [ident] and not server.hub.subscribers("u"))
        await client.perform(ident, "echo")  # unknown now: ignored
        await client.send({"command": "unsubscribe", "identifier": ident})  # unknown: ignored
        await server.broadcast("u", 1)
        # Commands are answered in order, and the broadcast was written before the next
        # subscribe was even sent: an echo reply or a broadcast that leaked through would
        # arrive before the new subscription's answers.  (No silence window to time.)
        got = await client.subscribe(ident)
        assert got == [
            {"identifier": ident, "message": {"welcome_to": "u", "who": {}}},
            {"identifier": ident, "type": "confirm_subscription"},
        ]
        assert unsubscribed == [ident]  # the second, unknown unsubscribe called nothing


async def test_disconnect_calls_unsubscribed(server, connect, unsubscribed):
    ident = identifier(stream="gone")
    async with connect() as client:
        await client.subscribe(ident)
    await eventually(lambda: unsubscribed == [ident] and not server.connections)
    assert server.hub.subscribers("gone") == 0


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_commands_are_handled_in_arrival_order(connect, subprotocol):
    async with connect(subprotocol) as client:
        a, b = identifier(stream="a"), identifier(stream="b")
        await client.send({"command": "subscribe", "identifier": a})
        await client.perform(a, "echo", seq=1)
        await client.send({"command": "subscribe", "identifier": b})
        await client.perform(b, "echo", seq=2)
        got = [await client.recv() for _ in range(6)]
        assert [(m["identifier"], m.get("type") or m["message"]) for m in got] == [
            (a, {"welcome_to": "a", "who": {}}),
            (a, "confirm_subscription"),
            (a, {"action": "echo", "seq": 1}),
            (b, {"welcome_to": "b", "who": {}}),
            (b, "confirm_subscription"),
            (b, {"action": "echo", "seq": 2}),
        ]


@pytest.mark.parametrize("subprotocol", ["actioncable-v1-ext-json", "actioncable-v1-ext-msgpack"])
async def test_ext_ping_command_gets_pong(connect, subprotocol):
    async with connect(subprotocol) as client:
        await client.send({"command": "ping"})
        assert await client.recv() == {"type": "pong"}


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_non_string_data_is_an_error_for_that_command_only(connect, subprotocol):
    async with connect(subprotocol) as client:
        ident = identifier()
        await client.subscribe(ident)
        await client.send({"command": "message", "identifier": ident, "data": {"action": "echo"}})
        await client.send({"command": "message", "identifier": ident, "data": "not json"})
        await client.send({"command": "message", "identifier": ident, "data": "[1,2]"})
        await client.expect_nothing_before_echo(ident)  # no answer to them, and still served


BAD_COMMANDS = [
    pytest.param(b"{not json", id="bad-json"),
    pytest.param(b"[1,2,3]", id="not-an-object"),
    pytest.param(b'"a string"', id="a-string"),
    pytest.param(b'{"identifier":"x"}', id="missing-command"),
    pytest.param(b'{"command":"launch_missiles"}', id="unknown-command"),
    pytest.param(b'{"command":"subscribe"}', id="missing-identifier"),
    pytest.param(b'{"command":"subscribe","identifier":42}', id="identifier-not-string"),
    pytest.param(
        b'{"command":"subscribe","identifier":"' + b"x" * 10000 + b'"}', id="huge-identifier"
    ),
    pytest.param(b'{"command":"ping","x":' + b"[" * 5000 + b"]" * 5000 + b"}", id="deep-nesting"),
]


@pytest.mark.parametrize("payload", BAD_COMMANDS)
async def test_malformed_json_command_disconnects_that_client_only(connect, payload):
    async with connect() as bystander:
        ident = identifier(stream="calm")
        await bystander.subscribe(ident)
        async with connect() as client:
            await client.ws.send_message(payload.decode())
            message = await client.recv()
            assert message == {
                "type": "disconnect",
                "reason": "invalid_request",
                "reconnect": False,
            }
            with pytest.raises(ConnectionClosed):
                await client.recv()
        await bystander.perform(ident, "echo", fine=True)
        assert (await bystander.recv())["message"] == {"action": "echo", "fine": True}


@pytest.mark.parametrize(
    "payload", [b"\xc1", b"\x93\x01\x02\x03", b"\xa5hello", b"\x81\xa7command\xa4nope"]
)
async def test_malformed_msgpack_command_disconnects_that_client_only(connect, payload):
    async with connect("actioncable-v1-msgpack") as client:
        await client.ws.send_message(payload)
        message = await client.recv()
        assert message == {"type": "disconnect", "reason": "invalid_request", "reconnect": False}


async def test_subscribe_with_identifier_that_is_not_json_is_rejected(connect):
    async with connect() as client:
        await client.subscribe("not json at all", expect="reject_subscription")
        await client.subscribe('{"no_channel":1}', expect="reject_subscription")
        await client.subscribe("[1]", expect="reject_subscription")


# -- Framing on the cable endpoint -----------------------------------------------------------


async def test_websocket_ping_gets_pong(server: Server):
    client, head = await RawClient.open(server.port)
    assert head.startswith(b"HTTP/1.1 101")
    opcode, _ = await client.read_frame()  # welcome
    assert opcode == frames.OP_TEXT
    await client.send_frame(frames.OP_PING, b"are you there")
    assert await client.read_frame() == (frames.OP_PONG, b"are you there")


@pytest.mark.parametrize(
    ("frame_kwargs", "code"),
    [
        (dict(opcode=frames.OP_TEXT, payload=b"{}", mask=None), 1002),
        (dict(opcode=frames.OP_TEXT, payload=b"{}", rsv=4), 1002),
        (dict(opcode=3, payload=b""), 1002),
        (dict(opcode=frames.OP_TEXT, payload=b'{"command":"\xff"}'), 1007),
        (dict(opcode=frames.OP_BINARY, payload=b"x" * 70000), 1009),
    ],
)
async def test_bad_frames_close_with_the_right_code(server: Server, connect, frame_kwargs, code):
    client, _ = await RawClient.open(server.port)
    await client.read_frame()  # welcome
    await client.send_frame(**frame_kwargs)
    _frames, close_code = await client.read_until_close()
    assert close_code == code
    async with connect() as other:
        await other.subscribe(identifier())


async def test_client_close_is_answered_with_the_same_code(server: Server):
    client, _ = await RawClient.open(server.port)
    await client.read_frame()  # welcome
    await client.send_frame(frames.OP_CLOSE, (4000).to_bytes(2, "big") + b"bye")
    _frames, code = await client.read_until_close()
    assert code == 4000
    assert await client.read_frame() is None  # and the server closes TCP


async def test_upgrade_refused_through_trio_websocket(server: Server):
    with pytest.raises(ConnectionRejected):
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/cable", subprotocols=["nope"]):
            pass


async def test_many_clients_and_broadcast(server: Server, connect):
    """Fifty clients on two codecs receive every broadcast, in order."""
    async with trio.open_nursery() as nursery:
        results: list[list[int]] = []

        async def one(i: int, ready: trio.Event, go: trio.Event) -> None:
            proto = ALL_PROTOCOLS[i % 4]
            async with connect(proto) as c:
                await c.subscribe(identifier(stream="many"))
                ready.set()
                got = [(await c.recv())["message"]["n"] for _ in range(20)]
                results.append(got)

        events = []
        for i in range(50):
            ready = trio.Event()
            events.append(ready)
            nursery.start_soon(one, i, ready, None)
        for e in events:
            await e.wait()
        for n in range(20):
            await server.broadcast("many", {"n": n})
    assert len(results) == 50
    assert all(r == list(range(20)) for r in results)


async def test_broadcasts_of_one_tick_share_a_send_and_keep_their_order(server: Server, connect):
    """Broadcasts fanned out in one scheduler tick are coalesced: every client still gets each
    exactly once, each publisher's messages in order, and fewer sends than frames."""
    clients_n, publishers, per_publisher = 20, 5, 6
    async with trio.open_nursery() as nursery:
        results: list[list[tuple[int, int]]] = []
        ready_all = [trio.Event() for _ in range(clients_n)]

        async def one(i: int) -> None:
            async with connect(ALL_PROTOCOLS[i % 4]) as c:
                await c.subscribe(identifier(stream="tick"))
                ready_all[i].set()
                total = publishers * per_publisher
                got = [(await c.recv())["message"] for _ in range(total)]
                results.append([(m["p"], m["n"]) for m in got])

        for i in range(clients_n):
            nursery.start_soon(one, i)
        for e in ready_all:
            await e.wait()
        before = server.metrics.coalesced_frames_total

        async def publisher(p: int) -> None:
            for n in range(per_publisher):
                await server.broadcast("tick", {"p": p, "n": n})

        async with trio.open_nursery() as pubs:
            for p in range(publishers):
                pubs.start_soon(publisher, p)
    assert len(results) == clients_n
    for got in results:
        assert sorted(got) == [(p, n) for p in range(publishers) for n in range(per_publisher)]
        for p in range(publishers):
            assert [n for q, n in got if q == p] == list(range(per_publisher))
    # Five publishers wake in the same tick: at least one frame per client rode along.
    assert server.metrics.coalesced_frames_total - before >= clients_n


async def test_a_senders_reply_follows_its_coalesced_broadcast(server: Server, connect):
    """BenchmarkChannel's broadcast action broadcasts, then transmits broadcastResult; when
    several senders act in one tick the broadcasts are corked, and each sender must still see
    its own broadcast before its result (a corked connection's writes keep their order)."""
    ident = identifier("BenchmarkChannel")
    senders = 8
    async with trio.open_nursery() as nursery:
        orders: list[list[str]] = []
        ready = [trio.Event() for _ in range(senders)]
        go = trio.Event()

        async def one(i: int) -> None:
            async with connect() as c:
                await c.subscribe(ident)
                ready[i].set()
                await go.wait()
                await c.perform(ident, "broadcast", mine=i)
                seen: list[str] = []
                while "result" not in seen:
                    msg = (await c.recv())["message"]
                    if msg.get("mine") == i:
                        seen.append("result" if msg.get("action") == "broadcastResult" else "own")
                orders.append(seen)

        for i in range(senders):
            nursery.start_soon(one, i)
        for e in ready:
            await e.wait()
        before = server.metrics.coalesced_frames_total
        go.set()
    assert orders == [["own", "result"]] * senders
    assert server.metrics.coalesced_frames_total > before


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_extended_clients_get_a_ping_right_after_the_welcome(
    nursery, config, connect, subprotocol
):
    """The server's clock reaches an extended client at once (its ``since`` for history);
    plain Action Cable clients see exactly what Rails sends: nothing until the ticker."""
    config.ping_interval = 30.0
    server = await nursery.start(Server(config, make_app()).serve)
    async with connect(subprotocol, to=server) as client:
        if "ext" in subprotocol:
            # "At once" means before the ticker's first ping, 30 s away: a deadline of 10 s
            # tells the two apart on a loaded machine too.
            with trio.fail_after(10):
                ping = await client.recv(pings=True)
            assert ping["type"] == "ping" and abs(ping["message"] - time.time()) < 5
        else:
            # A ping sent right after the welcome would be on the wire before the answer to
            # a command sent after the welcome arrived: the answer must come first.
            ident = identifier()
            await client.send({"command": "subscribe", "identifier": ident})
            message = await client.recv(pings=True)
            assert message == {"identifier": ident, "message": {"welcome_to": "echo", "who": {}}}
