"""Mode ``wsbench``: websocket-bench style stepped broadcast run (bench 4).

What websocket-bench (``broadcast --server-type actioncable``) does, step by step: add
``step`` clients; keep ``concurrent`` broadcasts in flight, each sent by a random client
through BenchmarkChannel's ``broadcast`` action; a broadcast's *RTT* is the time until its
sender gets the ``broadcastResult`` transmission, and when one comes back the next broadcast is
sent, until ``sample`` results; stop once the step's p95 RTT exceeds the limit.  Other
recipients only count what they get.

Two additions, so that the RTT cannot hide a slow fan-out: every client counts its broadcasts
(a step with a delivery missing after the wait fails), and one client in ``_SAMPLE_EVERY``
times every delivery it gets from the sender's send (*delivery* latency: the whole fan-out,
not just the sender's reply).  Only a sample of recipients parses the payload, so that the
load generator, which has one core, spends its time reading sockets.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from bench.loadgen.broadcast import STAMP, latency_summary, trigger_message
from bench.loadgen.client import Client, connect_many
from bench.loadgen.server_probe import ServerProbe

_RESULT = b"broadcastResult"
_PING = b'"type":"ping"'
_SAMPLE_EVERY = 10
_RESULT_TIMEOUT = 30.0
_DELIVERY_TIMEOUT = 20.0


class Step:
    """One step's bookkeeping: results, sampled deliveries, delivery count."""

    def __init__(self, clients: list[Client], sampled: set[int]) -> None:
        self.clients = clients
        self.sampled = sampled
        self.rtt_ns: list[int] = []
        self.delivery_ns: list[int] = []
        self.delivered = 0
        self.sent = 0
        self.wanted = 0
        self.results_done = asyncio.Event()
        self.deliveries_done = asyncio.Event()

    def on_data(self, client: Client, payload: bytes) -> None:
        if _PING in payload:
            return  # the server's pings are not deliveries
        if _RESULT in payload:
            m = STAMP.search(payload)
            if m is not None:
                self.rtt_ns.append(time.perf_counter_ns() - int(m.group(1)))
                self._next()
            return
        self.delivered += 1
        if id(client) in self.sampled:
            m = STAMP.search(payload)
            if m is not None:
                self.delivery_ns.append(time.perf_counter_ns() - int(m.group(1)))
        self._check_done()

    def send_one(self) -> None:
        self.sent += 1
        random.choice(self.clients).send_text(trigger_message("cable", time.perf_counter_ns()))

    def _next(self) -> None:
        if self.sent < self.wanted:
            self.send_one()
        self._check_done()

    def _check_done(self) -> None:
        if len(self.rtt_ns) >= self.wanted:
            self.results_done.set()
            if self.delivered >= self.sent * len(self.clients):
                self.deliveries_done.set()

    async def run(self, concurrent: int, sample: int) -> int:
        """Send *sample* broadcasts, *concurrent* in flight; return deliveries missed."""
        self.wanted = sample
        for _ in range(min(concurrent, sample)):
            self.send_one()
        try:
            async with asyncio.timeout(_RESULT_TIMEOUT):
                await self.results_done.wait()
            async with asyncio.timeout(_DELIVERY_TIMEOUT):
                await self.deliveries_done.wait()
        except TimeoutError:
            pass
        return max(0, self.sent * len(self.clients) - self.delivered)


async def run_wsbench(
    url: str, step: int, steps: int, concurrent: int, sample: int, limit_ms: float,
    server_pid: int,
) -> dict[str, Any]:  # fmt: skip
    """One row per step: clients, RTT and delivery percentiles, server CPU; stops past
    *limit_ms* (p95 RTT) or at the first step that misses a delivery."""
    probe = ServerProbe(server_pid)
    clients: list[Client] = []
    rows = []
    reached = 0
    reached_delivery = 0
    delivery_ok = True
    for _ in range(steps):
        clients.extend(await connect_many(url, "cable", step))
        await asyncio.sleep(0.3)
        sampled = {id(c) for c in clients[::_SAMPLE_EVERY]}
        state = Step(clients, sampled)
        for client in clients:
            client.on_data = state.on_data
        cpu0, t0 = probe.cpu(), time.perf_counter()
        missed = await state.run(concurrent, sample)
        cpu1, t1 = probe.cpu(), time.perf_counter()
        rtt = latency_summary(state.rtt_ns)
        delivery = latency_summary(state.delivery_ns)
        rows.append({
            "clients": len(clients),
            "broadcasts": state.sent,
            "results": len(state.rtt_ns),
            "delivered": state.delivered,
            "missed": missed,
            "seconds": t1 - t0,
            "server_cpu_util": (cpu1 - cpu0) / (t1 - t0),
            "server_cpu_us_per_recipient": (
                (cpu1 - cpu0) / state.delivered * 1e6 if state.delivered else None
            ),
            "rss_bytes": probe.rss(),
            **rtt,
            **{f"delivery_{k}": v for k, v in delivery.items()},
        })  # fmt: skip
        if missed or rtt["p95_ms"] is None or len(state.rtt_ns) < sample:
            break
        delivery_ok = delivery_ok and (delivery["p95_ms"] or 0.0) <= limit_ms
        if delivery_ok:
            reached_delivery = len(clients)
        if rtt["p95_ms"] > limit_ms:
            break
        reached = len(clients)
    for client in clients:
        client.close()
    return {
        "mode": "wsbench",
        "limit_ms": limit_ms,
        "clients_reached": reached,
        "clients_reached_delivery": reached_delivery,
        "steps": rows,
    }
