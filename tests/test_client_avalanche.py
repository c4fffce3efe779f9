"""200 clients, one server restart: do reconnect attempts spread as the strategy says?

The server is stopped (every connection dropped at once, like a crash) and started again on
the same port.  Every client's reconnect attempts are timed through its ``on_event`` hook.
Each client has its own seeded ``random.Random``, so the delays *chosen* are deterministic and
checked tightly against the formula; the *measured* attempt times include scheduling noise
and are checked with generous bounds.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio

from tests.client_support import SERVER_FEATURES, RestartableServer
from trio_cable.client import Backoff, CableEvent, open_cable

CLIENTS = 200
# Slack for the measured times: 200 clients and the server share one event loop.
LATE = 0.6


def ks_uniform(values: list[float], low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between ``values`` and uniform(low, high)."""
    xs = sorted((v - low) / (high - low) for v in values)
    n = len(xs)
    return max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(xs))


async def restart_and_measure(
    nursery: trio.Nursery, backoff: Backoff, **cable: Any
) -> tuple[list[float], list[float], RestartableServer]:
    """Per client: the first delay chosen after the crash, and when the first attempt was made,
    measured from the moment the client noticed the connection was gone."""
    rs = RestartableServer(nursery)
    await rs.start()
    events: list[list[CableEvent]] = [[] for _ in range(CLIENTS)]
    ready = 0
    done = trio.Event()

    async def client(i: int) -> None:
        nonlocal ready
        async with open_cable(
            rs.url,
            subprotocol="actioncable-v1-json",
            backoff=backoff,
            rng=random.Random(i),
            on_event=events[i].append,
            connect_timeout=20,
            **cable,
        ) as c:
            await c.subscribe("PlainChannel", {"stream": "all"})
            ready += 1
            await done.wait()

    async with trio.open_nursery() as clients:
        for i in range(CLIENTS):
            clients.start_soon(client, i)
        with trio.fail_after(30):
            while ready < CLIENTS:
                await trio.sleep(0.05)
        crash = trio.current_time()
        await rs.stop()
        await rs.start()
        with trio.fail_after(60):
            while sum(1 for ev in events if _count(ev, "subscribed") >= 2) < CLIENTS:
                await trio.sleep(0.05)
        # Everybody is back and re-subscribed: one broadcast reaches all.
        done.set()
    chosen, attempts, noticed = [], [], []
    for ev in events:
        after = [e for e in ev if e.time >= crash]
        chosen.append(next(e.delay for e in after if e.kind == "reconnect_scheduled"))
        seen = next(e.time for e in after if e.kind == "disconnected")
        noticed.append(seen - crash)
        attempts.append(next(e.time for e in after if e.kind == "connecting") - seen)
    # Tearing down 200 connections takes the server a moment; the clients notice within it.
    assert max(noticed) < 1.0
    return chosen, attempts, rs  # type: ignore[return-value]


def _count(events: list[CableEvent], kind: str) -> int:
    return sum(1 for e in events if e.kind == kind)


def busiest_window(times: list[float], width: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] < t - width:
            j += 1
        best = max(best, i - j + 1)
    return best


async def test_full_jitter_spreads_over_zero_to_cap(nursery: trio.Nursery) -> None:
    chosen, attempts, _ = await restart_and_measure(
        nursery, Backoff("full_jitter", base=1.0, cap=1.0)
    )
    assert all(0.0 <= d < 1.0 for d in chosen)
    assert ks_uniform(chosen, 0.0, 1.0) < 0.14  # far from the 0.1 % critical value
    assert all(-0.01 <= t <= 1.0 + LATE for t in attempts)
    # Spread, measured: every quarter of [0, 1) gets a share, no 100 ms burst holds half.
    for q in range(4):
        share = sum(q * 0.25 <= t < (q + 1) * 0.25 for t in attempts) / CLIENTS
        assert 0.1 < share < 0.45, (q, share)
    assert busiest_window(attempts, 0.1) < CLIENTS // 2


async def test_equal_jitter_spreads_over_upper_half(nursery: trio.Nursery) -> None:
    chosen, attempts, _ = await restart_and_measure(
        nursery, Backoff("equal_jitter", base=1.0, cap=1.0)
    )
    assert all(0.5 <= d <= 1.0 for d in chosen)
    assert ks_uniform(chosen, 0.5, 1.0) < 0.14
    assert all(0.45 <= t <= 1.0 + LATE for t in attempts)
    assert max(attempts) - min(attempts) > 0.3


async def test_decorrelated_jitter_spreads_between_base_and_three_base(
    nursery: trio.Nursery,
) -> None:
    chosen, attempts, _ = await restart_and_measure(
        nursery, Backoff("decorrelated_jitter", base=0.25, cap=2.0)
    )
    assert all(0.25 <= d <= 0.75 for d in chosen)
    assert ks_uniform(chosen, 0.25, 0.75) < 0.14
    assert all(0.2 <= t <= 0.75 + LATE for t in attempts)
    assert max(attempts) - min(attempts) > 0.25


@pytest.mark.parametrize("strategy", ["exponential", "none"])
async def test_unjittered_strategies_come_back_as_a_herd(
    nursery: trio.Nursery, strategy: str
) -> None:
    # The baseline the jittered strategies exist to avoid: everybody at the same instant.
    chosen, attempts, _ = await restart_and_measure(
        nursery,
        Backoff(strategy, base=0.5, cap=4.0),  # type: ignore[arg-type]
    )
    assert set(chosen) == {0.5}
    assert all(0.45 <= t <= 0.5 + LATE for t in attempts)
    assert busiest_window(attempts, 0.25) > CLIENTS * 0.9


@pytest.mark.skipif("drain" not in SERVER_FEATURES, reason="server drain: issue 4")
async def test_drain_advice_spreads_reconnects(nursery: trio.Nursery) -> None:
    """With a drain, the server's reconnect_after advice decides when clients come back."""
    rs = RestartableServer(nursery, drain_period=2.0)
    await rs.start()
    assert rs.server is not None
    events: list[list[CableEvent]] = [[] for _ in range(CLIENTS)]
    ready = 0
    done = trio.Event()

    async def client(i: int) -> None:
        nonlocal ready
        async with open_cable(
            rs.url,
            backoff=Backoff("full_jitter", base=0.05, cap=0.1),
            rng=random.Random(i),
            on_event=events[i].append,
        ):
            ready += 1
            await done.wait()

    async with trio.open_nursery() as clients:
        for i in range(CLIENTS):
            clients.start_soon(client, i)
        with trio.fail_after(30):
            while ready < CLIENTS:
                await trio.sleep(0.05)
        server = rs.server
        nursery.start_soon(server.drain)  # type: ignore[attr-defined]
        with trio.fail_after(30):
            while sum(1 for ev in events if _count(ev, "disconnected") >= 1) < CLIENTS:
                await trio.sleep(0.05)
        done.set()
    gone = [next(e for e in ev if e.kind == "disconnected") for ev in events]
    assert {e.reason for e in gone} == {"server_restart"}
    advised = [e.delay for e in gone if e.delay is not None]
    assert len(advised) == CLIENTS
    scheduled = [next(e for e in ev if e.kind == "reconnect_scheduled") for ev in events]
    # The advice wins over the strategy (cap 0.1 s), never shortened.
    for g, s in zip(gone, scheduled, strict=True):
        assert g.delay is not None and s.delay is not None and s.delay >= g.delay
