"""Interop: the real npm clients (@rails/actioncable, @anycable/core) under Node against the
real server.  ``tests/interop/`` pins the packages (package.json + package-lock.json); the
fixture installs them with ``npm ci`` when ``node_modules`` is missing.  Each scenario is one
``node scenario.mjs '<options>'`` process printing JSON lines; it has its own hard timeout, and
this side another one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.client_support import SERVER_FEATURES, client_app, client_config
from tests.conftest import SECRET
from trio_cable import Server
from trio_cable.streams import sign_stream

INTEROP = Path(__file__).parent / "interop"
NODE = shutil.which("node")


def node_major() -> int:
    if NODE is None:
        return 0
    out = subprocess.run([NODE, "--version"], capture_output=True, text=True, check=False)
    try:
        return int(out.stdout.strip().lstrip("v").split(".")[0])
    except ValueError:
        return 0


pytestmark = [
    pytest.mark.skipif(node_major() < 20, reason="interop tests need Node >= 20"),
    pytest.mark.slow,  # a Node process per test (and npm ci on a fresh checkout)
]


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """Install the pinned npm packages once (``npm ci`` from the lock file)."""
    target = INTEROP / "node_modules"
    if not target.is_dir():
        npm = shutil.which("npm")
        assert npm, "npm is needed to install the interop clients"
        command = [npm, "ci"] if (INTEROP / "package-lock.json").exists() else [npm, "install"]
        subprocess.run(
            [*command, "--no-audit", "--no-fund"],
            cwd=INTEROP,
            check=True,
            timeout=300,
            env={**os.environ, "npm_config_update_notifier": "false"},
        )
    return target


@pytest.fixture
async def server(nursery: trio.Nursery) -> Server:
    return await nursery.start(Server(client_config(), client_app()).serve)


class NodeRun:
    """A running scenario: its lines so far, and a way to wait for one."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.changed = trio.Event()
        self.stderr = b""
        self.returncode: int | None = None

    async def wait_for(self, event: str, timeout: float = 15.0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                for line in self.lines:
                    if line.get("event") == event:
                        return line
                if self.returncode is not None:
                    raise AssertionError(
                        f"node exited {self.returncode} before {event!r}: {self.lines} "
                        f"{self.stderr.decode(errors='replace')[-2000:]}"
                    )
                self.changed = trio.Event()
                await self.changed.wait()

    def of(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            line
            for line in self.lines
            if line.get("event") == event and all(line.get(k) == v for k, v in fields.items())
        ]


async def run_node(
    nursery: trio.Nursery,
    options: dict[str, Any],
    script: str = "scenario.mjs",
    node_args: tuple[str, ...] = (),
) -> NodeRun:
    """Start *script* (a scenario, by default) in the background; its lines arrive in the
    returned NodeRun."""
    assert NODE is not None
    run = NodeRun()

    async def drive() -> None:
        process = await trio.lowlevel.open_process(
            [NODE, *node_args, script, json.dumps(options)],
            cwd=INTEROP,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert process.stdout is not None and process.stderr is not None

        async def read_err() -> None:
            assert process.stderr is not None
            async for chunk in process.stderr:
                run.stderr += chunk

        try:
            async with trio.open_nursery() as inner:
                inner.start_soon(read_err)
                buffer = b""
                async for chunk in process.stdout:
                    buffer += chunk
                    while b"\n" in buffer:
                        raw, buffer = buffer.split(b"\n", 1)
                        if raw.strip():
                            run.lines.append(json.loads(raw))
                            run.changed.set()
            run.returncode = await process.wait()
        finally:
            if process.returncode is None:
                process.kill()
                with trio.CancelScope(shield=True):
                    await process.wait()
            run.changed.set()

    nursery.start_soon(drive)
    return run


SCENARIOS = [
    pytest.param({"client": "rails"}, id="rails-json"),
    pytest.param({"client": "anycable", "protocol": "actioncable-v1-json"}, id="anycable-json"),
    pytest.param(
        {"client": "anycable", "protocol": "actioncable-v1-ext-json"}, id="anycable-ext-json"
    ),
    pytest.param(
        {"client": "anycable", "protocol": "actioncable-v1-msgpack"}, id="anycable-msgpack"
    ),
    pytest.param(
        {"client": "anycable", "protocol": "actioncable-v1-ext-msgpack"},
        id="anycable-ext-msgpack",
    ),
    pytest.param(
        {
            "client": "anycable",
            "protocol": "actioncable-v1-ext-json",
            "concurrentSubscribes": False,
        },
        id="anycable-ext-json-linearized",
    ),
    pytest.param(
        {"client": "anycable", "protocol": "actioncable-v1-msgpack", "concurrentSubscribes": False},
        id="anycable-msgpack-linearized",
    ),
]


@pytest.mark.parametrize("options", SCENARIOS)
async def test_js_client(
    node_modules: Path, server: Server, nursery: trio.Nursery, options: dict[str, Any]
) -> None:
    signed = sign_stream(SECRET, "interop/signed")
    run = await run_node(
        nursery, {**options, "url": server.url + "?user=js", "signed": signed, "timeoutMs": 15000}
    )
    await run.wait_for("ready")
    await server.broadcast("interop", {"n": 1})
    await server.broadcast("interop/signed", {"n": 2})
    await run.wait_for("done")
    with trio.fail_after(5):
        while run.returncode is None:
            await trio.sleep(0.02)
    assert run.returncode == 0, run.lines
    echo = [line["data"] for line in run.of("message", channel="echo")]
    # Transmitted during subscribed() (before the confirmation), the action's reply, the broadcast.
    assert {"welcome_to": "interop", "who": {"user": "js"}} in echo
    assert {"text": f"hi from {options['client']}", "action": "echo"} in echo
    assert {"n": 1} in echo
    assert [line["data"] for line in run.of("message", channel="signed")] == [{"n": 2}]
    assert not run.of("rejected")


@pytest.mark.parametrize("protocol", ["actioncable-v1-ext-json", "actioncable-v1-msgpack"])
async def test_js_client_with_permessage_deflate(
    node_modules: Path, nursery: trio.Nursery, protocol: str
) -> None:
    """The ``ws`` package offers permessage-deflate by default: with ``--compression`` the
    server accepts, @anycable/core receives compressed broadcasts and transmissions, and the
    client's own compressed messages (``ws`` deflates those over 1 KiB) are inflated."""
    server = await nursery.start(
        Server(client_config(compression=True, compression_threshold=64), client_app()).serve
    )
    signed = sign_stream(SECRET, "interop/signed")
    long_text = "a long action argument, compressed by ws " * 50
    run = await run_node(
        nursery,
        {
            "client": "anycable",
            "protocol": protocol,
            "url": server.url + "?user=js",
            "signed": signed,
            "echoText": long_text,
            "timeoutMs": 15000,
        },
    )
    await run.wait_for("ready")
    big = {"n": 1, "text": "broadcast words " * 200}
    await server.broadcast("interop", big)
    await server.broadcast("interop/signed", {"n": 2, "text": "signed words " * 200})
    await run.wait_for("done")
    echo = [line["data"] for line in run.of("message", channel="echo")]
    assert big in echo
    assert {"text": long_text, "action": "echo"} in echo
    assert [line["data"]["n"] for line in run.of("message", channel="signed")] == [2]
    assert server.metrics.compressed_frames_total >= 3  # two broadcasts and the echo at least
    assert server.metrics.compressed_messages_total >= 1  # the client's long perform


async def test_js_client_rejected_signature(
    node_modules: Path, server: Server, nursery: trio.Nursery
) -> None:
    run = await run_node(
        nursery,
        {
            "client": "rails",
            "url": server.url,
            "signed": sign_stream("wrong secret", "interop/signed"),
            "timeoutMs": 5000,
        },
    )
    line = await run.wait_for("rejected")
    assert line["channel"] == "signed"


# -- drain and resume (server features of issue 4) -----------------------------------------------


@pytest.mark.skipif(
    not {"drain", "resume", "history"} <= SERVER_FEATURES,
    reason="server drain + resume + history: issue 4",
)
async def test_anycable_resumes_after_drain_without_gap(
    node_modules: Path, nursery: trio.Nursery
) -> None:
    """@anycable/core on the extended protocol: messages 1-3 live, then the server drains
    (server_restart), 4-6 are published while the client is away, a new server takes over the
    port with the same broker, 7-9 arrive live: the client sees 1..9, in order, once each."""
    from tests.client_support import RestartableServer

    rs = RestartableServer(nursery, drain_period=0.2)
    first = await rs.start()
    broker = first.broker
    rs.server_kwargs = {"broker": broker}  # the next server shares sessions and history
    run = await run_node(
        nursery,
        {
            "client": "anycable",
            "protocol": "actioncable-v1-ext-json",
            "mode": "resume",
            "url": rs.url,
            "signed": sign_stream(SECRET, "resume/1"),
            "expect": 9,
            "timeoutMs": 30000,
        },
    )
    await run.wait_for("ready")
    for n in (1, 2, 3):
        await first.broadcast("resume/1", n)
    await first.drain()  # type: ignore[attr-defined]
    await run.wait_for("disconnected")
    for n in (4, 5, 6):
        await first.broadcast("resume/1", n)
    await rs.stop()
    second = await rs.start()
    with trio.fail_after(20):
        while len(run.of("connected")) < 2:
            await run.wait_for("connected")
            await trio.sleep(0.05)
    # Restored or not (then @anycable/core re-subscribes with history), nothing may be lost.
    # Seen so far: it comes back restored:false after a drain, while trio_cable's own client
    # is restored in the same setup (tests/test_client_resume.py) - to be looked into.
    assert run.of("connected")[-1]["reconnect"] is True, json.dumps(run.lines)
    for n in (7, 8, 9):
        await second.broadcast("resume/1", n)
    await run.wait_for("done", timeout=20)
    assert [line["data"] for line in run.of("message", channel="signed")] == list(range(1, 10))
    assert {line["reason"] for line in run.of("disconnected")} <= {"server_restart", None}


# -- presence and whispers (issue 16) ----------------------------------------------------------


@pytest.mark.parametrize(
    "protocols",
    [
        ["actioncable-v1-ext-json", "actioncable-v1-ext-json"],
        ["actioncable-v1-ext-json", "actioncable-v1-ext-msgpack"],
    ],
    ids=["json-json", "json-msgpack"],
)
@pytest.mark.parametrize("kind", ["public", "signed"])
async def test_anycable_presence_and_whispers(
    node_modules: Path, nursery: trio.Nursery, protocols: list[str], kind: str
) -> None:
    """Two @anycable/core clients: each sees the other's join, info() lists both, a whisper
    reaches the other and not its sender, a leave is seen by the other."""
    config = client_config(public_streams=True, streams_whisper=True)
    server = await nursery.start(Server(config, client_app()).serve)
    stream = {"stream": "interop/room"}
    if kind == "signed":
        stream = {"signed": sign_stream(SECRET, "interop/room")}
    run = await run_node(
        nursery,
        {"url": server.url, "protocols": protocols, "timeoutMs": 20000, **stream},
        script="presence.mjs",
    )
    await run.wait_for("done", timeout=25)
    with trio.fail_after(5):
        while run.returncode is None:
            await trio.sleep(0.02)
    assert run.returncode == 0, run.lines
    both = {"a": {"name": "Alice"}, "b": {"name": "Bob"}}
    assert run.of("info", client="a")[0]["state"] == both
    assert run.of("info", client="b")[0]["state"] == both
    # b left nothing behind for itself; a's leave is applied to b's state.
    assert run.of("info", client="b-after-leave")[0]["state"] == {"b": {"name": "Bob"}}
    whispers = run.of("whispers")[0]
    assert whispers["a"] == [{"typing": "b"}] and whispers["b"] == [{"typing": "a"}]
    b_presence = [line["message"] for line in run.of("presence", client="b")]
    assert {"type": "join", "info": {"name": "Alice"}, "id": "a"} in b_presence
    assert {"type": "leave", "id": "a"} in b_presence
