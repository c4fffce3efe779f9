"""The examples as a user runs them: real processes, real clients over real sockets."""

from __future__ import annotations

import json
import re
import signal
import sys
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from tests.procs import running_server

LOBBY = json.dumps({"channel": "ChatChannel", "room": "lobby"})


async def next_message(ws: WebSocketConnection, timeout: float = 20.0) -> dict[str, Any]:
    """The next message that is not a ping."""
    with trio.fail_after(timeout):
        while True:
            message: dict[str, Any] = json.loads(await ws.get_message())
            if message.get("type") != "ping":
                return message


async def join_lobby(ws: WebSocketConnection) -> None:
    assert (await next_message(ws))["type"] == "welcome"
    await ws.send_message(json.dumps({"command": "subscribe", "identifier": LOBBY}))
    assert await next_message(ws) == {"identifier": LOBBY, "type": "confirm_subscription"}


async def speak(ws: WebSocketConnection, text: str) -> dict[str, Any]:
    data = json.dumps({"action": "speak", "text": text})
    await ws.send_message(json.dumps({"command": "message", "identifier": LOBBY, "data": data}))
    while True:
        message = await next_message(ws)
        if message.get("message", {}).get("from") != "clock":
            return message


async def test_chat_names_come_from_the_query_or_default_to_a_guest() -> None:
    with running_server(["serve", "--port", "0", "--channels", "examples.chat:app"]) as (
        url,
        _proc,
        _lines,
    ):
        async with open_websocket_url(
            f"{url}?name=ann", subprotocols=["actioncable-v1-json"]
        ) as ws:
            await join_lobby(ws)
            assert (await speak(ws, "hi"))["message"] == {"from": "ann", "text": "hi"}
        async with open_websocket_url(url, subprotocols=["actioncable-v1-json"]) as ws:
            await join_lobby(ws)
            said = (await speak(ws, "hello"))["message"]
            assert re.fullmatch(r"guest-[\w-]{6}", said["from"]) and said["text"] == "hello"
        too_long = "x" * 33
        async with open_websocket_url(
            f"{url}?name={too_long}", subprotocols=["actioncable-v1-json"]
        ) as ws:
            message = await next_message(ws)
            assert (message["type"], message["reason"]) == ("disconnect", "unauthorized")


def running_embed() -> Any:
    """``python examples/embed.py`` on a free port, with a short drain period."""
    env = {"TRIO_CABLE_PORT": "0", "TRIO_CABLE_DRAIN_PERIOD": "1"}
    return running_server([], env, command=[sys.executable, "examples/embed.py"])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_embed_broadcasts_then_drains_and_exits_cleanly_on_a_signal(signum: int) -> None:
    with running_embed() as (url, proc, _lines):
        async with open_websocket_url(url, subprotocols=["actioncable-v1-json"]) as ws:
            await join_lobby(ws)
            tick = await next_message(ws)
            assert tick["message"]["from"] == "clock"
            proc.send_signal(signum)
            while (message := await next_message(ws)).get("type") != "disconnect":
                assert message["message"]["from"] == "clock"
            assert (message["reason"], message["reconnect"]) == ("server_restart", True)
        # Exited on its own, with status 0 and no traceback.
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr and "ExceptionGroup" not in stderr, stderr
        assert f"received {signal.Signals(signum).name}: draining" in stderr
        assert "drain finished" in stderr
