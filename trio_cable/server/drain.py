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
from typing import TYPE_CHECKING

import trio

from trio_cable.server.admission import reconnect_after_ms
from trio_cable.server.connection import CLOSE_GOING_AWAY, Connection, State

if TYPE_CHECKING:
    from trio_cable.server.node import Server

log = logging.getLogger("trio_cable.drain")

_BATCH_INTERVAL = 0.05  # seconds between batches: 20 small batches a second


class Drainer:
    """The drain state of one server."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.started = False
        self.finished = trio.Event()
        self._hurry = trio.Event()
        #: (time since the drain started, connections disconnected so far), per batch.
        self.progress: list[tuple[float, int]] = []

    def hurry(self) -> None:
        """Disconnect everybody still connected at once."""
        self._hurry.set()

    def _period(self, count: int, period: float | None) -> float:
        config = self.server.config
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
        server = self.server
        config = server.config
        start = trio.current_time()
        deadline = start + config.shutdown_timeout
        try:
            conns = [c for c in server.connections if c.state is State.OPEN]
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
            for conn in list(server.connections):
                self._disconnect(conn)
            with trio.move_on_at(deadline):
                while server.connections:
                    await trio.sleep(0.02)
            left = len(server.connections)
            if left:
                log.warning("drain: shutdown timeout, cutting %d connections", left)
                for conn in list(server.connections):
                    conn.abort()
            log.info("drain finished in %.1f s", trio.current_time() - start)
        finally:
            self.finished.set()

    def _disconnect(self, conn: Connection) -> None:
        if conn.state is not State.OPEN:
            return
        config = self.server.config
        self.server.metrics.drained_total += 1
        conn.close(
            "server_restart",
            reconnect=True,
            code=CLOSE_GOING_AWAY,
            reconnect_after_ms=reconnect_after_ms(0.0, config.reconnect_advice),
        )
