"""The live dashboard (``--dashboard``): off unless enabled, no data without the key, and in
headless Chromium its charts move while an avalanche of connections arrives."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from tests.browser_support import CHROMIUM, SKIP_REASON, chromium_page
from tests.conftest import RawClient, make_app
from trio_cable import Config, Server
from trio_cable.client.http import request

KEY = "dashboard-key-for-tests-0123456789"


def dashboard_config(**overrides: object) -> Config:
    settings: dict[str, object] = {
        "port": 0, "dashboard": True, "dashboard_key": KEY, "close_timeout": 1.0,
    }  # fmt: skip
    settings.update(overrides)
    return Config(**settings)  # type: ignore[arg-type]


async def test_off_unless_enabled(nursery: trio.Nursery) -> None:
    server = await nursery.start(Server(Config(port=0), make_app()).serve)
    for path in ("/_dashboard", "/_dashboard/data", "/_dashboard/dashboard.js"):
        answer = await request(f"http://127.0.0.1:{server.port}{path}")
        assert answer.status == 404, path


async def test_no_data_without_the_key(nursery: trio.Nursery) -> None:
    server = await nursery.start(Server(dashboard_config(), make_app()).serve)
    base = f"http://127.0.0.1:{server.port}/_dashboard"
    page = await request(base)
    assert page.status == 200 and b"<title>trio_cable</title>" in page.body
    for asset in ("/dashboard.js", "/uPlot.iife.min.js", "/uPlot.min.css"):
        assert (await request(base + asset)).status == 200
    assert (await request(base + "/nothing")).status == 404
    assert (await request(base + "/data")).status == 401
    wrong = await request(base + "/data", headers=[("authorization", "Bearer wrong")])
    assert wrong.status == 401 and b"connections" not in wrong.body
    right = await request(base + "/data", headers=[("authorization", f"Bearer {KEY}")])
    assert right.status == 200
    data = json.loads(right.body)
    assert data["connections"] == 0 and data["broker"]["kind"] == "MemoryBroker"
    assert {"accepted", "refused", "lag_max_ms", "gc_pause_max_ms", "drained"} <= set(data)


async def test_the_broadcast_key_opens_it_when_it_has_no_key_of_its_own(
    nursery: trio.Nursery,
) -> None:
    config = dashboard_config(dashboard_key=None, broadcast_key="b" * 32)
    server = await nursery.start(Server(config, make_app()).serve)
    url = f"http://127.0.0.1:{server.port}/_dashboard/data"
    assert (await request(url, headers=[("authorization", "Bearer " + "b" * 32)])).status == 200
    assert (await request(url)).status == 401


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason=SKIP_REASON)
async def test_charts_move_during_an_avalanche(nursery: trio.Nursery, tmp_path: Path) -> None:
    # A low handshake rate, so that the avalanche is refused in part (the refusals chart).
    config = dashboard_config(handshake_rate=50.0, adaptive_admission=False)
    server = await nursery.start(Server(config, make_app()).serve)
    page_url = f"http://127.0.0.1:{server.port}/_dashboard"
    async with chromium_page(page_url, tmp_path / "profile") as browser:
        # Without the key: the form, and not one point of data.
        await browser.wait_for("document.getElementById('login').style.display === 'block'")
        await trio.sleep(1.5)
        assert await browser.evaluate("dashboard.points.length") == 0
        assert await browser.evaluate("document.getElementById('conns')") is None
        # A wrong key is refused and forgotten.
        await browser.evaluate(
            "document.getElementById('key').value = 'wrong';"
            "document.getElementById('login').requestSubmit(); true"
        )
        await browser.wait_for("dashboard.status === 'refused'")
        assert await browser.evaluate("dashboard.points.length") == 0
        await browser.evaluate(
            f"document.getElementById('key').value = {KEY!r};"
            "document.getElementById('login').requestSubmit(); true"
        )
        await browser.wait_for("dashboard.points.length >= 2")
        clients: list[RawClient] = []
        refused = 0
        for _ in range(300):  # an avalanche: 300 handshakes as fast as they go
            client, head = await RawClient.open(server.port)
            if b" 101 " in head:
                clients.append(client)
            else:
                refused += 1
                await client.aclose()
        assert clients and refused
        await browser.wait_for(
            f"Math.max(...dashboard.points.map(p => p.connections[0])) >= {len(clients)}", 30
        )
        await browser.wait_for(
            "dashboard.points.some(p => p.handshakes[0] > 0) && "
            "dashboard.points.some(p => p.handshakes[1] > 0)",
            30,
        )
        assert await browser.evaluate("dashboard.reasons.length") >= 1
        # The status line shows the live count, drawn from the data.
        shown = await browser.evaluate("Number(document.getElementById('conns').textContent)")
        assert shown == len(clients)
        shot = os.environ.get("TRIO_CABLE_DASHBOARD_SCREENSHOT")
        if shot:
            Path(shot).write_bytes(await browser.screenshot())
        for client in clients:
            await client.aclose()


def test_workers_add_up_and_each_is_listed() -> None:
    """``serve --workers N``: the answering worker draws the whole server (sans I/O)."""
    from trio_cable.server.dashboard import combine

    def worker(index: int, conns: int, lag: float, refused: dict[str, int]) -> dict[str, object]:
        return {
            "worker": index, "pid": 100 + index, "time": 5.0, "node": f"w{index}",
            "connections": conns, "pending_handshakes": 1, "streams": 3 + index,
            "handshake_rate_limit": 500.0, "draining": index == 1, "accepted": 10 * conns,
            "handshakes_failed": 1, "refused": refused, "drained": 2, "rebalanced": 0,
            "lag_max_ms": lag, "lag_p99_ms": lag / 2, "gc_pause_max_ms": 0.5,
            "broker": {"kind": "RedisBroker", "connected": True},
        }  # fmt: skip

    own = worker(1, 7, 4.0, {"rate": 2})
    combined = combine(own, [own, worker(0, 5, 9.0, {"rate": 1, "pending": 4})])
    assert combined["connections"] == 12 and combined["accepted"] == 120
    assert combined["handshake_rate_limit"] == 1000.0 and combined["pending_handshakes"] == 2
    assert combined["refused"] == {"rate": 3, "pending": 4}
    assert combined["lag_max_ms"] == 9.0 and combined["streams"] == 4
    assert combined["draining"] is True and combined["node"] == "trio_cable, 2 workers"
    assert [(w["worker"], w["connections"], w["lag_max_ms"]) for w in combined["workers"]] == [
        (0, 5, 9.0), (1, 7, 4.0),
    ]  # fmt: skip
    assert combined["broker"] == own["broker"]
    # One process (no group): its own figures, unchanged, and no per-worker list.
    assert combine(own, []) is own
