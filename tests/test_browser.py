"""A real browser (headless Chromium) on trio_cable: its own EventSource on /events, across a
drain and a takeover of the port by a second node sharing a real Redis."""

from __future__ import annotations

import json
import socket

import pytest
import trio

from tests.browser_support import ASSETS, CHROMIUM, SKIP_REASON, chromium_page, static_server
from tests.conftest import eventually, make_app
from tests.redis_support import REDIS_SERVER, RedisProcess, redis_fixture  # noqa: F401
from tests.redis_support import SKIP_REASON as NO_REDIS
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


async def test_eventsource_gets_every_message_once_in_order_across_a_drain_and_takeover(
    nursery, redis, tmp_path
):
    listener = socket.create_server(("127.0.0.1", 0))
    old = await nursery.start(Server(node_config(redis), make_app(), listen_socket=listener).serve)
    port = old.port
    stream = "browser/feed"
    events_url = f"http://127.0.0.1:{port}/events?stream={stream}"
    with static_server(ASSETS) as page_port:
        page_url = f"http://127.0.0.1:{page_port}/sse.html?url=" + _quote(events_url)
        async with chromium_page(page_url, tmp_path / "profile") as page:
            await page.wait_for("results.events.includes('confirm_subscription')")
            for n in range(1, 6):
                await old.broadcast(stream, n)
            await page.wait_for("results.messages.length >= 5")

            # The port goes to a new node (the old one keeps its client); then the old one
            # drains: the browser is told to come back after the jittered advice (retry:),
            # and comes back to the new node with Last-Event-ID.
            old.stop_accepting()
            new = await nursery.start(Server(node_config(redis, port), make_app()).serve)
            for n in range(6, 9):  # reach the browser through the old node, over Redis
                await new.broadcast(stream, n)
            await page.wait_for("results.messages.length >= 8")
            await old.drain()
            for n in range(9, 13):  # while the browser is away (or coming back)
                await new.broadcast(stream, n)
            await page.wait_for("results.opens >= 2 && results.events.includes('confirm_history')")
            await eventually(lambda: new.hub.subscribers(stream) == 1, what="resubscribed")
            for n in range(13, 16):
                await new.broadcast(stream, n)
            await page.wait_for("results.messages.length >= 15")
            await trio.sleep(0.3)  # a duplicate would arrive right behind
            results = await page.evaluate("results")
    assert results["messages"] == list(range(1, 16)), results
    assert results["opens"] == 2 and "reject_history" not in results["events"]
    assert results["events"].count("disconnect") == 1
    assert new.metrics.history_served_total == 1
    ids = results["ids"]
    assert [int(i.split("/")[0]) for i in ids] == list(range(1, 16))
    assert json.dumps(results)  # plain data


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")
