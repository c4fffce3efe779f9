"""Rebalancing (``--rebalance``): a node holding noticeably more connections than the
cluster's mean hands the excess to the others, slowly.

Long-lived connections stay where they first landed.  After a rolling restart behind a
round-robin balancer the node restarted last is nearly empty while the first one holds
nearly twice its share (the rollout benchmark: 1.88x the mean; 1.48x with leastconn), and it
stays so for hours.  Each node publishes its connection count through the broker once a
second (a node command every node receives, the sender too); a node above the mean by more
than the tolerance disconnects some of its clients with reconnect advice, exactly as a drain
does (``server_restart``, jittered ``reconnect_after``, the session saved for resume), and the
load balancer sends them elsewhere.

The rules, so that rebalancing can never start an avalanche of its own:

- at most ``rebalance_rate`` disconnects per second per node, each client with its own
  jittered advice, so the reconnects arrive spread out too;
- never while any node drains, nor while a node that joined in the last ``SETTLE`` seconds is
  there: during a rolling restart nodes come and go, and the counts mean nothing yet;
- hysteresis: a node starts only above ``mean * (1 + tolerance)`` and stops at the mean, and
  nodes below the mean never start, so two nodes do not trade the same clients back and forth;
- clients disconnected in the last advice window (not yet back anywhere) still count as this
  node's when the mean is computed, so a node does not overshoot while they are in flight.

:class:`LoadTable` holds the decision (sans I/O, tested without sockets); :class:`Rebalancer`
runs it on a node.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import trio

from trio_cable.metrics import Metrics
from trio_cable.protocol.codes import CloseCode, DisconnectReason
from trio_cable.server.admission import reconnect_after_ms
from trio_cable.server.drain import Drainable

__all__ = ["INTERVAL", "SETTLE", "LoadTable", "Rebalancer"]

log = logging.getLogger("trio_cable.rebalance")

#: Seconds between load reports; a node unheard of for 3 of them is gone.
INTERVAL = 1.0
#: Seconds between hand-on steps: the rate's disconnects come in small batches, not one burst
#: a second.
_TICK = 0.1
#: Seconds a newly seen node (or a drain anywhere) holds rebalancing back.
SETTLE = 15.0


@dataclass
class NodeLoad:
    """What one node last said of itself."""

    connections: int
    draining: bool
    seen: float  # when the report arrived
    since: float  # when this node was first seen


class LoadTable:
    """Every node's last load report, and how many connections this node should hand on."""

    def __init__(self, node_id: str, tolerance: float, *, settle: float = SETTLE) -> None:
        self.node_id = node_id
        self.tolerance = tolerance
        self.settle = settle
        self.nodes: dict[str, NodeLoad] = {}
        #: True from crossing ``mean * (1 + tolerance)`` until back at the mean.
        self.active = False
        self._quiet_since = -math.inf  # the last time something held rebalancing back

    def update(self, node: str, connections: int, draining: bool, now: float) -> None:
        """Record a report of *node* (this one's own included)."""
        known = self.nodes.get(node)
        since = known.since if known is not None else now
        self.nodes[node] = NodeLoad(max(0, connections), draining, now, since)

    def live(self, now: float) -> dict[str, NodeLoad]:
        """The nodes heard of recently (the others are forgotten)."""
        horizon = now - 3 * INTERVAL
        for node in [n for n, load in self.nodes.items() if load.seen < horizon]:
            del self.nodes[node]
        return self.nodes

    def excess(self, connections: int, now: float, in_flight: int = 0) -> int:
        """How many of this node's *connections* to hand on now (0: none).

        *in_flight*: clients this node disconnected lately that have not come back anywhere
        yet; they count as this node's in the mean."""
        nodes = self.live(now)
        if any(load.draining for load in nodes.values()) or any(
            now - load.since < self.settle for n, load in nodes.items() if n != self.node_id
        ):
            self._quiet_since = now
        if len(nodes) < 2 or now - self._quiet_since < self.settle:
            self.active = False
            return 0
        others = sum(load.connections for n, load in nodes.items() if n != self.node_id)
        mean = (others + connections + in_flight) / len(nodes)
        if not self.active and connections > mean * (1 + self.tolerance):
            self.active = True
        if not self.active:
            return 0
        excess = connections - math.ceil(mean)
        if excess <= 0:
            self.active = False
            return 0
        return excess


class Rebalancer:
    """Runs the rebalancing of one node: reports its load and hands on its excess."""

    def __init__(
        self,
        node_id: str,
        *,
        tolerance: float,
        rate: float,
        reconnect_advice: float,
        metrics: Metrics,
        connections: Collection[Drainable],
        draining: Callable[[], bool],
        publish: Callable[[dict[str, Any]], Awaitable[None]],
        settle: float = SETTLE,
    ) -> None:
        self.node_id = node_id
        self.table = LoadTable(node_id, tolerance, settle=settle)
        self.rate = rate
        self.reconnect_advice = reconnect_advice
        self.metrics = metrics
        self.connections = connections
        self.draining = draining
        self.publish = publish
        self._moved: deque[tuple[float, int]] = deque()  # (when, how many)
        self._credit = 0.0  # disconnects the rate allows and that were not used yet
        # The steps of the last second, and the most disconnects any one second saw: the
        # rate's bound as it held (a second is (t - 1, t]; steps are >= _TICK apart, so at
        # most rate disconnects fit in one).
        self._last_second: deque[tuple[float, int]] = deque()
        self.peak_per_second = 0
        metrics.gauges["rebalance_peak_per_second"] = lambda: float(self.peak_per_second)

    def on_load(self, command: dict[str, Any]) -> None:
        """A ``load`` node command (from any node, this one too)."""
        try:
            node = str(command["node"])
            connections = int(command["connections"])
        except (KeyError, TypeError, ValueError):
            log.info("ignoring a malformed load report: %r", str(command)[:200])
            return
        self.table.update(node, connections, bool(command.get("draining")), trio.current_time())

    def in_flight(self, now: float) -> int:
        """Clients moved within the advice window (plus a margin): maybe not back yet."""
        horizon = now - self.reconnect_advice - 2 * INTERVAL
        while self._moved and self._moved[0][0] < horizon:
            self._moved.popleft()
        return sum(count for _, count in self._moved)

    async def run(self) -> None:
        """Report every :data:`INTERVAL` and hand on every ``_TICK``, until cancelled."""
        next_report = trio.current_time()
        while True:
            await trio.sleep(_TICK)
            now = trio.current_time()
            count = sum(1 for conn in self.connections if conn.is_open)
            draining = self.draining()
            if now >= next_report:
                next_report = now + INTERVAL
                try:
                    await self.publish(
                        {
                            "command": "load",
                            "node": self.node_id,
                            "connections": count,
                            "draining": draining,
                        }
                    )
                except Exception as exc:  # the broker logs and counts its own failures
                    log.debug("load report not sent: %s", exc)
            if not draining:
                self.step(count, trio.current_time(), _TICK)

    def step(self, count: int, now: float, elapsed: float = INTERVAL) -> int:
        """Hand on what the table says, within the rate for *elapsed* seconds; how many
        were disconnected."""
        was_active = self.table.active
        excess = self.table.excess(count, now, self.in_flight(now))
        if self.table.active != was_active:
            log.info(
                "rebalance: %s (%d connections here, %d nodes)",
                "handing on the excess" if self.table.active else "back at the mean",
                count,
                len(self.table.nodes),
            )
        if excess <= 0:
            self._credit = 0.0
            return 0
        # Unused credit does not pile up: at most one step's worth (or one connection).
        allowance = max(1.0, self.rate * elapsed)
        self._credit = min(self._credit + self.rate * elapsed, allowance)
        budget = min(excess, int(self._credit))
        moved = 0
        for conn in list(self.connections):
            if moved >= budget:
                break
            if not conn.is_open:
                continue
            conn.close(
                DisconnectReason.SERVER_RESTART,
                reconnect=True,
                code=CloseCode.GOING_AWAY,
                reconnect_after_ms=reconnect_after_ms(0.0, self.reconnect_advice),
            )
            moved += 1
        self._credit -= moved
        if moved:
            self._moved.append((now, moved))
            recent = self._last_second
            recent.append((now, moved))
            while recent[0][0] <= now - 1.0 + 1e-9:  # (a step exactly 1 s back is out)
                recent.popleft()
            self.peak_per_second = max(self.peak_per_second, sum(n for _, n in recent))
            self.metrics.rebalanced_total += moved
            log.debug(
                "rebalance: handed on %d connections (%d over the mean, %d held)",
                moved,
                excess,
                count,
            )
        return moved
