"""One ``/health`` and one ``/metrics`` for the workers of ``trio-cable serve --workers N``.

The kernel hands each connection to one of the workers listening on the port
(``SO_REUSEPORT``), so a scrape reaches any of them; each must answer for the whole server.
Every worker writes a snapshot of its metrics and health to Redis about once a second (a
field of one hash per supervisor, see :mod:`trio_cable.broker.redis`), and the worker that
answers a scrape adds up the snapshots of the live ones (its own figures it reads fresh):

- counters (plain, labeled, the broker's) and histograms (bucket counts, sums, counts) are
  summed, plus the ``retired`` total of workers that left, so that a restarted worker does
  not make the server's counters go back;
- gauges are summed, except ``streams`` and ``draining``, which take the largest worker's
  (see :data:`trio_cable.metrics.MAXED_GAUGES`);
- ``trio_cable_workers`` says how many workers the answer covers, and
  ``trio_cable_worker_connections{worker,pid}`` how the connections are spread.

With ``--dashboard`` each snapshot also carries the worker's dashboard figures, and
``/_dashboard/data`` answers with the whole server's and every live worker's
(:func:`trio_cable.server.dashboard.combine`).

A snapshot older than :data:`STALE` seconds is a worker that died without leaving (kill
-9): the first reader to see it moves its counters into ``retired``.  A worker that was
only slow finds itself retired on its next write and goes on under a new name, counting
from the figures that were retired, so nothing is counted twice.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import trio
from prometheus_client.core import GaugeMetricFamily

from trio_cable.metrics import (
    Metrics,
    add_counters,
    export,
    from_export,
    merge_gauges,
    prometheus_text,
)
from trio_cable.server.dashboard import combine

log = logging.getLogger("trio_cable.cluster")

#: Seconds between a worker's snapshots.
PUBLISH_INTERVAL = 1.0
#: A snapshot this old belongs to a worker that is gone (a worker's loop may lag for seconds
#: on a machine that is busy: then it must not be counted as gone).
STALE = 10.0
#: Seconds of the readers' Redis wait before they answer with this worker's figures alone
#: (Prometheus' scrape timeout is 10 s by default).
READ_TIMEOUT = 3.0


class SnapshotStore(Protocol):
    """What the group needs of its broker (the Redis broker has it)."""

    async def put_worker_snapshot(self, group: str, member: str, text: str, ttl: float) -> bool:
        """Store *member*'s snapshot; False when it was retired."""

    async def worker_snapshots(self, group: str) -> dict[str, str]:
        """Every field of the group's hash."""

    async def retire_worker_snapshot(
        self, group: str, member: str, expected: str | None = None
    ) -> bool:
        """Move *member*'s counters into ``retired``; True when this call did it."""


class WorkerGroup:
    """This worker's part of the group *group* (one supervisor's workers)."""

    def __init__(
        self,
        store: SnapshotStore,
        group: str,
        index: int,
        metrics: Metrics,
        health: Callable[[], dict[str, Any]],
        *,
        dashboard: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.store = store
        self.group = group
        self.index = index
        self.metrics = metrics
        self.local_health = health
        #: This worker's dashboard figures (``--dashboard``), published with its snapshot.
        self.local_dashboard = dashboard
        self.member = self._new_member()
        # Counters already counted under a retired name of this worker (see the docstring).
        self._baseline: dict[str, float] = {}
        self._last_written: dict[str, float] = {}

    def _new_member(self) -> str:
        return f"{self.index}.{os.getpid()}.{secrets.token_hex(3)}"

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, float]]:
        """(this worker's snapshot, its absolute counters)."""
        counters, gauges = export(self.metrics)
        relative = {k: v - self._baseline.get(k, 0.0) for k, v in counters.items()}
        doc = {
            "t": time.time(),
            "worker": self.index,
            "pid": os.getpid(),
            "counters": relative,
            "gauges": gauges,
            "health": self.local_health(),
        }
        if self.local_dashboard is not None:
            doc["dashboard"] = self.local_dashboard()
        return doc, counters

    async def publish(self) -> None:
        """Write this worker's snapshot once (rebasing when it had been retired)."""
        doc, absolute = self._snapshot()
        ttl = 3 * STALE
        if not await self.store.put_worker_snapshot(self.group, self.member, json.dumps(doc), ttl):
            log.warning(
                "worker %d was counted as gone (stalled?): going on as a new member", self.index
            )
            self._baseline = self._last_written
            self.member = self._new_member()
            doc, absolute = self._snapshot()
            await self.store.put_worker_snapshot(self.group, self.member, json.dumps(doc), ttl)
        self._last_written = absolute

    async def run(self) -> None:
        """Publish every :data:`PUBLISH_INTERVAL` seconds until cancelled."""
        while True:
            try:
                with trio.fail_after(STALE):
                    await self.publish()
            except Exception as exc:  # Redis trouble: the broker logs and counts it
                log.debug("worker snapshot not written: %s", exc)
            await trio.sleep(PUBLISH_INTERVAL)

    async def leave(self) -> None:
        """Hand this worker's final counters to ``retired`` (on a clean exit)."""
        with trio.move_on_after(READ_TIMEOUT * 2):
            try:
                await self.publish()
                await self.store.retire_worker_snapshot(self.group, self.member)
            except Exception as exc:
                log.warning("worker %d: final snapshot not retired: %s", self.index, exc)

    async def _gather(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(whole-server counters, live workers' snapshots, this one's fresh and first)."""
        own, _absolute = self._snapshot()
        with trio.fail_after(READ_TIMEOUT):
            fields = await self.store.worker_snapshots(self.group)
        now = time.time()
        totals: dict[str, float] = {}
        add_counters(totals, own["counters"])
        live = [own]
        retired = fields.get("retired")
        if retired:
            add_counters(totals, json.loads(retired))
        for member, text in fields.items():
            if member == "retired" or member.startswith("gone:") or member == self.member:
                continue
            doc = json.loads(text)
            if now - float(doc.get("t", 0)) > STALE:
                with trio.fail_after(READ_TIMEOUT):
                    if await self.store.retire_worker_snapshot(self.group, member, text):
                        log.info("worker %s stopped reporting: its counters are retired", member)
                        add_counters(totals, doc["counters"])
                continue
            add_counters(totals, doc["counters"])
            live.append(doc)
        live.sort(key=lambda d: (d["worker"], d["pid"]))
        return totals, live

    async def metrics_text(self) -> bytes:
        """The whole server's ``/metrics`` (this worker's alone when Redis does not answer)."""
        try:
            counters, live = await self._gather()
        except Exception as exc:
            log.warning("aggregate metrics unavailable (%s): answering for this worker", exc)
            return prometheus_text(self.metrics, _worker_families([self._snapshot()[0]]))
        merged = from_export(counters, merge_gauges([d["gauges"] for d in live]))
        return prometheus_text(merged, _worker_families(live))

    async def health(self) -> dict[str, Any]:
        """The whole server's ``/health``: this worker's status, everyone's figures."""
        doc = self.local_health()
        try:
            _counters, live = await self._gather()
        except Exception as exc:
            log.warning("aggregate health unavailable (%s): answering for this worker", exc)
            live = [self._snapshot()[0]]
        healths = [d["health"] for d in live]
        doc["connections"] = sum(h["connections"] for h in healths)
        doc["streams"] = max(h["streams"] for h in healths)
        doc["workers"] = [
            {
                "worker": d["worker"],
                "pid": d["pid"],
                "status": d["health"]["status"],
                "connections": d["health"]["connections"],
                "uptime": d["health"]["uptime"],
            }
            for d in live
        ]
        return doc

    async def dashboard(self) -> dict[str, Any]:
        """The whole server's ``/_dashboard/data``: every live worker's figures added up,
        and each worker's under ``workers`` (this worker's alone when Redis does not
        answer)."""
        assert self.local_dashboard is not None, "the dashboard is off"
        try:
            _counters, live = await self._gather()
        except Exception as exc:
            log.warning("aggregate dashboard unavailable (%s): answering for this worker", exc)
            live = [self._snapshot()[0]]
        workers = [
            {"worker": d["worker"], "pid": d["pid"], **d["dashboard"]}
            for d in live
            if isinstance(d.get("dashboard"), dict)
        ]
        return combine(self.local_dashboard(), workers)


def _worker_families(live: list[dict[str, Any]]) -> list[GaugeMetricFamily]:
    count = GaugeMetricFamily(
        "trio_cable_workers", "worker processes this answer adds up", value=len(live)
    )
    spread = GaugeMetricFamily(
        "trio_cable_worker_connections",
        "open WebSocket connections, per worker",
        labels=["worker", "pid"],
    )
    for doc in live:
        spread.add_metric([str(doc["worker"]), str(doc["pid"])], doc["health"]["connections"])
    return [count, spread]
