"""The command line as a user runs it: real processes, real sockets."""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import open_websocket_url

from tests.procs import ROOT, cli_command, running_server
from trio_cable.identity import JWTIdentifier
from trio_cable.streams import verify_stream


async def next_message(ws: Any) -> Any:
    """The next message that is not a ping (the server pings every 3 s: on a busy machine
    one can come before the answer a test waits for)."""
    while True:
        message = json.loads(await ws.get_message())
        if not (isinstance(message, dict) and message.get("type") == "ping"):
            return message


async def _roundtrip_chat(url: str) -> dict:
    async with open_websocket_url(f"{url}?name=ann", subprotocols=["actioncable-v1-json"]) as ws:
        assert (await next_message(ws))["type"] == "welcome"
        ident = json.dumps({"channel": "ChatChannel", "room": "lobby"})
        await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
        assert await next_message(ws) == {
            "identifier": ident,
            "type": "confirm_subscription",
        }
        data = json.dumps({"action": "speak", "text": "hello"})
        await ws.send_message(json.dumps({"command": "message", "identifier": ident, "data": data}))
        with trio.fail_after(5):
            while True:
                message = await next_message(ws)
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
            assert (await next_message(ws))["type"] == "welcome"
            ident = json.dumps({"channel": "$pubsub", "stream_name": "news"})
            await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
            assert (await next_message(ws))["type"] == "confirm_subscription"


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
            assert (await next_message(ws))["type"] == "welcome"
            ident = json.dumps({"channel": "BenchmarkChannel"})
            await ws.send_message(json.dumps({"command": "subscribe", "identifier": ident}))
            assert (await next_message(ws))["type"] == "confirm_subscription"


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
        (["serve", "--enforce-jwt"], {}, "--enforce-jwt: needs a JWT secret"),
        (["serve", "--path", "cable"], {}, "must start with"),
        (["--port", "abc"], {}, "trio-cable: --port: 'abc' is not an integer"),
        (["serve"], {"TRIO_CABLE_PORT": "abc"}, "trio-cable: TRIO_CABLE_PORT: 'abc' is not an"),
        (["--handshake-timeout", "nan"], {}, "--handshake-timeout: 'nan' is not a finite number"),
        (["--handshake-rate", "nan"], {}, "--handshake-rate: 'nan' is not a finite number"),
        (["--ping-interval", "inf"], {}, "--ping-interval: 'inf' is not a finite number"),
        (["--handshake-timeout", "-1"], {}, "--handshake-timeout: must be > 0, not -1"),
        (["serve"], {"TRIO_CABLE_DRAIN_RATE": "nan"}, "TRIO_CABLE_DRAIN_RATE: 'nan' is not a"),
        (["serve", "--prot", "1"], {}, "unrecognized arguments: --prot 1 (did you mean --port?)"),
        (["--config", "no-such-file.toml"], {}, "no-such-file.toml: no such config file"),
        (["--tls-cert", "no-cert.pem", "--tls-key", "no-key.pem"], {}, "tls_cert/tls_key"),
        (["token", "{}", "--secret", "x" * 40, "--ttl", "0"], {}, "--ttl: must be a number"),
        (["token", "{}", "--secret", "x" * 40, "--ttl", "-5"], {}, "not '-5'"),
        (["token", "{}", "--secret", "x" * 40, "--ttl", "nan"], {}, "not 'nan'"),
        (["token", "{}", "--secret", "x" * 40, "--ttl", "inf"], {}, "not 'inf'"),
        (["token", "{}", "--secret", "x" * 40, "--ttl", "soon"], {}, "not a number of"),
        (["sign"], {}, "trio-cable sign: the following arguments are required: stream"),
        (["bench", "echo"], {}, "the benchmarks run from a checkout: python -m bench"),
    ],
)
def test_bad_configuration_is_a_clear_error(args, env, message):
    out = _run(args, env)
    assert out.returncode == 2, out
    assert message in out.stderr
    _assert_one_line(out.stderr)


def _run(args: list[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> Any:
    return subprocess.run(
        [*cli_command(), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=30,
    )


def _assert_one_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_a_config_file_that_is_not_toml_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "cable.toml").write_text("port = [\n")
    out = _run(["serve", "--config", "cable.toml"], cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith("trio-cable: cable.toml: not valid TOML: ")
    _assert_one_line(out.stderr)
    (tmp_path / "cable.toml").write_text("handshake_rate = nan\n")
    out = _run(["serve", "--config", "cable.toml"], cwd=tmp_path)
    assert out.stderr == "trio-cable: cable.toml: handshake_rate: nan is not a finite number\n"


@pytest.mark.parametrize(
    ("source", "line", "message"),
    [
        ("from trio_cable import CableApp\n\napp = CableApp(\n", 3, "SyntaxError: '(' was never"),
        ("app = None\n\n\ndef f():\n    raise RuntimeError('boom')\n\n\nf()\n", 5, "Runtime"),
        ("import json\n\njson.loads('{')\n", 3, "JSONDecodeError: Expecting property name"),
        ("import no_such_dependency_xyz\n", 1, "ModuleNotFoundError: No module named 'no_such_"),
    ],
    ids=["syntax-error", "raises", "raises-in-a-library", "missing-dependency"],
)
def test_a_channels_module_that_fails_to_import_is_one_line(
    tmp_path: Path, source: str, line: int, message: str
) -> None:
    (tmp_path / "myapp.py").write_text(source)
    out = _run(["serve", "--port", "0", "--channels", "myapp:app"], cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.startswith(f"trio-cable: --channels myapp:app: myapp.py line {line}: ")
    assert message in out.stderr
    _assert_one_line(out.stderr)
    # The same from the environment names the variable.
    out = _run(["serve", "--port", "0"], env={"TRIO_CABLE_CHANNELS": "myapp:app"}, cwd=tmp_path)
    assert out.stderr.startswith(f"trio-cable: TRIO_CABLE_CHANNELS=myapp:app: myapp.py line {line}")


def test_version() -> None:
    expected = f"trio-cable {importlib.metadata.version('trio-cable')}\n"
    assert expected == "trio-cable 0.1.0\n"
    for command in (cli_command(), [sys.executable, "-m", "trio_cable"]):
        out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=30)
        assert (out.returncode, out.stdout, out.stderr) == (0, expected, "")
    out = _run(["--port", "1", "--version"])
    assert (out.returncode, out.stdout) == (0, expected)


def test_the_commands_are_serve_sign_and_token() -> None:
    out = _run(["--help"])
    assert out.returncode == 0
    assert "{serve,sign,token}" in out.stdout
    assert "bench" not in out.stdout
    assert "--version" in out.stdout


def test_short_secrets_are_one_warning_line() -> None:
    out = _run(["token", '{"user_id": 1}', "--secret", "short", "--ttl", "60"])
    assert out.returncode == 0
    assert out.stderr.startswith("trio-cable: warning: the secret is 5 bytes; HMAC-SHA256 keys")
    assert "InsecureKeyLengthWarning" not in out.stderr
    _assert_one_line(out.stderr)
    out = _run(["sign", "chat", "--secret", "short"])
    assert out.returncode == 0 and "the secret is 5 bytes" in out.stderr


def test_the_server_warns_about_a_short_secret_at_start_up() -> None:
    with running_server(["serve", "--port", "0", "--secret", "short"]) as (_url, _proc, lines):
        warning = [line for line in lines if "HMAC-SHA256 keys should be 32+" in line]
        assert len(warning) == 1 and "--secret: the secret is 5 bytes" in warning[0]
        assert "short" not in warning[0].replace("--secret", "")  # never the secret itself
    with running_server(["serve", "--port", "0", "--secret", "k" * 32]) as (_url, _proc, lines):
        assert not any("HMAC-SHA256" in line for line in lines)


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
