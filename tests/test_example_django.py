"""The Django example (examples/django_rpc): a Django view sets the session, and the user is
identified from that session cookie by the SDK's RPC endpoint inside the Django project.

Django runs as a user runs it (``manage.py migrate``, ``manage.py runserver``) in a child
process; the test plays the real-time server's part in the RPC calls (the cookies of a
WebSocket request), and broadcasts reach a WebSocket client of a real trio_cable server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from trio_cable import Config, Server
from trio_cable.client import open_cable
from trio_cable.identity import JWTIdentifier
from trio_cable.rpc import derived_key, verify_stream

pytest.importorskip("django")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "django_rpc"
SECRET = "example-secret-for-the-django-test-0123456789"
RPC_HEADERS = {
    "authorization": f"Bearer {derived_key(SECRET, 'rpc')}",
    "x-anycable-meta-sid": "sid-42",
    "content-type": "application/json",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def django_site(tmp_path: Path, broadcast_url: str) -> Iterator[str]:
    """The example site, migrated and served by ``manage.py runserver``; yields its URL."""
    env = {
        **os.environ,
        "DJANGO_RPC_DB": str(tmp_path / "db.sqlite3"),
        "TRIO_CABLE_SECRET": SECRET,
        "CABLE_BROADCAST_URL": broadcast_url,
    }
    manage = [sys.executable, "manage.py"]
    subprocess.run(
        [*manage, "migrate", "--noinput", "-v", "0"], cwd=EXAMPLE, env=env, check=True, timeout=300
    )
    port = _free_port()
    log = (tmp_path / "runserver.log").open("wb")
    proc = subprocess.Popen(
        [*manage, "runserver", f"127.0.0.1:{port}", "--noreload"],
        cwd=EXAMPLE,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "runserver.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "runserver did not listen within 120 s"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


async def rpc(client: httpx.AsyncClient, site: str, method: str, body: Any) -> dict[str, Any]:
    response = await client.post(
        f"{site}/anycable/{method}", content=json.dumps(body), headers=RPC_HEADERS
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def test_the_websocket_user_is_the_django_session_user(tmp_path: Path) -> None:
    config = Config(port=0, secret=SECRET, public_streams=True)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(config).serve)
        with django_site(tmp_path, f"http://127.0.0.1:{server.port}/_broadcast") as site:
            async with (
                httpx.AsyncClient(timeout=30) as browser,
                httpx.AsyncClient(timeout=30) as cable_server,
            ):
                await _scenario(browser, cable_server, site, server.url)
        nursery.cancel_scope.cancel()


async def log_in(browser: httpx.AsyncClient, site: str, name: str) -> str:
    """Log in with the site's own form (CSRF token first); the session cookie's value."""
    form = await browser.get(f"{site}/login")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
    assert token is not None, form.text
    response = await browser.post(
        f"{site}/login", data={"username": name, "csrfmiddlewaretoken": token.group(1)}
    )
    assert response.status_code == 302, response.text
    session: str = browser.cookies["sessionid"]
    return session


async def _scenario(
    browser: httpx.AsyncClient, cable_server: httpx.AsyncClient, site: str, cable_url: str
) -> None:
    session = await log_in(browser, site, "ann")
    me = (await browser.get(f"{site}/me")).json()
    assert me["user"] == "ann"
    # what the page hands the client: a signed stream and a token the real-time server accepts
    assert verify_stream(SECRET, me["signed_stream"]) == "user/1"
    assert JWTIdentifier(SECRET).verify(me["token"]) == {"user_id": 1, "username": "ann"}

    # The WebSocket request brings the browser's cookies; the RPC connect reads the session.
    ws_env = {
        "url": "ws://127.0.0.1/cable",
        "headers": {"cookie": f"csrftoken=x; sessionid={session}", "REMOTE_ADDR": "127.0.0.1"},
    }
    answer = await rpc(cable_server, site, "connect", {"env": ws_env})
    assert answer["status"] == 1
    assert json.loads(answer["identifiers"]) == {"user_id": 1, "username": "ann"}
    assert answer["transmissions"] == ['{"type":"welcome","sid":"sid-42"}']
    for cookie in ("sessionid=forged", ""):
        stranger = {"env": {"url": "ws://127.0.0.1/cable", "headers": {"cookie": cookie}}}
        answer = await rpc(cable_server, site, "connect", {"env": stranger})
        assert answer["status"] == 2
    # Without the RPC key, Django's endpoint answers nobody.
    response = await cable_server.post(f"{site}/anycable/connect", content=b"{}")
    assert response.status_code == 401

    # Subscribe, and an action whose broadcast reaches the WebSocket clients of the room.
    lobby = '{"channel":"ChatChannel","room":"lobby"}'
    ids = '{"user_id":1,"username":"ann"}'
    answer = await rpc(
        cable_server,
        site,
        "command",
        {"command": "subscribe", "identifier": lobby, "connection_identifiers": ids, "env": ws_env},
    )
    assert answer["status"] == 1
    assert answer["streams"] == ["chat/lobby"]
    assert answer["presence"] == {"type": "join", "id": "1", "info": '{"name":"ann"}'}
    async with open_cable(cable_url) as cable:
        sub = await cable.subscribe("$pubsub", {"stream_name": "chat/lobby"})
        answer = await rpc(
            cable_server,
            site,
            "command",
            {
                "command": "message",
                "identifier": lobby,
                "connection_identifiers": ids,
                "data": '{"action":"speak","text":"hello from Django"}',
                "env": ws_env,
            },
        )
        assert answer["status"] == 1
        with trio.fail_after(30):
            async for message in sub:
                assert message.data == {"from": "ann", "text": "hello from Django"}
                break
    answer = await rpc(
        cable_server, site, "disconnect", {"identifiers": ids, "subscriptions": [lobby]}
    )
    assert answer == {"status": 1}
