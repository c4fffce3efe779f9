"""The demo application of the avalanche experiments (``--channels bench.avalanche.app:app``).

What makes a reconnect avalanche expensive is the application work behind every connect and
subscribe: authorizing the user and loading state.  Both callbacks here cost

- ``AVALANCHE_CPU_MS`` of CPU on the server's event loop (a busy loop: Ruby/Python code that
  builds the user, renders the initial state), and
- one query to a simulated database: a pool of ``AVALANCHE_DB_POOL`` connections, each query
  holding one for ``AVALANCHE_DB_MS`` (the queries queue for a free connection, the way an
  ActiveRecord pool does).

Connections are identified by the ``uid`` query parameter; ``AvalancheChannel`` streams from
its ``stream`` parameter.  :data:`stats` tracks the pool for the benchmark's sampler.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from trio_cable.channels import CableApp, Channel, ConnectRequest


@dataclass
class Cost:
    """The cost of one callback, and the simulated database's pool."""

    cpu_ms: float = float(os.environ.get("AVALANCHE_CPU_MS", "0.1"))
    db_pool: int = int(os.environ.get("AVALANCHE_DB_POOL", "8"))
    db_ms: float = float(os.environ.get("AVALANCHE_DB_MS", "5"))
    _pool: trio.CapacityLimiter | None = field(default=None, repr=False)

    @property
    def pool(self) -> trio.CapacityLimiter:
        # Created on first use: a CapacityLimiter belongs to the trio run that uses it.
        if self._pool is None:
            self._pool = trio.CapacityLimiter(max(1, self.db_pool))
        return self._pool


@dataclass
class Stats:
    """What the database pool went through (read by the server process's sampler)."""

    calls: int = 0
    waiting_peak: int = 0

    def waiting(self) -> int:
        """Callbacks queued for a database connection right now."""
        return cost.pool.statistics().tasks_waiting

    def busy(self) -> int:
        """Database connections in use right now."""
        return cost.pool.statistics().borrowed_tokens


cost = Cost()
stats = Stats()


async def _callback_work() -> None:
    """CPU work, then one query through the bounded pool."""
    stats.calls += 1
    if cost.cpu_ms > 0:
        end = time.perf_counter() + cost.cpu_ms / 1000
        while time.perf_counter() < end:  # bounded: at most cpu_ms
            pass
    pool = cost.pool
    waiting = pool.statistics().tasks_waiting + 1
    stats.waiting_peak = max(stats.waiting_peak, waiting)
    async with pool:
        await trio.sleep(cost.db_ms / 1000)


app = CableApp()


@app.connect
async def connect(request: ConnectRequest) -> dict[str, Any]:
    """Identify the user (``?uid=``) after the usual database lookup."""
    await _callback_work()
    return {"user_id": request.query.get("uid", "anonymous")}


@app.channel
class AvalancheChannel(Channel):
    """Authorize (CPU + one query), then stream from ``params["stream"]``."""

    async def subscribed(self) -> None:
        await _callback_work()
        stream = self.params.get("stream")
        if not isinstance(stream, str):
            self.reject()
            return
        self.stream_from(stream)
