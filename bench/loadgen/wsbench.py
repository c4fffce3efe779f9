"""Mode ``wsbench``: websocket-bench style stepped broadcast run (bench 4).

Clients are added ``step`` at a time; at each step ``concurrent`` senders each send
broadcasts one after another (``sample`` in all) and every recipient's round trip (from
the sender's send to its arrival) is a sample.  The run stops once a step's p95 exceeds the
limit, like websocket-bench's ``--limit-percentile 95 --limit-rtt``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.loadgen.broadcast import Fanout, latency_summary
from bench.loadgen.client import Client, connect_many
from bench.loadgen.server_probe import ServerProbe

_TIMEOUT = 20.0


async def _sender(fan: Fanout, client: Client, clients: list[Client], quota: int) -> int:
    missed = 0
    for _ in range(quota):
        missed += await fan.broadcast(client, len(clients), _TIMEOUT)
    return missed


async def run_wsbench(
    url: str, step: int, steps: int, concurrent: int, sample: int, limit_ms: float,
    server_pid: int,
) -> dict[str, Any]:  # fmt: skip
    """One row per step: clients, p50/p95/p99 RTT, server CPU; stops past *limit_ms*."""
    probe = ServerProbe(server_pid)
    fan = Fanout("cable")
    clients: list[Client] = []
    rows = []
    reached = 0
    for _ in range(steps):
        added = await connect_many(url, "cable", step)
        for client in added:
            client.on_data = fan.on_data
        clients.extend(added)
        await asyncio.sleep(0.3)
        fan.latencies_ns.clear()
        senders = clients[:concurrent]
        quotas = [sample // concurrent + (i < sample % concurrent) for i in range(concurrent)]
        cpu0, t0 = probe.cpu(), time.perf_counter()
        missed = sum(
            await asyncio.gather(
                *(_sender(fan, s, clients, q) for s, q in zip(senders, quotas, strict=False))
            )
        )
        cpu1, t1 = probe.cpu(), time.perf_counter()
        lat = latency_summary(fan.latencies_ns)
        delivered = len(fan.latencies_ns)
        rows.append({
            "clients": len(clients),
            "broadcasts": sample,
            "delivered": delivered,
            "missed": missed,
            "seconds": t1 - t0,
            "server_cpu_util": (cpu1 - cpu0) / (t1 - t0),
            "server_cpu_us_per_recipient": (cpu1 - cpu0) / delivered * 1e6 if delivered else None,
            "rss_bytes": probe.rss(),
            **lat,
        })  # fmt: skip
        if lat["p95_ms"] is None or lat["p95_ms"] > limit_ms or missed:
            break
        reached = len(clients)
    for client in clients:
        client.close()
    return {"mode": "wsbench", "limit_ms": limit_ms, "clients_reached": reached, "steps": rows}
