"""The command line as a user runs it: real processes, real sockets."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.procs import ROOT, cli_command, running_server
from trio_cable.identity import JWTIdentifier
from trio_cable.streams import verify_stream


async def _roundtrip_chat(url: str) -> dict:
    async with open_websocket_url(f"{url}?name=ann", subprotocols=["actioncable-v1-json"]) as ws:
        assert json.loads(await ws.get_message())["type"] == "welcome"
        ident = json.dumps({"channel": "ChatChannel", "room": "lobby"})
        await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
        assert json.loads(await ws.get_message()) == {
            "identifier": ident,
            "type": "confirm_subscription",
        }
        data = json.dumps({"action": "speak", "text": "hello"})
        await ws.send_message(json.dumps({"command": "message", "identifier": ident, "data": data}))
        with trio.fail_after(5):
            while True:
                message = json.loads(await ws.get_message())
                if message.get("type") != "ping":
                    return message


async def test_serve_with_an_application_module():
    args = ["serve", "--port", "0", "--channels", "examples.chat:app"]
    with running_server(args) as (url, _proc, _lines):
        assert url.endswith("/cable")
        message = await _roundtrip_chat(url)
        assert message["message"] == {"from": "ann", "text": "hello"}


async def test_no_arguments_serves_the_builtin_channels_on_the_default_port():
    # `trio-cable` alone must work for a newcomer.  The default port may be taken on a shared
    # machine, so only the address is overridden, through the environment.
    with running_server([], env={"TRIO_CABLE_PORT": "0", "TRIO_CABLE_PUBLIC_STREAMS": "true"}) as (
        url,
        _,
        _l,
    ):
        async with open_websocket_url(url, subprotocols=["actioncable-v1-json"]) as ws:
            assert json.loads(await ws.get_message())["type"] == "welcome"
            ident = json.dumps({"channel": "$pubsub", "stream_name": "news"})
            await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
            assert json.loads(await ws.get_message())["type"] == "confirm_subscription"


async def test_env_variables_configure_the_server():
    env = {
        "TRIO_CABLE_PORT": "0",
        "TRIO_CABLE_PATH": "/ws,/cable2",
        "TRIO_CABLE_BENCHMARK_CHANNEL": "1",
    }
    with running_server(["serve"], env=env) as (url, _, _l):
        assert url.endswith("/ws")
        base = url.rsplit("/", 1)[0]
        async with open_websocket_url(base + "/cable2", subprotocols=["actioncable-v1-json"]) as ws:
            assert json.loads(await ws.get_message())["type"] == "welcome"
            ident = json.dumps({"channel": "BenchmarkChannel"})
            await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
            assert json.loads(await ws.get_message())["type"] == "confirm_subscription"


def test_python_dash_m_and_help():
    out = subprocess.run(
        [sys.executable, "-m", "trio_cable", "serve", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0
    for flag in [
        "--host",
        "--port",
        "--path",
        "--secret",
        "--streams-secret",
        "--jwt-secret",
        "--jwt-param",
        "--enforce-jwt",
        "--public-streams",
        "--broadcast-key",
        "--allowed-origins",
        "--ping-interval",
        "--max-message-size",
        "--channels",
        "--benchmark-channel",
        "--broker",
        "--log-level",
    ]:
        assert flag in out.stdout, flag
    assert "TRIO_CABLE_PUBLIC_STREAMS" in out.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["serve", "--port", "nope"], {}, "port"),
        (["serve", "--broker", "zeromq"], {}, "unknown broker"),
        (["serve", "--channels", "no_such_module_xyz:app"], {}, "cannot import"),
        (["serve", "--channels", "examples.chat:nothing"], {}, "no attribute"),
        (["serve"], {"TRIO_CABLE_ENFORCE_JWT": "maybe"}, "TRIO_CABLE_ENFORCE_JWT"),
        (["serve", "--enforce-jwt"], {}, "enforce_jwt needs"),
        (["serve", "--path", "cable"], {}, "must start with"),
    ],
)
def test_bad_configuration_is_a_clear_error(args, env, message):
    import os

    out = subprocess.run(
        [*cli_command(), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **env},
        timeout=30,
    )
    assert out.returncode == 2, out
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_port_in_use_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run(
            [*cli_command(), "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )
    assert out.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    assert "Traceback" not in out.stderr


def test_sign_and_token_commands():
    out = subprocess.run(
        [*cli_command(), "sign", "chat/2023", "--secret", "s3Krit"], capture_output=True, text=True
    )
    assert out.stdout.strip() == (
        "ImNoYXQvMjAyMyI=--2b2e054b6413bf3bc7e8bbad2f68962aa2ba19821800ccbd8de6fd7314e8320c"
    )
    assert verify_stream("s3Krit", out.stdout.strip()) == "chat/2023"
    secret = "a-long-enough-secret-for-hs256-tokens!"
    out = subprocess.run(
        [*cli_command(), "token", '{"user_id": 42}', "--secret", secret, "--ttl", "60"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert JWTIdentifier(secret).verify(out.stdout.strip()) == {"user_id": 42}


def test_sigterm_stops_the_server_cleanly():
    with running_server(["serve", "--port", "0"]) as (_url, proc, _lines):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
