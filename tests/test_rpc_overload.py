"""Overload in proxy mode: an RPC application that answers 503 with ``Retry-After``, one that
slows down, one that dies.  Real sockets both ways (WebSocket clients -> trio_cable -> the
HTTP application of tests/rpc_support.py); each test records the concurrency limit over time
and checks its shape, that every client got an answer, and that nothing the application had
applied was sent to it twice."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.conftest import CableClient
from tests.rpc_support import RpcAppProcess, RpcTestApp
from tests.test_rpc import rpc_config
from trio_cable import Server

pytestmark = pytest.mark.slow


def chat(room: str) -> str:
    return json.dumps({"channel": "Chat", "room": room})


class LimitRecorder:
    """The server's RPC concurrency limit, sampled every 20 ms: ``(time, limit)``."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.samples: list[tuple[float, int]] = []

    async def run(self) -> None:
        while True:
            value = int(self.server.metrics.value("rpc_concurrency_limit"))
            self.samples.append((trio.current_time(), value))
            await trio.sleep(0.02)

    def between(self, start: float, end: float) -> list[int]:
        return [v for t, v in self.samples if start <= t <= end]

    def series(self) -> str:
        """A compact picture for failure messages: the limit each time it changed."""
        out, last = [], None
        t0 = self.samples[0][0] if self.samples else 0.0
        for t, v in self.samples:
            if v != last:
                out.append(f"{t - t0:.2f}s:{v}")
                last = v
        return " ".join(out)


@asynccontextmanager
async def cable(server: Server, user: str | None) -> AsyncIterator[CableClient]:
    subprotocol = "actioncable-v1-json"
    headers = [("cookie", f"user={user}")] if user else []
    url = f"ws://127.0.0.1:{server.port}/cable"
    async with open_websocket_url(url, subprotocols=[subprotocol], extra_headers=headers) as ws:
        yield CableClient(ws, subprotocol)


class Barrier:
    """*n* clients meet: the last to arrive runs *action*; a client that ended early
    (refused, unanswered) leaves instead, so that nobody waits for it."""

    def __init__(self, n: int, action: Callable[[], Awaitable[None]]) -> None:
        self.n = n
        self.action = action
        self.arrived = 0
        self.event = trio.Event()

    async def _count(self) -> None:
        self.arrived += 1
        if self.arrived == self.n:
            await self.action()
            self.event.set()

    async def wait(self) -> None:
        await self._count()
        with trio.fail_after(60):
            await self.event.wait()

    async def leave(self) -> None:
        await self._count()


class Outcomes:
    """What each client got: counted, so that a missing answer is a failed assertion."""

    def __init__(self) -> None:
        self.welcomed = 0
        self.refused: list[dict[str, object]] = []
        self.confirmed = 0
        self.rejected = 0
        self.echoes = 0
        self.unanswered: list[str] = []


async def chatter(
    server: Server,
    user: str,
    actions: int,
    outcomes: Outcomes,
    barrier: Barrier | None = None,
    *,
    timeout: float = 30.0,
) -> None:
    """Connect, subscribe, send *actions* unique ``say`` actions (and as many again after
    meeting the others at *barrier*), counting the answers."""
    met = False
    try:
        async with cable(server, user) as client:
            first = await client.recv(timeout=timeout)
            if first["type"] != "welcome":
                outcomes.refused.append(first)
                return
            outcomes.welcomed += 1
            await client.recv(timeout=timeout)  # the application's hello
            await client.send({"command": "subscribe", "identifier": chat(user)})
            while True:
                message = await client.recv(timeout=timeout)
                if message.get("type") == "confirm_subscription":
                    outcomes.confirmed += 1
                    break
                if message.get("type") == "reject_subscription":
                    outcomes.rejected += 1
                    return
            for round_ in range(2 if barrier is not None else 1):
                if round_ == 1 and barrier is not None:
                    met = True
                    await barrier.wait()
                for n in range(actions):
                    text = f"{user}-{round_}-{n}"
                    await client.perform(chat(user), "say", text=text)
                    try:
                        message = await client.recv(timeout=timeout)
                    except trio.TooSlowError:
                        outcomes.unanswered.append(text)
                        return
                    assert message["message"]["echo"] == text
                    outcomes.echoes += 1
    finally:
        if barrier is not None and not met:
            await barrier.leave()


async def test_503_with_retry_after_lowers_the_limit_which_recovers(nursery: trio.Nursery) -> None:
    app = RpcAppProcess()
    app.start()
    try:
        await trio.to_thread.run_sync(lambda: app.set(capacity=3, delay=0.03, retry_after="1"))
        config = rpc_config(
            app,
            secret=None,
            rpc_concurrency=16,
            rpc_max_concurrency=32,
            rpc_command_timeout=20.0,
            rpc_retries=6,
        )
        server: Server = await nursery.start(Server(config).serve)
        recorder = LimitRecorder(server)
        nursery.start_soon(recorder.run)
        outcomes = Outcomes()
        clients, actions = 30, 4
        marks: dict[str, float] = {}

        async def recover() -> None:
            # Every client finished its first round under overload: the application gets
            # its capacity back, then all of them go again at once (calls queue).
            marks["recovery"] = trio.current_time()
            await trio.to_thread.run_sync(lambda: app.set(capacity=None))

        barrier = Barrier(clients, recover)
        marks["start"] = trio.current_time()
        async with trio.open_nursery() as inner:
            for i in range(clients):
                inner.start_soon(chatter, server, f"u{i}", actions, outcomes, barrier)
        marks["end"] = trio.current_time()
        applied, refused = await trio.to_thread.run_sync(app.stats)
        duplicates = await trio.to_thread.run_sync(app.duplicates)
    finally:
        app.stop()
    picture = recorder.series()
    print("rpc_concurrency_limit over time:", picture)  # shown with -s
    # Every client was answered: connected, subscribed, every action echoed.
    assert not outcomes.refused and not outcomes.unanswered, (outcomes.refused, picture)
    assert outcomes.welcomed == outcomes.confirmed == clients
    assert outcomes.echoes == clients * actions * 2
    # The application did turn calls away, the server retried them after Retry-After...
    assert refused > 0 and applied
    assert server.metrics.labeled["rpc_retries_total"]["overloaded"] > 0
    # ...and never sent again what the application had applied.
    assert duplicates == []
    # The limit fell to about the application's capacity under overload...
    during = recorder.between(marks["start"], marks["recovery"])
    assert min(during) <= 4, picture
    assert server.metrics.rpc_limit_decreases_total >= 2
    # ...and rose again once the application could take more and calls queued.
    after = recorder.between(marks["recovery"], marks["end"] + 1)
    assert max(after) >= min(during) + 4, picture
    assert server.metrics.rpc_limit_increases_total > 0


async def test_a_slower_application_lowers_the_limit_which_recovers(
    nursery: trio.Nursery,
) -> None:
    app = RpcAppProcess()
    app.start()
    try:
        await trio.to_thread.run_sync(lambda: app.set(delay=0.005))
        config = rpc_config(
            app, secret=None, rpc_concurrency=24, rpc_max_concurrency=48, rpc_command_timeout=30.0
        )
        server: Server = await nursery.start(Server(config).serve)
        recorder = LimitRecorder(server)
        nursery.start_soon(recorder.run)
        outcomes = Outcomes()
        clients = 30
        marks: dict[str, float] = {}

        async def slow_down() -> None:
            # Round 1 ran at 5 ms per call; round 2 runs slow (the database is in trouble).
            marks["slow"] = trio.current_time()
            await trio.to_thread.run_sync(lambda: app.set(delay=0.25))

        async def speed_up() -> None:
            # Then a new connection of each client runs fast again.
            marks["fast"] = trio.current_time()
            await trio.to_thread.run_sync(lambda: app.set(delay=0.005))

        slow, fast = Barrier(clients, slow_down), Barrier(clients, speed_up)

        async def client(i: int) -> None:
            await chatter(server, f"s{i}", 6, outcomes, slow)
            await fast.wait()
            await chatter(server, f"s{i}b", 6, outcomes)

        marks["start"] = trio.current_time()
        async with trio.open_nursery() as inner:
            for i in range(clients):
                inner.start_soon(client, i)
        marks["end"] = trio.current_time()
        duplicates = await trio.to_thread.run_sync(app.duplicates)
    finally:
        app.stop()
    picture = recorder.series()
    print("rpc_concurrency_limit over time:", picture)  # shown with -s
    assert not outcomes.refused and not outcomes.unanswered, (outcomes.refused, picture)
    assert outcomes.echoes == clients * (6 * 2 + 6)
    assert duplicates == []
    before = recorder.between(marks["start"], marks["slow"])
    slowed = recorder.between(marks["slow"], marks["fast"])
    fasted = recorder.between(marks["fast"], marks["end"] + 1)
    # Down while the application was slow (latency far above its idle latency)...
    assert min(slowed) <= max(before) * 0.7, picture
    # ...and back up once it was fast again and calls queued.
    assert max(fasted) >= min(slowed) + 4, picture


async def test_a_dead_application_trips_the_breaker_and_recovers(nursery: trio.Nursery) -> None:
    app = RpcAppProcess()
    app.start()
    config = rpc_config(
        app,
        secret=None,
        rpc_breaker_cooldown=3.0,
        rpc_retries=2,
        rpc_timeout=1.0,
        rpc_command_timeout=5.0,
        reconnect_advice=2.0,
    )
    server: Server = await nursery.start(Server(config).serve)
    try:
        async with cable(server, "ann") as client:
            assert (await client.recv())["type"] == "welcome"
            await client.recv()
            await client.send({"command": "subscribe", "identifier": chat("a")})
            assert (await client.recv())["message"]["joined"] == "a"
            assert (await client.recv())["type"] == "confirm_subscription"
            app.stop()
            # The application is gone: the subscribe is answered, with a rejection.
            await client.send({"command": "subscribe", "identifier": chat("b")})
            assert await client.recv(timeout=10) == {
                "identifier": chat("b"),
                "type": "reject_subscription",
            }
            # New clients are told to come back later, not that they are unauthorized...
            with trio.fail_after(20):
                while server.metrics.value("rpc_breaker_state") != 2:
                    async with cable(server, "bob") as other:
                        message = await other.recv(timeout=10)
                    assert message["type"] == "disconnect", message
                    assert message["reason"] == "server_restart", message
            # ...and once the breaker is open, at once: nothing is sent to the application.
            calls_before = sum(server.metrics.labeled["rpc_calls_total"].values())
            for _ in range(3):
                started = trio.current_time()
                async with cable(server, "bob") as other:
                    message = await other.recv(timeout=10)
                elapsed = trio.current_time() - started
                assert message["type"] == "disconnect", message
                assert message["reason"] == "server_restart"
                assert message["reconnect"] is True
                assert 0 <= message["reconnect_after"] <= 5000
                assert elapsed < 1.0, elapsed
            assert sum(server.metrics.labeled["rpc_calls_total"].values()) == calls_before
            assert server.metrics.labeled["rpc_refusals_total"]["connect"] >= 3
            assert server.metrics.rpc_breaker_trips_total >= 1
            # Refused connections were never applied: those were retried before it opened.
            assert server.metrics.labeled["rpc_retries_total"]["transport"] > 0
            assert server.metrics.unauthorized_total == 0
            # The application comes back on its port: after the cool-down a probe closes
            # the breaker and everything works again, on the same connection too.
            app.start()

            async def welcomed() -> bool:
                async with cable(server, "cid") as again:
                    return bool((await again.recv(timeout=10))["type"] == "welcome")

            with trio.fail_after(15):
                while not await welcomed():
                    await trio.sleep(0.2)
            assert server.metrics.value("rpc_breaker_state") == 0
            await client.send({"command": "subscribe", "identifier": chat("c")})
            assert (await client.recv())["message"]["joined"] == "c"
            assert (await client.recv())["type"] == "confirm_subscription"
    finally:
        app.stop()


async def test_a_drain_paces_its_disconnect_calls(nursery: trio.Nursery) -> None:
    app = RpcTestApp()
    app.start()
    try:
        rate, clients = 100.0, 100
        config = rpc_config(app, secret=None, rpc_disconnect_rate=rate, drain_period=0.2)
        server: Server = await nursery.start(Server(config).serve)
        async with AsyncExitStack() as stack:
            for i in range(clients):
                client = await stack.enter_async_context(cable(server, f"d{i}"))
                assert (await client.recv())["type"] == "welcome"
                await client.recv()
                await client.send({"command": "subscribe", "identifier": chat(f"d{i}")})
                await client.recv()
                assert (await client.recv())["type"] == "confirm_subscription"
            # All of them go within 0.2 s, and the drain returns once the application
            # heard of every one (within the shutdown timeout)...
            await server.drain()
            assert len(app.calls("/disconnect")) == clients
        # ...but their disconnect calls were not made at once: about `rate` a second.
        times = sorted(a.at for a in app.calls("/disconnect"))
        span = times[-1] - times[0]
        assert span >= (clients - 1) / rate * 0.8, span
        busiest = max(sum(1 for t in times if s <= t < s + 0.1) for s in times)
        assert busiest <= rate * 0.1 + 3, busiest
        # Each carried its subscription.
        assert all(len(a.body["subscriptions"]) == 1 for a in app.calls("/disconnect"))
    finally:
        app.stop()
