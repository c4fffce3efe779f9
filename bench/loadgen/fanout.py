"""Mode ``broadcast``: sequential broadcasts to N connections (bench 3)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.loadgen.broadcast import Fanout, latency_summary
from bench.loadgen.client import connect_many
from bench.loadgen.server_probe import ServerProbe

_TIMEOUT = 30.0


async def run_broadcast(
    url: str, dialect: str, conns: int, count: int, warmup: int, min_seconds: float,
    server_pid: int, *, compression: bool = False, payload_size: int = 0, interval: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """Server CPU per recipient, delivered messages/s and latency percentiles.

    At least *count* broadcasts, and more (up to 20 times as many) until *min_seconds* passed,
    so that the CPU time measured is well above the clock's resolution.  With *interval*, a
    broadcast starts at most every *interval* seconds (a steady feed rather than a saturating
    one: the trigger stays within a server's per-connection command rate).
    """
    probe = ServerProbe(server_pid)
    clients = await connect_many(url, dialect, conns, compression=compression)
    fan = Fanout(dialect, payload_size)
    for client in clients:
        client.on_data = fan.on_data
    trigger = clients[0]
    await asyncio.sleep(0.5)
    for _ in range(warmup):
        await fan.broadcast(trigger, conns, _TIMEOUT)
    fan.latencies_ns.clear()
    for client in clients:
        client.wire_bytes = 0
    missed = 0
    cpu0, t0 = probe.cpu(), time.perf_counter()
    sent = 0
    while sent < count or (time.perf_counter() - t0 < min_seconds and sent < 20 * count):
        started = time.perf_counter()
        missed += await fan.broadcast(trigger, conns, _TIMEOUT)
        sent += 1
        if missed:
            break
        if interval:
            await asyncio.sleep(max(0.0, started + interval - time.perf_counter()))
    cpu1, t1 = probe.cpu(), time.perf_counter()
    for client in clients:
        client.close()
    delivered = len(fan.latencies_ns)
    # The trigger also gets its action's answer (the payload again): left out of the bytes.
    received = sum(client.wire_bytes for client in clients[1:])
    return {
        "mode": "broadcast",
        "conns": conns,
        "broadcasts": sent,
        "delivered": delivered,
        "missed": missed,
        "frame_bytes": fan.frame_bytes,
        "wire_bytes_per_recipient": received / (sent * (conns - 1)) if sent and conns > 1 else None,
        "seconds": t1 - t0,
        "delivered_per_s": delivered / (t1 - t0),
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_us_per_recipient": (cpu1 - cpu0) / delivered * 1e6 if delivered else None,
        **latency_summary(fan.latencies_ns),
    }
