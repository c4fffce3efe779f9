"""What ``--log-level debug`` shows of each connection: connects, refusals, subscribes,
rejects and disconnects, each with its reason (over real sockets)."""

from __future__ import annotations

import logging

import pytest
import trio

from tests.conftest import identifier
from trio_cable import Server


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("trio_cable")]


async def wait_for(caplog: pytest.LogCaptureFixture, text: str) -> str:
    """The first log line containing *text*; waits for it (the server logs from its tasks)."""
    with trio.fail_after(20):
        while True:
            for line in messages(caplog):
                if text in line:
                    return line
            await trio.sleep(0.01)


async def test_a_connection_s_life_is_logged(
    server: Server, connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_cable")
    async with connect(query="user=ann") as client:
        sid = client.welcome["sid"]
        connected = await wait_for(caplog, "connected")
        assert sid[:8] in connected and "ann" in connected
        await client.subscribe(identifier(stream="logged"))
        assert "logged" in await wait_for(caplog, "subscribed to")
        await client.subscribe(identifier(reject=True), expect="reject_subscription")
        assert "rejected: by the channel" in await wait_for(caplog, "rejected")
        await client.subscribe(identifier("NoSuchChannel"), expect="reject_subscription")
        assert "NoSuchChannel" in await wait_for(caplog, "unknown channel")
    assert sid[:8] in await wait_for(caplog, "disconnected")


async def test_refusals_are_logged_with_their_reason(
    server: Server, connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trio_cable")
    async with connect(query="reject=1", expect_welcome=False) as client:
        assert (await client.recv())["reason"] == "unauthorized"
    assert "unauthorized" in await wait_for(caplog, "refused by the connect callback")
    async with connect(query="jid=not-a-token", expect_welcome=False) as client:
        assert (await client.recv())["reason"] == "unauthorized"
    assert "unauthorized" in await wait_for(caplog, "JWT refused")


async def test_server_initiated_disconnects_name_their_reason(
    server: Server, connect, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_cable")
    async with connect(query="user=bob") as client:
        assert server.disconnect_local({"user": "bob"}) == 1
        assert (await client.recv())["reason"] == "remote"
    assert "reconnect: False" in await wait_for(caplog, "disconnect remote")
