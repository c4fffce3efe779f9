"""Rebalancing (``--rebalance``): the decision without sockets, then two real nodes behind
the deploy kit's HAProxy, where a node that came up late gets its share of the clients,
with every message delivered once and in order, at a bounded rate, and no client traded back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from tests.conftest import make_app
from tests.test_deploy import _free_port, _wait_port, haproxy_config
from trio_cable import Config, Server
from trio_cable.broker.memory import MemoryBroker
from trio_cable.client import open_cable
from trio_cable.server.rebalance import INTERVAL, LoadTable

# -- the decision -------------------------------------------------------------------------------


def _table(settle: float = 0.0) -> LoadTable:
    table = LoadTable("me", 0.15, settle=settle)
    table.update("me", 0, False, 0.0)
    return table


def test_only_a_node_over_the_tolerance_hands_on_and_it_stops_at_the_mean() -> None:
    table = _table()
    table.update("other", 100, False, 0.0)
    # 114 vs 100: within 15 % of the mean (107): nothing.
    assert table.excess(114, 1.0) == 0
    # 130 vs 100: mean 115, over 115 * 1.15? No (132.25): still nothing.
    assert table.excess(130, 1.0) == 0
    # 200 vs 100: mean 150, over 172.5: hand on 50, down to the mean.
    assert table.excess(200, 1.0) == 50 and table.active
    # On the way down (hysteresis): 160 vs 140 is within the tolerance but over the mean.
    table.update("other", 140, False, 1.5)
    assert table.excess(160, 2.0) == 10
    table.update("other", 150, False, 2.5)
    assert table.excess(150, 3.0) == 0 and not table.active
    # The node under the mean never hands on.
    other = LoadTable("other", 0.15)
    other.update("me", 200, False, 0.0)
    assert other.excess(100, 1.0) == 0


def test_clients_in_flight_count_as_this_nodes() -> None:
    table = _table()
    table.update("other", 100, False, 0.0)
    assert table.excess(200, 1.0) == 50
    # 40 handed on, not back anywhere yet: the mean is still 150, so 10 more, not 30.
    assert table.excess(160, 1.5, in_flight=40) == 10


@pytest.mark.parametrize("case", ["draining", "new node", "alone"])
def test_held_back_while_the_cluster_is_changing(case: str) -> None:
    table = _table(settle=10.0)

    def report(now: float, *, draining: bool = False) -> None:
        table.update("me", 1000, False, now)  # every node reports itself too
        if case != "alone":
            table.update("other", 0, draining, now)

    if case == "new node":
        report(-30.0)
        table.nodes.pop("other")  # "other" is first seen at 5 (below)
    for now in range(7):
        if case != "new node" or now >= 5:
            report(float(now), draining=case == "draining")
        else:
            table.update("me", 1000, False, float(now))
    assert len(table.live(6.0)) == (1 if case == "alone" else 2)
    assert table.excess(1000, 6.0) == 0
    if case == "alone":
        return
    # Still held back for the settle time after the change ends.
    report(7.0)
    assert table.excess(1000, 8.0) == 0
    for now in range(9, 21):
        report(float(now))
    assert table.excess(1000, 20.5) == 500


def test_silent_nodes_are_forgotten() -> None:
    table = _table()
    table.update("other", 100, False, 0.0)
    assert "other" in table.live(2 * INTERVAL)
    assert "other" not in table.live(4 * INTERVAL)


# -- two real nodes behind HAProxy -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed")
async def test_a_late_node_gets_its_share_and_nothing_is_lost(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    broker = MemoryBroker(history_limit=1000)  # shared: sessions and history resume anywhere
    port_b = _free_port()

    def node_config(port: int) -> Config:
        return Config(
            port=port, close_timeout=1.0, reconnect_advice=1.0, rebalance=True,
            rebalance_rate=10.0, public_streams=True,
        )  # fmt: skip

    def settle_fast(server: Server) -> Server:
        assert server.rebalancer is not None
        server.rebalancer.table.settle = 1.0
        return server

    a = await nursery.start(settle_fast(Server(node_config(0), make_app(), broker=broker)).serve)
    port = _free_port()
    text, env = haproxy_config(
        f"127.0.0.1:{port}", "leastconn", [("127.0.0.1", a.port), ("127.0.0.1", port_b)]
    )
    (tmp_path / "haproxy.cfg").write_text(text)
    proxy = await trio.lowlevel.open_process(
        ["haproxy", "-f", str(tmp_path / "haproxy.cfg"), "-db"], env={**os.environ, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    clients = 30
    received: list[list[int]] = [[] for _ in range(clients)]
    ready = trio.Semaphore(0)

    async def client(index: int) -> None:
        async with open_cable(f"ws://127.0.0.1:{port}/cable") as cable:
            sub = await cable.subscribe("$pubsub", {"stream_name": "feed"})
            ready.release()
            async for message in sub:
                received[index].append(message.data)

    try:
        await _wait_port(port)
        await trio.sleep(1.0)  # HAProxy's first checks: node a up, node b down
        async with trio.open_nursery() as clients_nursery:
            for i in range(clients):
                clients_nursery.start_soon(client, i)
            with trio.fail_after(60):
                for _ in range(clients):
                    await ready.acquire()
            assert len(a.connections) == clients
            b = await nursery.start(
                settle_fast(Server(node_config(port_b), make_app(), broker=broker)).serve
            )
            published = 0

            def balanced() -> bool:
                counts = [len(a.connections), len(b.connections)]
                return sum(counts) == clients and max(counts) <= 1.15 * clients / 2

            with trio.fail_after(90):
                while not balanced():
                    published += 1
                    await a.broadcast("feed", published)
                    await trio.sleep(0.1)
            for _ in range(5):
                published += 1
                await b.broadcast("feed", published)
            with trio.fail_after(60):
                while any(len(r) < published for r in received):
                    await trio.sleep(0.05)
            clients_nursery.cancel_scope.cancel()
    finally:
        proxy.terminate()
        with trio.CancelScope(shield=True):
            await proxy.wait()
    # Every client got every message once, in order, across its move.
    assert all(r == list(range(1, published + 1)) for r in received), received
    moved = a.metrics.rebalanced_total
    assert 0 < moved < clients  # a handed on about half; at 10/s, over more than a second
    assert b.metrics.rebalanced_total == 0  # nothing traded back


class _Conn:
    """Stands in for a session: only what the rebalancer touches."""

    def __init__(self) -> None:
        self.is_open = True

    def close(self, *args: object, **kwargs: object) -> None:
        self.is_open = False

    def abort(self) -> None:
        self.is_open = False


def test_hand_on_rate_never_exceeds_the_bound() -> None:
    from trio_cable.metrics import Metrics
    from trio_cable.server.rebalance import Rebalancer

    conns = [_Conn() for _ in range(1000)]
    rebalancer = Rebalancer(
        "me", tolerance=0.15, rate=20.0, reconnect_advice=1.0, metrics=Metrics(),
        connections=conns, draining=lambda: False, publish=None,  # type: ignore[arg-type]
        settle=0.0,
    )  # fmt: skip
    now = 0.0
    per_second: dict[int, int] = {}
    for _ in range(300):  # 30 s of 0.1 s steps, the other node always empty
        rebalancer.table.update("other", 0, False, now)
        open_now = sum(c.is_open for c in conns)
        rebalancer.table.update("me", open_now, False, now)
        moved = rebalancer.step(open_now, now, 0.1)
        per_second[int(now)] = per_second.get(int(now), 0) + moved
        now = round(now + 0.1, 1)
    assert max(per_second.values()) <= 20  # the bound, every second
    assert sum(per_second.values()) >= 400  # and it does move (mean 500: it heads there)
    assert rebalancer.peak_per_second == 20


def test_the_peak_per_second_is_the_busiest_second_of_any_alignment() -> None:
    """The rebalancer's own account of its bound (the gauge the rollout benchmark reads):
    steps at uneven times, as a busy loop makes them, are >= 0.1 s apart, so no second
    (t - 1, t] holds more than the rate; the gauge is the busiest such second."""
    import random

    from trio_cable.metrics import Metrics
    from trio_cable.server.rebalance import Rebalancer

    conns = [_Conn() for _ in range(2000)]
    metrics = Metrics()
    rebalancer = Rebalancer(
        "me", tolerance=0.15, rate=20.0, reconnect_advice=1.0, metrics=metrics,
        connections=conns, draining=lambda: False, publish=None,  # type: ignore[arg-type]
        settle=0.0,
    )  # fmt: skip
    rng = random.Random(15)
    now = 0.0
    steps: list[tuple[float, int]] = []
    for _ in range(400):
        rebalancer.table.update("other", 0, False, now)
        open_now = sum(c.is_open for c in conns)
        rebalancer.table.update("me", open_now, False, now)
        steps.append((now, rebalancer.step(open_now, now, 0.1)))
        now += 0.1 + rng.choice([0.0, 0.0, 0.001, 0.03, 0.2])  # a late loop now and then
    busiest = max(sum(n for u, n in steps if t - 1.0 < u <= t) for t, _ in steps)
    assert 0 < busiest <= 20
    assert rebalancer.peak_per_second == busiest
    assert metrics.gauges["rebalance_peak_per_second"]() == busiest
