"""Brooker's backoff experiment, reproduced as a pure discrete-event simulation (no sockets).

The model (Marc Brooker, "Exponential Backoff And Jitter", AWS Architecture Blog, 2015, and
the simulator published with it): N clients each want to update one database row exactly
once, with optimistic concurrency control.  A client *reads* the row's version, then
*writes* with that version; the write succeeds only if nobody else wrote in between (the
version still matches), otherwise the client backs off and starts over with a new read.
Every message (read request, read reply, write request, write reply) crosses a network whose
delay is ``|N(10 ms, 2 ms)|``.  All clients start at time 0.

- **calls** = write requests the server handled (successful and failed), i.e. the work the
  contention costs; the minimum is N.
- **completion** = simulated time at which the last client learnt that its write succeeded.

A write conflicts when another write lands between this client's read and its write: about
two network delays (~20 ms).  Without backoff, one or two clients win each ~40 ms round and
everybody else retries at once (calls grow ~N^2/k); capped exponential backoff without
jitter keeps the losers synchronized, so they collide again at every step until the cap
(2 s) paces them one success per 2 s; jitter spreads them so most writes find the row free.

Two sets of strategies are simulated: ``brooker`` uses the formulas of the published
simulator (the first retry waits ``expo(1) = 2 * base``; "none" retries at once), and
``trio_cable`` drives the same model with :class:`trio_cable.client.backoff.BackoffTimer`,
the code the client runs (its first retry uses ``base * 2**0``, and ``none`` waits ``base``).
"""

from __future__ import annotations

import heapq
import random
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from trio_cable.client.backoff import STRATEGIES, Backoff, BackoffTimer

BASE_MS = 5.0
CAP_MS = 2000.0
NET_MEAN_MS = 10.0
NET_SD_MS = 2.0
#: Reference reproduction at 100 clients (calls, completion in s), from the issue.
REFERENCE_100 = {
    "none": (2422, 2.0),
    "exponential": (1852, 63.4),
    "full_jitter": (812, 6.7),
    "equal_jitter": (796, 5.0),
    "decorrelated_jitter": (999, 4.7),
}

# One client's backoff: called with the number of failed attempts so far (1 for the first
# retry), returns the delay in ms.
DelayFn = Callable[[int], float]
DelayFactory = Callable[[random.Random], DelayFn]


def brooker_delay(strategy: str, base: float = BASE_MS, cap: float = CAP_MS) -> DelayFactory:
    """The published simulator's backoff classes, one closure per client."""

    def factory(rng: random.Random) -> DelayFn:
        sleep = base  # decorrelated jitter's state

        def delay(n: int) -> float:
            nonlocal sleep
            expo = min(cap, 2.0**n * base)
            if strategy == "none":
                return 0.0
            if strategy == "exponential":
                return expo
            if strategy == "full_jitter":
                return rng.uniform(0, expo)
            if strategy == "equal_jitter":
                return expo / 2 + rng.uniform(0, expo / 2)
            if strategy == "decorrelated_jitter":
                sleep = min(cap, rng.uniform(base, sleep * 3))
                return sleep
            raise ValueError(strategy)

        return delay

    return factory


def trio_cable_delay(strategy: str, base: float = BASE_MS, cap: float = CAP_MS) -> DelayFactory:
    """trio_cable's own :class:`BackoffTimer` (seconds converted to ms)."""
    policy = Backoff(strategy, base=base / 1000, cap=cap / 1000)  # type: ignore[arg-type]

    def factory(rng: random.Random) -> DelayFn:
        timer = BackoffTimer(policy, rng)

        def delay(_n: int) -> float:
            timer.failed()
            return timer.next_delay() * 1000

        return delay

    return factory


# Event kinds (ints are cheaper than strings in the heap tuples).
_READ, _READ_RSP, _WRITE, _WRITE_RSP = range(4)


def simulate(clients: int, delay_factory: DelayFactory, rng: random.Random) -> tuple[int, float]:
    """One run: (write calls, completion time in ms)."""
    gauss = rng.gauss
    delays = [delay_factory(rng) for _ in range(clients)]
    attempts = [0] * clients
    version = 0
    calls = 0
    now = 0.0
    seq = 0  # tie-breaker: equal times pop in insertion order, as in the reference
    queue: list[tuple[float, int, int, int, int]] = []
    for c in range(clients):
        queue.append((abs(gauss(NET_MEAN_MS, NET_SD_MS)), seq, _READ, c, 0))
        seq += 1
    heapq.heapify(queue)
    pop, push = heapq.heappop, heapq.heappush
    # Bounded: every client finishes with probability 1; the guard turns a modelling bug
    # into an error instead of a hang.
    for _ in range(50_000_000):
        if not queue:
            break
        now, _s, kind, c, payload = pop(queue)
        net = abs(gauss(NET_MEAN_MS, NET_SD_MS))
        if kind == _READ:  # server: reply with the current version
            push(queue, (now + net, seq, _READ_RSP, c, version))
        elif kind == _READ_RSP:  # client: write with the version it read
            push(queue, (now + net, seq, _WRITE, c, payload))
        elif kind == _WRITE:  # server: conditional write
            calls += 1
            ok = payload == version
            if ok:
                version += 1
            push(queue, (now + net, seq, _WRITE_RSP, c, int(ok)))
        else:  # client: done, or back off and read again
            if payload:
                continue
            attempts[c] += 1
            push(queue, (now + net + delays[c](attempts[c]), seq, _READ, c, 0))
        seq += 1
    else:
        raise RuntimeError("simulation did not finish")
    return calls, now


@dataclass
class Point:
    """Mean over runs at one client count."""

    clients: int
    calls: float
    time_ms: float
    calls_sd: float
    time_sd: float


def sweep(
    strategy: str,
    client_counts: Iterable[int],
    runs: int,
    *,
    impl: str = "brooker",
    seed: int = 1,
) -> list[Point]:
    """Mean calls and completion time for each client count (``runs`` runs each)."""
    make = brooker_delay if impl == "brooker" else trio_cable_delay
    factory = make(strategy)
    out = []
    for n in client_counts:
        rng = random.Random(f"{seed}-{impl}-{strategy}-{n}")
        results = [simulate(n, factory, rng) for _ in range(runs)]
        calls = [r[0] for r in results]
        times = [r[1] for r in results]
        out.append(
            Point(
                n,
                statistics.fmean(calls),
                statistics.fmean(times),
                statistics.stdev(calls) if runs > 1 else 0.0,
                statistics.stdev(times) if runs > 1 else 0.0,
            )
        )
    return out


def _sweep_job(args: tuple[str, tuple[int, ...], int, str]) -> tuple[str, str, list[Point]]:
    strategy, counts, runs, impl = args
    return impl, strategy, sweep(strategy, counts, runs, impl=impl)


def run_all(
    client_counts: tuple[int, ...], runs: int, *, processes: int = 1, progress: Callable[[], None]
) -> dict[str, dict[str, list[Point]]]:
    """Every strategy under both implementations: ``{impl: {strategy: [Point, ...]}}``."""
    jobs = [
        (s, client_counts, runs, impl) for impl in ("brooker", "trio_cable") for s in STRATEGIES
    ]
    out: dict[str, dict[str, list[Point]]] = {"brooker": {}, "trio_cable": {}}
    if processes > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            for impl, strategy, points in pool.imap_unordered(_sweep_job, jobs):
                out[impl][strategy] = points
                progress()
    else:
        for job in jobs:
            impl, strategy, points = _sweep_job(job)
            out[impl][strategy] = points
            progress()
    return out
