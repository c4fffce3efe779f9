"""Proxy mode against an application written by others: an AnyCable HTTP RPC application
built with the npm package ``@anycable/serverless-js`` (its own Application and Channel
classes and its handler, tests/interop/rpc_app.mjs) runs under Node; real ``@rails/actioncable``
and ``@anycable/core`` clients (tests/interop/rpc_client.mjs) log in with a cookie through
trio_cable to it.  The application authenticates from the cookie, confirms and rejects
subscriptions, transmits and broadcasts (over trio_cable's ``POST /_broadcast``), and sees
the disconnect."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio

from tests.conftest import SECRET
from tests.test_interop import NodeRun, node_major, node_modules, run_node
from trio_cable import Config, Server

__all__ = ["node_modules"]  # the fixture, used by name

pytestmark = [
    pytest.mark.skipif(node_major() < 20, reason="interop tests need Node >= 20"),
    pytest.mark.slow,
]

INTEROP = Path(__file__).parent / "interop"
RPC_SECRET = "rpc-secret-for-the-interop-test"


def listening_socket() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0), backlog=128)


async def start_app(nursery: trio.Nursery, broadcast_port: int) -> tuple[NodeRun, int]:
    """The serverless-js application under Node (it needs the resolve hook for its ESM)."""
    app = await run_node(
        nursery,
        {
            "broadcastUrl": f"http://127.0.0.1:{broadcast_port}/_broadcast",
            "broadcastKey": SECRET,
            "rpcSecret": RPC_SECRET,
        },
        script="rpc_app.mjs",
        node_args=("--import", "./dir-imports.mjs"),
    )
    listening = await app.wait_for("listening")
    return app, int(listening["port"])


@pytest.mark.parametrize(
    "client",
    [
        pytest.param({"client": "rails"}, id="rails"),
        pytest.param({"client": "anycable", "protocol": "actioncable-v1-json"}, id="anycable"),
        pytest.param(
            {"client": "anycable", "protocol": "actioncable-v1-ext-json"}, id="anycable-ext"
        ),
    ],
)
async def test_serverless_js_application_through_trio_cable(
    nursery: trio.Nursery, node_modules: Path, client: dict[str, str]
) -> None:
    # The broadcast endpoint's port must be known before the application starts, and the
    # application's before the server starts: the server's socket is bound first.
    sock = listening_socket()
    app, app_port = await start_app(nursery, sock.getsockname()[1])
    config = Config(
        port=0,
        secret=SECRET,
        rpc_secret=RPC_SECRET,
        rpc_host=f"http://127.0.0.1:{app_port}/api/anycable",
        rpc_disconnect_rate=0,
    )
    server = Server(config, listen_socket=sock)
    await nursery.start(server.serve)
    url = f"ws://127.0.0.1:{server.port}/cable"
    run = await run_node(
        nursery,
        {**client, "url": url, "cookie": "user=alice; theme=dark", "user": "alice"},
        script="rpc_client.mjs",
    )
    await run.wait_for("done", timeout=20)
    # What the application saw: the cookie's user, both subscriptions, the action.
    assert app.of("connect", user="alice")
    assert app.of("subscribed", user="alice", room="42")
    assert app.of("subscribed", user="alice", room="secret")
    assert app.of("speak", user="alice", text="hello")
    assert not app.of("error"), app.lines
    # The client saw its transmission and the broadcast, and the rejection.
    assert run.of("rejected", room="secret")
    assert {"you_said": "hello"} in [line["data"] for line in run.of("message")]
    # It goes: the application hears of it, once, with its subscription.
    with trio.fail_after(20):
        while run.returncode is None:
            await trio.sleep(0.05)
    await app.wait_for("disconnect", timeout=15)
    assert app.of("disconnect", user="alice")
    assert app.of("unsubscribed", user="alice", room="42")


async def test_serverless_js_refuses_a_client_without_the_cookie(
    nursery: trio.Nursery, node_modules: Path
) -> None:
    sock = listening_socket()
    app, app_port = await start_app(nursery, sock.getsockname()[1])
    config = Config(
        port=0,
        secret=SECRET,
        rpc_secret=RPC_SECRET,
        rpc_host=f"http://127.0.0.1:{app_port}/api/anycable",
    )
    server = Server(config, listen_socket=sock)
    await nursery.start(server.serve)
    run = await run_node(
        nursery,
        {"client": "anycable", "url": f"ws://127.0.0.1:{server.port}/cable", "timeoutMs": 8000},
        script="rpc_client.mjs",
    )
    closed = await run.wait_for("closed", timeout=15)  # for good: no reconnect
    assert closed["reason"] == "unauthorized"
    assert app.of("connect", user=None)
    assert server.metrics.unauthorized_total >= 1
