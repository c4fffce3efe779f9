"""The client against the real server, over real sockets."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import trio

from tests.client_support import (
    SECRET,
    GateChannel,
    LoopLag,
    RestartableServer,
    SlowChannel,
    TapProxy,
    client_app,
    client_config,
)
from tests.conftest import eventually
from trio_cable import Server
from trio_cable.client import (
    Backoff,
    CableClosed,
    CableEvent,
    MessagesDropped,
    SubscribeTimeout,
    SubscriptionRejected,
    open_cable,
)
from trio_cable.streams import sign_stream

ALL_PROTOCOLS = [
    "actioncable-v1-json",
    "actioncable-v1-ext-json",
    "actioncable-v1-msgpack",
    "actioncable-v1-ext-msgpack",
]
FAST = Backoff("full_jitter", base=0.05, cap=0.2)


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[Server]:
    srv: Server = await nursery.start(Server(client_config(), client_app()).serve)
    yield srv


@pytest.fixture
async def proxy(nursery: trio.Nursery, server: Server) -> TapProxy:
    return await nursery.start(TapProxy(server.port).serve)


class Recorder:
    """Collects a cable's events."""

    def __init__(self) -> None:
        self.events: list[CableEvent] = []

    def __call__(self, event: CableEvent) -> None:
        self.events.append(event)

    def of(self, kind: str) -> list[CableEvent]:
        return [e for e in self.events if e.kind == kind]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 10.0) -> None:
        with trio.fail_after(timeout):
            while len(self.of(kind)) < count:
                await trio.sleep(0.01)


# -- the basics, every subprotocol ---------------------------------------------------------------


@pytest.mark.parametrize("subprotocol", ALL_PROTOCOLS)
async def test_subscribe_perform_broadcast(server: Server, subprotocol: str) -> None:
    with trio.fail_after(10):
        async with open_cable(server.url + "?user=ann", subprotocol=subprotocol) as cable:
            assert cable.connected and cable.sid
            echo = await cable.subscribe("EchoChannel", {"stream": "room"})
            assert echo.status == "confirmed"
            # Transmitted during subscribed(): arrives before the confirmation, kept.
            first = await echo.receive()
            assert first.data == {"welcome_to": "room", "who": {"user": "ann"}}
            await echo.perform("echo", {"text": "héllo", "n": [1, 2]})
            assert (await echo.receive()).data == {"text": "héllo", "n": [1, 2], "action": "echo"}
            await server.broadcast("room", {"b": 1})
            await server.broadcast("room", '{"a":1}')  # a JSON *string* stays a string
            assert (await echo.receive()).data == {"b": 1}
            assert (await echo.receive()).data == '{"a":1}'

            signed = await cable.subscribe(
                "$pubsub", {"signed_stream_name": sign_stream(SECRET, "news/1")}
            )
            await server.broadcast("news/1", {"headline": "x"})
            assert (await signed.receive()).data == {"headline": "x"}

            await echo.unsubscribe()
            assert [m async for m in echo] == []  # iteration ends after unsubscribe
            await server.broadcast("news/1", 2)
            assert (await signed.receive()).data == 2


async def test_rejections(server: Server) -> None:
    async with open_cable(server.url, subprotocol="actioncable-v1-json") as cable:
        with pytest.raises(SubscriptionRejected):
            await cable.subscribe("EchoChannel", {"reject": True})
        with pytest.raises(SubscriptionRejected):
            await cable.subscribe("NoSuchChannel")
        with pytest.raises(SubscriptionRejected):
            await cable.subscribe("$pubsub", {"signed_stream_name": "forged--00"})
        # The rejected identifier can be tried again; a live one cannot be doubled.
        ok = await cable.subscribe("PlainChannel")
        with pytest.raises(ValueError, match="already subscribed"):
            await cable.subscribe("PlainChannel")
        await ok.unsubscribe()
        await cable.subscribe("PlainChannel")


async def test_unauthorized_stops_with_clear_error(server: Server) -> None:
    events = Recorder()
    with pytest.raises(CableClosed) as info:
        async with open_cable(server.url + "?reject=1", backoff=FAST, on_event=events):
            raise AssertionError("must not connect")
    assert info.value.reason == "unauthorized"
    assert len(events.of("connecting")) == 1  # reconnect:false means no retry


async def test_refused_path_is_not_retried(server: Server) -> None:
    events = Recorder()
    with pytest.raises(CableClosed) as info:
        async with open_cable(f"ws://127.0.0.1:{server.port}/nope", backoff=FAST, on_event=events):
            pass
    assert info.value.reason == "refused" and info.value.status == 404
    assert len(events.of("connecting")) == 1


async def test_server_disconnect_with_reconnect_false_raises_in_subscriptions(
    server: Server,
) -> None:
    async with open_cable(server.url, backoff=FAST) as cable:
        sub = await cable.subscribe("PlainChannel")
        await sub.perform("kick", {"reason": "remote", "reconnect": False})
        with trio.fail_after(5), pytest.raises(CableClosed) as info:
            async for _ in sub:
                pass
        assert info.value.reason == "remote"
        assert cable.closed and (await cable.wait_closed()).reason == "remote"
        with pytest.raises(CableClosed):
            await cable.subscribe("PlainChannel", {"x": 1})


async def test_leaving_a_cable_completes_the_close_handshake(server: Server) -> None:
    # It used to wait out close_timeout: trio-websocket's aclose() woke the cable's read loop,
    # which cancelled the reader task before it could read the server's answer.
    async with open_cable(server.url, close_timeout=2.0) as cable:
        await cable.subscribe("PlainChannel")
        start = trio.current_time()
    # The server answers a close frame at once (test_client_close_is_answered_with_the_same_code):
    # milliseconds when the handshake completes, 2 s when it never does.
    assert trio.current_time() - start < 1.0


# -- reconnecting --------------------------------------------------------------------------------


async def test_reconnect_after_advice_sets_the_delay(server: Server) -> None:
    events = Recorder()
    async with open_cable(server.url, backoff=FAST, on_event=events) as cable:
        sub = await cable.subscribe("PlainChannel", {"stream": "k"})
        first_sid = cable.sid
        await sub.perform("kick", {"reason": "server_restart", "reconnect_after": 1500})
        await events.wait_for("connected", 2)
        (scheduled,) = events.of("reconnect_scheduled")
        # Advice (1.5 s) beats the strategy's cap (0.2 s), jittered upwards by <= 50%.
        assert 1.5 <= scheduled.delay <= 2.25  # type: ignore[operator]
        (gone,) = events.of("disconnected")
        assert gone.reason == "server_restart" and gone.delay == 1.5
        assert cable.sid != first_sid
        # Re-subscribed on the new connection: broadcasts flow again.
        await events.wait_for("subscribed", 2)
        await server.broadcast("k", "again")
        with trio.fail_after(5):
            assert (await sub.receive()).data == "again"


async def test_resubscribes_everything_after_a_server_restart(nursery: trio.Nursery) -> None:
    rs = RestartableServer(nursery)
    await rs.start()
    events = Recorder()
    async with open_cable(
        rs.url, subprotocol="actioncable-v1-msgpack", backoff=FAST, on_event=events
    ) as cable:
        subs = [await cable.subscribe("PlainChannel", {"stream": f"s{i}"}) for i in range(5)]
        await rs.stop()
        await rs.start()
        await events.wait_for("subscribed", 10)
        assert rs.server is not None
        for i in range(len(subs)):
            await rs.server.broadcast(f"s{i}", i)
        with trio.fail_after(5):
            assert [(await sub.receive()).data for sub in subs] == list(range(5))
        assert [e.kind for e in events.events].count("connected") == 2


async def test_performs_wait_for_the_reconnection(nursery: trio.Nursery) -> None:
    rs = RestartableServer(nursery)
    await rs.start()
    async with open_cable(rs.url, backoff=FAST) as cable:
        sub = await cable.subscribe("PlainChannel")
        await rs.stop()
        async with trio.open_nursery() as inner:
            inner.start_soon(sub.perform, "echo", {"n": 1})
            await trio.sleep(0.3)
            await rs.start()
        with trio.fail_after(5):
            assert (await sub.receive()).data == {"n": 1, "action": "echo"}


async def test_refused_handshakes_count_as_attempts(server: Server, proxy: TapProxy) -> None:
    events = Recorder()
    # Give up after 3 consecutive failed attempts: every one of them a 503.
    proxy.refuse = 3
    proxy.retry_after = "0.2"
    with pytest.raises(CableClosed) as info:
        async with open_cable(
            proxy.url,
            backoff=Backoff("full_jitter", base=0.01, cap=0.02, max_attempts=3),
            on_event=events,
        ):
            pass
    assert info.value.reason == "max_attempts"
    assert len(proxy.refused_at) == 3
    assert [e.attempt for e in events.of("connecting")] == [1, 2, 3]
    assert [e.status for e in events.of("connect_failed")] == [503, 503, 503]
    # Retry-After (0.2 s) set the delays, not the strategy (<= 0.02 s), jittered upwards.
    delays = [e.delay for e in events.of("reconnect_scheduled")]
    assert len(delays) == 2 and all(0.2 <= d <= 0.3 for d in delays)  # type: ignore[operator]
    gaps = [b - a for a, b in zip(proxy.refused_at, proxy.refused_at[1:], strict=False)]
    assert all(g >= 0.19 for g in gaps)

    # Two refusals, then the server lets it in: connected on the third attempt.
    events2 = Recorder()
    proxy.refuse = 2
    async with open_cable(
        proxy.url,
        backoff=Backoff("full_jitter", base=0.01, cap=0.02, max_attempts=3),
        on_event=events2,
    ) as cable:
        assert cable.connected
    assert [e.attempt for e in events2.of("connecting")] == [1, 2, 3]


@pytest.mark.slow  # 1.2 s alive, 2 s to notice, then the reconnection: ~4 s
async def test_stale_connection_is_replaced(server: Server, proxy: TapProxy) -> None:
    events = Recorder()
    lag = LoopLag()
    async with trio.open_nursery() as probe:
        probe.start_soon(lag.run)
        async with open_cable(
            proxy.url, ping_interval=1, stale_pings=2, backoff=FAST, on_event=events
        ) as cable:
            sub = await cable.subscribe("PlainChannel", {"stream": "st"})
            await trio.sleep(1.2)
            assert not events.of("stale")  # pings keep it alive
            tap = proxy.taps[-1]  # (a reconnect after the stale verdict opens another)
            proxy.freeze()
            await events.wait_for("stale", timeout=15)
            (stale,) = events.of("stale")
            assert stale.delay == 2.0  # 2 intervals without a message ...
            # ... counted from the last message the proxy let through (the client read it
            # after that).  Never earlier; later only by the loop's own lateness.
            last = tap.server[-1][0]
            assert stale.time - last >= 2.0
            assert stale.time - last <= 2.0 + lag.worst(last, stale.time) + 0.25
            proxy.frozen = False
            await events.wait_for("subscribed", 2)
            await server.broadcast("st", "fresh")
            with trio.fail_after(5):
                assert (await sub.receive()).data == "fresh"
            assert cable.connected
        lag.stop()


# -- subscriptions -------------------------------------------------------------------------------


@pytest.mark.parametrize("linearized", [True, False])
async def test_linearized_never_two_subscribes_in_flight(
    server: Server, proxy: TapProxy, linearized: bool
) -> None:
    async with open_cable(proxy.url, linearized=linearized) as cable:
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(cable.subscribe, "SlowChannel", {"delay": 0.05, "i": i})
        assert len(cable.subscriptions) == 8
    # Measured on the wire, between the client and the server.
    if linearized:
        assert proxy.max_in_flight == 1
    else:
        assert proxy.max_in_flight > 1
    # The server saw eight subscribed() calls, one per subscription.
    assert len({ident for ident, _, _ in SlowChannel.intervals}) == 8
    if linearized:
        # Each one started only after the previous one had finished (its confirm had to
        # cross the network first): causal, so no timing is needed to check it.
        spans = sorted((start, end) for _, start, end in SlowChannel.intervals)
        assert all(b[0] >= a[1] for a, b in itertools.pairwise(spans)), spans


async def test_subscribe_retry_after_a_lost_subscribe(server: Server, proxy: TapProxy) -> None:
    events = Recorder()
    proxy.drop_subscribes = 1
    # The retry must be confirmed within the timeout: 1 s is a round trip on a loaded machine.
    async with open_cable(proxy.url, subscribe_timeout=1.0, on_event=events) as cable:
        sub = await cable.subscribe("PlainChannel")
        assert sub.status == "confirmed"
    assert len(events.of("subscribe_sent")) == 2
    assert len(events.of("subscribe_timeout")) == 1


async def test_subscribe_timeout_after_one_retry(server: Server) -> None:
    events = Recorder()
    async with open_cable(server.url, subscribe_timeout=0.2, on_event=events) as cable:
        # The subscription stays pending until the gate opens, so both attempts time out
        # however slow the machine is.  (It was a 0.8 s subscribed() against 2 x 0.2 s.)
        with pytest.raises(SubscribeTimeout):
            await cable.subscribe("GateChannel")
        assert len(events.of("subscribe_sent")) == 2
        GateChannel.gate.set()
        # The late confirmation is answered with an unsubscribe: the server lets it go (its
        # stream came, and went again).
        await eventually(lambda: GateChannel.passed and not server.hub.subscribers("gate"))
        # Other subscriptions are unaffected.
        await cable.subscribe("PlainChannel")


async def test_buffer_overflow_is_reported_in_sequence(server: Server) -> None:
    async with open_cable(server.url, buffer_size=3) as cable:
        sub = await cable.subscribe("PlainChannel", {"stream": "flood"})
        for i in range(10):
            await server.broadcast("flood", i)
        with trio.fail_after(5):
            while sub.dropped < 7:
                await trio.sleep(0.01)
        assert [(await sub.receive()).data for _ in range(3)] == [0, 1, 2]
        with pytest.raises(MessagesDropped) as info:
            await sub.receive()
        assert info.value.count == 7
        await server.broadcast("flood", "after")
        assert (await sub.receive()).data == "after"


# -- tokens --------------------------------------------------------------------------------------


def token(ttl: float, user: str = "t", iat: float | None = None) -> str:
    now = time.time() if iat is None else iat
    claims: dict[str, Any] = {"ext": json.dumps({"user": user}), "iat": int(now), "exp": now + ttl}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
async def jwt_server(nursery: trio.Nursery) -> Server:
    return await nursery.start(Server(client_config(enforce_jwt=True), client_app()).serve)


@pytest.mark.parametrize("token_in", ["header", "query", "subprotocol"])
async def test_token_is_presented(jwt_server: Server, token_in: str) -> None:
    async with open_cable(jwt_server.url, token=token(60, "zoe"), token_in=token_in) as cable:  # type: ignore[arg-type]
        sub = await cable.subscribe("EchoChannel")
        assert (await sub.receive()).data["who"] == {"user": "zoe"}


async def test_expired_token_without_provider_stops(jwt_server: Server) -> None:
    with pytest.raises(CableClosed) as info:
        async with open_cable(jwt_server.url, token=token(-10), backoff=FAST):
            pass
    assert info.value.reason == "token_expired"


@pytest.mark.parametrize("is_async", [True, False])
async def test_token_expired_calls_the_provider(jwt_server: Server, is_async: bool) -> None:
    calls: list[float] = []

    def sync_provider() -> str:
        calls.append(time.time())
        return token(600, "fresh")

    async def async_provider() -> str:
        await trio.sleep(0)
        return sync_provider()

    events = Recorder()
    async with open_cable(
        jwt_server.url,
        token=token(600, "old"),
        token_provider=async_provider if is_async else sync_provider,
        backoff=FAST,
        on_event=events,
    ) as cable:
        plain = await cable.subscribe("PlainChannel")
        # The server says the token expired (and not to reconnect with it).
        await plain.perform("kick", {"reason": "token_expired", "reconnect": False})
        await events.wait_for("connected", 2)
        echo = await cable.subscribe("EchoChannel")
        assert (await echo.receive()).data["who"] == {"user": "fresh"}
    assert len(calls) == 1
    kinds = [e.kind for e in events.events if e.kind not in ("subscribe_sent", "subscribed")]
    assert kinds[:6] == [
        "connecting",
        "connected",
        "disconnected",
        "token_refreshed",
        "reconnect_scheduled",
        "connecting",
    ]


async def test_expired_token_at_start_is_refreshed(jwt_server: Server) -> None:
    async with open_cable(
        jwt_server.url, token=token(-10), token_provider=lambda: token(60, "new"), backoff=FAST
    ) as cable:
        echo = await cable.subscribe("EchoChannel")
        assert (await echo.receive()).data["who"] == {"user": "new"}


async def test_provider_returning_expired_tokens_gives_up(jwt_server: Server) -> None:
    with pytest.raises(CableClosed) as info:
        async with open_cable(
            jwt_server.url, token=token(-10), token_provider=lambda: token(-5), backoff=FAST
        ):
            pass
    assert info.value.reason == "token_expired"


class RecordingRandom(random.Random):
    """A seeded ``random.Random`` that remembers every ``uniform(a, b)`` it was asked."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.draws: list[tuple[float, float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        value = super().uniform(a, b)
        self.draws.append((a, b, value))
        return value


async def test_proactive_refresh_between_half_and_ninety_percent(jwt_server: Server) -> None:
    life = 2.0
    issued = time.time()
    calls: list[tuple[float, float]] = []  # (wall clock, trio clock)
    rng = RecordingRandom(3)
    lag = LoopLag()

    def provider() -> str:
        calls.append((time.time(), trio.current_time()))
        return token(600, "next")

    async with trio.open_nursery() as probe:
        probe.start_soon(lag.run)
        async with open_cable(
            jwt_server.url, token=token(life, iat=issued), token_provider=provider, rng=rng
        ):
            with trio.fail_after(15):
                while not calls:
                    await trio.sleep(0.02)
        lag.stop()
    # A point drawn in [50 %, 90 %] of the life (iat is whole seconds: exp - iat) ...
    low, high, fraction = rng.draws[0]  # (the next draws plan the fresh token's refresh)
    assert (low, high) == (0.5, 0.9)
    iat = int(issued)
    planned = iat + (issued + life - iat) * fraction
    # ... and the refresh came then: not before (the wall clock and trio's sleep agree to a
    # few ms), and later only by the loop's own lateness.
    wall, mono = calls[0]
    assert planned - 0.05 <= wall <= planned + lag.worst(mono - 5, mono + 0.5) + 0.25
