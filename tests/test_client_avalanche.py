"""200 clients, one server restart: do reconnect attempts spread as the strategy says?

The server is stopped (every connection dropped at once, like a crash) and started again on
the same port.  Every client's reconnect attempts are timed through its ``on_event`` hook.
Each client has its own seeded ``random.Random``, so the delays *chosen* are deterministic:
the shape of the herd or of the spread is checked on them, tightly, against the formula.
The *measured* attempts are checked client by client against that client's own delay: never
earlier, and later only by as much as the event loop itself was late at that moment (a
:class:`LoopLag` probe runs beside the clients).  On a quiet machine that is a few
milliseconds; on a loaded 2-core machine the loop can stall for a second, and a fixed slack
either fails correct code there or lets wrong code pass on a quiet machine.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
import trio

from tests.client_support import SERVER_FEATURES, LoopLag, RestartableServer
from trio_cable.client import Backoff, CableEvent, open_cable

# 200 clients, a server crash and 200 reconnections per test: ~2.5 s each, CPU-bound.
pytestmark = pytest.mark.slow

CLIENTS = 200
# A reconnect attempt may be this much later than its timer, beyond the loop's own measured
# lateness around it: the probe and the client run in the same batches of ready tasks, so the
# probe sees a long batch only on its next run.  (Measured: at most 0.08 s under 4 CPU hogs.)
SLACK = 0.25


def ks_uniform(values: list[float], low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between ``values`` and uniform(low, high)."""
    xs = sorted((v - low) / (high - low) for v in values)
    n = len(xs)
    return max(max((i + 1) / n - x, x - i / n) for i, x in enumerate(xs))


@dataclass
class Restart:
    """Per client, after the crash: the first delay chosen, when the first attempt was made
    (measured from the moment the client noticed the connection was gone), how late that
    attempt was after its timer, and how late it was allowed to be."""

    chosen: list[float]
    attempts: list[float]
    lateness: list[float]
    allowed: list[float]

    def assert_every_client_kept_its_delay(self) -> None:
        for i, (late, allowed) in enumerate(zip(self.lateness, self.allowed, strict=True)):
            # trio never wakes a sleeper early; the clock is the same on both sides.
            assert late >= 0.0, (i, self.chosen[i], late)
            assert late <= allowed, (i, self.chosen[i], late, allowed)
            assert self.attempts[i] >= self.chosen[i], (i, self.chosen[i], self.attempts[i])


async def restart_and_measure(nursery: trio.Nursery, backoff: Backoff, **cable: Any) -> Restart:
    rs = RestartableServer(nursery)
    await rs.start()
    events: list[list[CableEvent]] = [[] for _ in range(CLIENTS)]
    ready = 0
    done = trio.Event()
    lag = LoopLag()

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
        with trio.fail_after(60):
            while ready < CLIENTS:
                await trio.sleep(0.05)
        clients.start_soon(lag.run)
        crash = trio.current_time()
        await rs.stop()
        await rs.start()
        with trio.fail_after(120):
            while sum(1 for ev in events if _count(ev, "subscribed") >= 2) < CLIENTS:
                await trio.sleep(0.05)
        # Everybody is back and re-subscribed.
        done.set()
        lag.stop()
    chosen, attempts, lateness, allowed = [], [], [], []
    for ev in events:
        after = [e for e in ev if e.time >= crash]
        seen = next(e for e in after if e.kind == "disconnected")
        scheduled = next(e for e in after if e.kind == "reconnect_scheduled")
        attempt = next(e for e in after if e.kind == "connecting")
        assert scheduled.delay is not None
        # A sanity bound only (the server tears 200 connections down in a moment).
        assert seen.time - crash < 10.0
        due = scheduled.time + scheduled.delay
        chosen.append(scheduled.delay)
        attempts.append(attempt.time - seen.time)
        lateness.append(attempt.time - due)
        allowed.append(lag.worst(due, attempt.time + 0.5) + SLACK)
    return Restart(chosen, attempts, lateness, allowed)


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
    m = await restart_and_measure(nursery, Backoff("full_jitter", base=1.0, cap=1.0))
    assert all(0.0 <= d < 1.0 for d in m.chosen)
    assert ks_uniform(m.chosen, 0.0, 1.0) < 0.14  # far from the 0.1 % critical value
    # Spread: every quarter of [0, 1) gets a share, no 100 ms burst holds half.
    for q in range(4):
        share = sum(q * 0.25 <= d < (q + 1) * 0.25 for d in m.chosen) / CLIENTS
        assert 0.1 < share < 0.45, (q, share)
    assert busiest_window(m.chosen, 0.1) < CLIENTS // 2
    m.assert_every_client_kept_its_delay()


async def test_equal_jitter_spreads_over_upper_half(nursery: trio.Nursery) -> None:
    m = await restart_and_measure(nursery, Backoff("equal_jitter", base=1.0, cap=1.0))
    assert all(0.5 <= d <= 1.0 for d in m.chosen)
    assert ks_uniform(m.chosen, 0.5, 1.0) < 0.14
    assert max(m.chosen) - min(m.chosen) > 0.3
    m.assert_every_client_kept_its_delay()


async def test_decorrelated_jitter_spreads_between_base_and_three_base(
    nursery: trio.Nursery,
) -> None:
    m = await restart_and_measure(nursery, Backoff("decorrelated_jitter", base=0.25, cap=2.0))
    assert all(0.25 <= d <= 0.75 for d in m.chosen)
    assert ks_uniform(m.chosen, 0.25, 0.75) < 0.14
    assert max(m.chosen) - min(m.chosen) > 0.25
    m.assert_every_client_kept_its_delay()


@pytest.mark.parametrize("strategy", ["exponential", "none"])
async def test_unjittered_strategies_come_back_as_a_herd(
    nursery: trio.Nursery, strategy: str
) -> None:
    # The baseline the jittered strategies exist to avoid: everybody at the same instant.
    # (It used to be measured as ">90 % of the attempts in one 0.25 s window", which a loop
    # stall in the middle of the herd split: 133 of 200 on a busy machine.)
    m = await restart_and_measure(
        nursery,
        Backoff(strategy, base=0.5, cap=4.0),  # type: ignore[arg-type]
    )
    assert set(m.chosen) == {0.5}
    m.assert_every_client_kept_its_delay()


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
