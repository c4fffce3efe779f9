"""Closed-loop echo: every connection keeps one message in flight for the whole window."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.loadgen.client import Client, cable_action, connect_many
from bench.loadgen.server_probe import ServerProbe

_REPLY = b'{"identifier"'


def _message(dialect: str, size: int, binary: bool) -> bytes:
    if dialect == "cable":
        # The action's payload string is *size* bytes; the frame carries the command around it.
        return cable_action("echo", payload="x" * size)
    return (b"\xa5" if binary else b"x") * size


async def run_echo(
    url: str, dialect: str, conns: int, size: int, binary: bool, duration: float,
    warmup: float, server_pid: int,
) -> dict[str, Any]:  # fmt: skip
    """Round trips per second and server CPU per round trip."""
    probe = ServerProbe(server_pid)
    clients = await connect_many(url, dialect, conns)
    message = _message(dialect, size, binary)
    expected_len = size if dialect == "raw" else None
    state = {"count": 0, "running": True, "bad": 0}

    def on_data(client: Client, payload: bytes) -> None:
        if dialect == "cable" and not payload.startswith(_REPLY):
            return  # welcome, confirm, ping
        if expected_len is not None and len(payload) != expected_len:
            state["bad"] += 1
        state["count"] += 1
        if state["running"]:
            client.send(binary, message)

    for client in clients:
        client.on_data = on_data
        client.send(binary, message)
    await asyncio.sleep(warmup)
    cpu0, n0, t0 = probe.cpu(), state["count"], time.perf_counter()
    await asyncio.sleep(duration)
    cpu1, n1, t1 = probe.cpu(), state["count"], time.perf_counter()
    state["running"] = False
    await asyncio.sleep(0.1)
    for client in clients:
        client.close()
    trips = n1 - n0
    return {
        "mode": "echo",
        "conns": conns,
        "size": size,
        "binary": binary,
        "frame_bytes": len(message),
        "round_trips": trips,
        "seconds": t1 - t0,
        "rps": trips / (t1 - t0),
        "server_cpu_s": cpu1 - cpu0,
        "server_cpu_us_per_rt": (cpu1 - cpu0) / trips * 1e6 if trips else None,
        "server_cpu_util": (cpu1 - cpu0) / (t1 - t0),
        "bad_replies": state["bad"],
    }
