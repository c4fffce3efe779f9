"""Session resume and history end to end.  These need the server side of issue 4 (session
cache, reliable streams): they run once ``Server.features`` lists "resume" and "history"."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from tests.client_support import TapProxy, client_app, client_config, needs_server
from tests.conftest import SECRET
from trio_cable import Server
from trio_cable.client import Backoff, CableEvent, open_cable
from trio_cable.streams import sign_stream

pytestmark = needs_server("resume", "history")


@pytest.fixture
async def server(nursery: trio.Nursery) -> AsyncIterator[Server]:
    srv: Server = await nursery.start(Server(client_config(), client_app()).serve)
    yield srv


@pytest.fixture
async def proxy(nursery: trio.Nursery, server: Server) -> TapProxy:
    return await nursery.start(TapProxy(server.port).serve)


def _open(proxy: TapProxy, subprotocol: str, events: list[CableEvent]) -> Any:
    """A cable through *proxy* that retries fast and records its events.  (A short
    ``close_timeout``: leaving a cable waits it out today, see tests/test_client_cable.py.)"""
    return open_cable(
        proxy.url,
        subprotocol=subprotocol,
        backoff=Backoff("full_jitter", base=0.05, cap=0.1),
        on_event=events.append,
        close_timeout=0.2,
    )


async def _cut(proxy: TapProxy, cable: Any) -> None:
    """Cut the connection and keep the client out for a moment (one 503 + Retry-After)."""
    proxy.refuse = 1
    proxy.retry_after = "0.5"
    proxy.kill()
    with trio.fail_after(5):
        while cable.connected:
            await trio.sleep(0.01)


@pytest.mark.parametrize("subprotocol", ["actioncable-v1-ext-json", "actioncable-v1-ext-msgpack"])
async def test_resume_gets_missed_messages_once_in_order(
    server: Server, proxy: TapProxy, subprotocol: str
) -> None:
    events: list[CableEvent] = []
    async with _open(proxy, subprotocol, events) as cable:
        feed = await cable.subscribe("$pubsub", {"signed_stream_name": sign_stream(SECRET, "feed")})
        got: list[int] = []
        for n in range(1, 6):
            await server.broadcast("feed", n)
        with trio.fail_after(5):
            while len(got) < 5:
                got.append((await feed.receive()).data)
        old_sid = cable.sid
        await _cut(proxy, cable)
        for n in range(6, 11):
            await server.broadcast("feed", n)
        with trio.fail_after(10):
            while not cable.connected:
                await trio.sleep(0.01)
        welcome = [e for e in events if e.kind == "connected"][-1]
        assert welcome.restored is True and cable.sid != old_sid
        # The restored subscription was not subscribed again: history was asked instead.
        assert sum(1 for e in events if e.kind == "subscribe_sent") == 1
        for n in range(11, 16):
            await server.broadcast("feed", n)
        with trio.fail_after(10):
            while len(got) < 15:
                got.append((await feed.receive()).data)
        assert got == list(range(1, 16))
        assert feed.position("feed") is not None
        # Nothing extra queued, no second copy: what is broadcast now is the very next
        # message (no silence window to time, and only the public API).
        await server.broadcast("feed", 16)
        with trio.fail_after(5):
            assert (await feed.receive()).data == 16
        assert feed.duplicates == 0  # the server sent nothing twice (the client would hide it)


async def test_not_restored_resubscribes_with_history(nursery: trio.Nursery) -> None:
    """A server that lost the session (a new process, same broker): the client subscribes
    again with history in the subscribe command, and still misses nothing."""
    from tests.client_support import RestartableServer

    rs = RestartableServer(nursery)
    first = await rs.start()
    rs.server_kwargs = {"broker": first.broker}
    events: list[CableEvent] = []
    async with open_cable(
        rs.url,
        backoff=Backoff("full_jitter", base=0.3, cap=0.3),
        on_event=events.append,
        close_timeout=0.2,
    ) as cable:
        feed = await cable.subscribe(
            "$pubsub", {"signed_stream_name": sign_stream(SECRET, "feed2")}
        )
        await first.broadcast("feed2", 1)
        assert (await feed.receive()).data == 1
        await rs.stop()
        second = await rs.start()
        await second.broadcast("feed2", 2)  # published before the client is back
        with trio.fail_after(10):
            while sum(1 for e in events if e.kind == "subscribed") < 2:
                await trio.sleep(0.01)
        await second.broadcast("feed2", 3)
        with trio.fail_after(5):
            assert [(await feed.receive()).data for _ in range(2)] == [2, 3]


@pytest.mark.parametrize("subprotocol", ["actioncable-v1-ext-json", "actioncable-v1-ext-msgpack"])
async def test_a_subscription_that_got_nothing_yet_still_gets_what_it_missed(
    nursery: trio.Nursery, subprotocol: str
) -> None:
    """The client drops before the ping ticker's first ping, with nothing received on its
    stream: it has no position to ask history with, only ``since``, whose server time comes
    from the ping the server sends right after the welcome.  (Found by the 2,000-client
    avalanche run: a few messages per run were lost this way.)"""
    server = await nursery.start(Server(client_config(ping_interval=30.0), client_app()).serve)
    proxy = await nursery.start(TapProxy(server.port).serve)
    events: list[CableEvent] = []
    async with _open(proxy, subprotocol, events) as cable:
        quiet = await cable.subscribe(
            "$pubsub", {"signed_stream_name": sign_stream(SECRET, "quiet")}
        )
        # The immediate ping arrived (the ticker's first is 30 s away).
        with trio.fail_after(5):
            while cable.session.last_server_time is None:
                await trio.sleep(0.01)
        await _cut(proxy, cable)
        await server.broadcast("quiet", "while away")
        with trio.fail_after(10):
            while not cable.connected:
                await trio.sleep(0.01)
        assert [e for e in events if e.kind == "connected"][-1].restored is True
        with trio.fail_after(5):
            message = await quiet.receive()
        assert message.data == "while away"
        await server.broadcast("quiet", "after")
        with trio.fail_after(5):
            assert (await quiet.receive()).data == "after"
