"""Mode ``idle``: server RSS per idle connection, subscribed to one stream (bench 5)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

from bench.loadgen.client import connect_many
from bench.loadgen.server_probe import ServerProbe


async def run_idle(
    url: str, dialect: str, conns: int, settle: float, server_pid: int, compression: bool = False
) -> dict[str, Any]:
    """RSS delta divided by connections, after a warm-up connection set the baseline."""
    probe = ServerProbe(server_pid)
    warm = await connect_many(url, dialect, 10, compression=compression)
    await asyncio.sleep(settle)
    base = probe.rss()
    clients = await connect_many(url, dialect, conns, compression=compression)
    gc.collect()
    await asyncio.sleep(settle)
    after = probe.rss()
    for client in clients + warm:
        client.close()
    return {
        "mode": "idle",
        "conns": conns,
        "rss_before": base,
        "rss_after": after,
        "bytes_per_conn": (after - base) / conns,
    }
