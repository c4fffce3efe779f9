"""A real browser (headless Chromium) on trio_cable, across a drain and a takeover of the port
by a second node sharing a real Redis: its own EventSource on /events, and @anycable/web (the
npm package's ES modules, loaded through an import map) over WebSocket."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import trio

from tests.browser_support import CHROMIUM, SKIP_REASON, TESTS, chromium_page, static_server
from tests.conftest import eventually, make_app
from tests.handoff import hand_over
from tests.redis_support import REDIS_SERVER, RedisProcess, redis_fixture  # noqa: F401
from tests.redis_support import SKIP_REASON as NO_REDIS
from tests.test_interop import node_modules as node_modules_fixture  # noqa: F401
from trio_cable import Config, Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON),
    pytest.mark.skipif(REDIS_SERVER is None, reason=NO_REDIS),
]


def node_config(redis: RedisProcess, port: int = 0) -> Config:
    return Config(
        port=port,
        public_streams=True,
        broker="redis",
        redis_url=redis.url,
        drain_period=0,
        reconnect_advice=1.0,
        close_timeout=1.0,
    )


async def takeover(
    nursery: trio.Nursery, redis: RedisProcess, profile: Path, page: str, url: str
) -> tuple[dict[str, Any], Server]:
    """Open *page* (under tests/) on node A's *url* (``{port}`` filled in), broadcast 1-5;
    hand the port to node B, broadcast 6-8 (to A's client over Redis), drain A, broadcast
    9-12 while the browser is away or coming back, and 13-15 once it is back on B.  Returns
    the page's results and node B."""
    listener = socket.create_server(("127.0.0.1", 0))
    old = await nursery.start(Server(node_config(redis), make_app(), listen_socket=listener).serve)
    port = old.port
    stream = "browser/feed"
    with static_server(TESTS) as page_port:
        target = quote(url.format(port=port, stream=quote(stream, safe="")), safe="")
        page_url = f"http://127.0.0.1:{page_port}/{page}?url={target}&stream={quote(stream)}"
        async with chromium_page(page_url, profile) as browser:
            await eventually(lambda: old.hub.subscribers(stream) == 1, 30, "subscribed on A")
            for n in range(1, 6):
                await old.broadcast(stream, n)
            await browser.wait_for("results.messages.length >= 5")
            # The port goes to a new node (the old one keeps its client); then the old one
            # drains: the browser is told when to come back (jittered advice), and comes
            # back to the new node, where what it missed comes from history.
            await hand_over(old)
            new = await nursery.start(Server(node_config(redis, port), make_app()).serve)
            for n in range(6, 9):
                await new.broadcast(stream, n)
            await browser.wait_for("results.messages.length >= 8")
            await old.drain()
            for n in range(9, 13):
                await new.broadcast(stream, n)
            await eventually(lambda: new.hub.subscribers(stream) == 1, 30, "back on B")
            for n in range(13, 16):
                await new.broadcast(stream, n)
            await browser.wait_for("results.messages.length >= 15")
            await trio.sleep(0.3)  # a duplicate would arrive right behind
            return await browser.evaluate("results"), new


async def test_eventsource_gets_every_message_once_in_order_across_a_drain_and_takeover(
    nursery, redis, tmp_path
):
    results, new = await takeover(
        nursery,
        redis,
        tmp_path / "profile",
        "assets/sse.html",
        "http://127.0.0.1:{port}/events?stream={stream}",
    )
    assert results["messages"] == list(range(1, 16)), results
    # One reconnect, with Last-Event-ID: history served by the new node, never rejected.
    assert results["opens"] == 2 and "reject_history" not in results["events"]
    assert results["events"].count("disconnect") == 1
    assert results["events"].count("confirm_history") == 1
    assert new.metrics.history_served_total == 1
    assert [int(i.split("/")[0]) for i in results["ids"]] == list(range(1, 16))


@pytest.mark.usefixtures("node_modules_fixture")
async def test_anycable_web_over_websocket_gets_every_message_once_in_order_across_a_drain(
    nursery, redis, tmp_path
):
    results, new = await takeover(
        nursery,
        redis,
        tmp_path / "profile",
        "assets/anycable.html",
        "ws://127.0.0.1:{port}/cable",
    )
    assert results["messages"] == list(range(1, 16)), results
    # @anycable/core drops its session id on any disconnect message (action_cable_ext:
    # "delete sessionID to avoid recovery"), so after a drain it does not resume: it
    # subscribes again on the new node, asking history from its last position there.
    assert results["connects"] == 2 and results["events"].count("subscribed") == 2, results
    assert new.metrics.history_served_total == 1 and new.metrics.history_rejected_total == 0


async def test_chromium_gets_compressed_broadcasts(nursery: trio.Nursery, tmp_path: Path) -> None:
    """Chromium offers permessage-deflate on its own: with ``--compression`` it gets deflated
    broadcasts and transmissions (its WebSocket inflates them), and its own long messages come
    compressed and are inflated by the server."""
    config = Config(port=0, public_streams=True, compression=True, compression_threshold=64)
    server = await nursery.start(Server(config, make_app()).serve)
    url = f"ws://127.0.0.1:{server.port}/cable"
    identifier = '{"channel":"$pubsub","stream_name":"zipped"}'
    script = f"""
        window.results = {{messages: [], confirmed: false}};
        const ws = new WebSocket({url!r}, ["actioncable-v1-json"]);
        ws.onmessage = (event) => {{
            const msg = JSON.parse(event.data);
            if (msg.type === "welcome")
                ws.send(JSON.stringify({{command: "subscribe", identifier: {identifier!r}}}));
            else if (msg.type === "confirm_subscription") results.confirmed = true;
            else if (msg.identifier && msg.message) results.messages.push(msg.message);
        }};
        window.cable = ws;
        true
    """
    async with chromium_page("about:blank", tmp_path / "profile") as browser:
        await browser.evaluate(script)
        await browser.wait_for("results.confirmed")
        before = server.metrics.compressed_frames_total
        big = [{"n": n, "text": f"compressed words, message {n} " * 40} for n in range(1, 6)]
        for message in big:
            await server.broadcast("zipped", message)
        await browser.wait_for("results.messages.length >= 5")
        assert await browser.evaluate("results.messages") == big
        assert server.metrics.compressed_frames_total >= before + 5
        # The browser's own long message (Chromium compresses
        # what it sends on a compressed connection); the server inflates it.
        inflated_before = server.metrics.compressed_messages_total
        await browser.evaluate(
            f'cable.send(JSON.stringify({{command: "message", identifier: {identifier!r}, '
            f'data: JSON.stringify({{action: "nothing", pad: "x".repeat(4000)}})}})); true'
        )
        await eventually(
            lambda: server.metrics.compressed_messages_total > inflated_before, 30, "inflated"
        )
