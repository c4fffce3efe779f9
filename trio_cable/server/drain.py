"""Slow-drain shutdown: disconnect clients gradually, with advice on when to come back.

A hard stop makes every client reconnect in the same second, to whichever nodes remain: the
avalanche this project exists to prevent.  A drain instead (1) stops admitting connections and
turns ``/health`` to 503 so load balancers route elsewhere, (2) sends each client
``{"type":"disconnect","reason":"server_restart","reconnect":true,"reconnect_after":<ms>}``
and close code 1001 in paced batches spread over the drain period, each with its own jittered
advice, and (3) waits for the connections to finish (an in-flight command completes first).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Collection
from typing import Protocol

import trio

from trio_cable.config import Config
from trio_cable.metrics import Metrics
from trio_cable.protocol.codes import CloseCode, DisconnectReason
from trio_cable.server.admission import reconnect_after_ms

__all__ = ["Drainable", "Drainer"]

log = logging.getLogger("trio_cable.drain")

_BATCH_INTERVAL = 0.05  # seconds between batches: 20 small batches a second


class Drainable(Protocol):
    """What a drain needs of a connection."""

    @property
    def is_open(self) -> bool: ...

    def close(
        self,
        reason: DisconnectReason | None = None,
        *,
        reconnect: bool = True,
        code: int = CloseCode.NORMAL,
        reconnect_after_ms: int | None = None,
    ) -> None: ...

    def abort(self) -> None: ...


class Drainer:
    """The drain state of one server: *connections* is the server's live set of open
    connections (it shrinks as they go)."""

    def __init__(
        self, config: Config, metrics: Metrics, connections: Collection[Drainable]
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.connections = connections
        self.started = False
        self.finished = trio.Event()
        self._hurry = trio.Event()
        #: (time since the drain started, connections disconnected so far), per batch.
        self.progress: list[tuple[float, int]] = []

    def hurry(self) -> None:
        """Disconnect everybody still connected at once."""
        self._hurry.set()

    def _period(self, count: int, period: float | None) -> float:
        config = self.config
        period = config.drain_period if period is None else period
        if config.drain_rate > 0:
            period = max(period, count / config.drain_rate)
        return period

    async def drain(self, period: float | None = None) -> None:
        """Run the drain (see the module docstring); concurrent calls wait for the first."""
        if self.started:
            await self.finished.wait()
            return
        self.started = True
        config = self.config
        connections = self.connections
        start = trio.current_time()
        deadline = start + config.shutdown_timeout
        try:
            conns = [c for c in connections if c.is_open]
            random.shuffle(conns)  # no client group is always last
            total = len(conns)
            period = self._period(total, period)
            log.info("draining %d connections over %.1f s", total, period)
            done = 0
            last_log = start
            while done < total:
                now = trio.current_time()
                elapsed = now - start
                if self._hurry.is_set() or period <= 0 or now >= deadline:
                    target = total
                else:
                    target = min(total, math.ceil(total * (elapsed + _BATCH_INTERVAL) / period))
                for conn in conns[done:target]:
                    self._disconnect(conn)
                done = max(done, target)
                self.progress.append((elapsed, done))
                if now - last_log >= 1.0:
                    last_log = now
                    log.info("drain: %d of %d disconnected", done, total)
                if done < total:
                    with trio.move_on_after(_BATCH_INTERVAL):
                        await self._hurry.wait()
            # Connections that finished their handshake after the snapshot.
            for conn in list(connections):
                self._disconnect(conn)
            with trio.move_on_at(deadline):
                while connections:
                    await trio.sleep(0.02)
            left = len(connections)
            if left:
                log.warning("drain: shutdown timeout, cutting %d connections", left)
                for conn in list(connections):
                    conn.abort()
            log.info("drain finished in %.1f s", trio.current_time() - start)
        finally:
            self.finished.set()

    def _disconnect(self, conn: Drainable) -> None:
        if not conn.is_open:
            return
        self.metrics.drained_total += 1
        conn.close(
            DisconnectReason.SERVER_RESTART,
            reconnect=True,
            code=CloseCode.GOING_AWAY,
            reconnect_after_ms=reconnect_after_ms(0.0, self.config.reconnect_advice),
        )
