"""``python -m bench.loadgen.scale ROLE ...``: the long-lived children of ``bench scale``.

Each child reads JSON commands on stdin, one a line, and answers each with one JSON line on
stdout (``{"event": ..., ...}``, :func:`bench.procs.emit`); the orchestrator (:mod:`bench.scale`)
drives the phases.  Three roles:

``hold``
    Opens ``--conns`` Action Cable connections from the local address ``--source``, each
    subscribed to BenchmarkChannel (stream ``all1``), and keeps them.  Every broadcast carries
    ``t`` (``time.monotonic_ns()`` of its sending: a system-wide clock on Linux) and ``seq``;
    each connection records the ``seq`` it gets, so ``check`` can say whether every held
    connection got every broadcast, once and in order, and how late.
``churn``
    On ``churn``: opens and closes connections at ``rate`` per second for ``seconds`` (each one
    welcomed and subscribed, then closed), from a rotation of local addresses so that the
    connections' ports in TIME_WAIT never run out.
``probe``
    A probe connection (its own stream, so broadcasts do not reach it) that sends a WebSocket
    ping and a BenchmarkChannel ``echo`` command, each every ``--interval`` seconds with one
    outstanding at a time, and times the answers: what a broadcast or a churn costs another
    client.  A second connection, the trigger, sends the broadcasts (``broadcast``).

The children lower their own priority (``nice``) except the probe: they share the client
core, and the probe's timings should be the server's delays, not the scheduler's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from picows import WSFrame, WSMsgType, WSTransport

from bench.loadgen.client import Client, cable_action, connect_many, connect_one
from bench.procs import emit
from bench.stats import percentile

_SEQ = re.compile(rb'"seq":(\d+)')
_STAMP = re.compile(rb'"t":(\d+)')
_ECHO = re.compile(rb'"n":(\d+)')
PROBE_IDENTIFIER = json.dumps({"channel": "BenchmarkChannel", "id": "probe"})
#: Niceness of the holders and the churner (the probe keeps 0).
NICE = 5
_CHURN_CONCURRENCY = 2000

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any] | None]]


def stats_ms(values_s: list[float]) -> dict[str, Any]:
    """p50 / p99 / max in milliseconds and the count of *values_s* (seconds)."""
    ordered = sorted(values_s)
    return {
        "p50_ms": _ms(percentile(ordered, 50)),
        "p99_ms": _ms(percentile(ordered, 99)),
        "max_ms": _ms(ordered[-1] if ordered else None),
        "n": len(ordered),
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


async def serve_commands(handlers: dict[str, Handler]) -> None:
    """Read commands from stdin until ``stop`` (or EOF); answer each with its handler's event
    (``{"event": cmd, ...}``)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = json.loads(line)
        name = command.pop("cmd")
        if name == "stop":
            break
        answer = await handlers[name](command)
        emit(name, **(answer or {}))
    emit("stopped")


# -- hold --------------------------------------------------------------------------------------


class Held:
    """The held connections and the broadcasts each got."""

    def __init__(self) -> None:
        self.clients: list[Client] = []
        self.seqs: dict[int, list[int]] = {}
        self.latencies: list[float] = []

    def on_data(self, client: Client, payload: bytes) -> None:
        now = time.monotonic_ns()
        seq = _SEQ.search(payload)
        stamp = _STAMP.search(payload)
        if seq is None or stamp is None:
            return  # a ping, a welcome
        self.seqs[id(client)].append(int(seq.group(1)))
        self.latencies.append((now - int(stamp.group(1))) / 1e9)

    def check(self, first: int, last: int) -> dict[str, Any]:
        """Did every open held connection get broadcasts *first*..*last*, once, in order?"""
        expected = list(range(first, last + 1))
        complete = out_of_order = missing = duplicates = closed = 0
        for client in self.clients:
            if client.closed:
                closed += 1
                continue
            got = self.seqs[id(client)]
            if got == expected:
                complete += 1
                continue
            if got != sorted(got):
                out_of_order += 1
            missing += len(set(expected) - set(got))
            duplicates += len(got) - len(set(got))
        return {
            "clients": len(self.clients), "complete": complete, "closed": closed,
            "out_of_order": out_of_order, "missing": missing, "duplicates": duplicates,
            # Rounded to 10 us: the orchestrator merges every holder's latencies.
            "latencies_ms": [round(v * 1000, 2) for v in self.latencies],
        }  # fmt: skip

    def reset(self) -> None:
        self.latencies.clear()
        for key in self.seqs:
            self.seqs[key] = []


async def run_hold(a: argparse.Namespace) -> None:
    held = Held()
    started = time.monotonic()
    clients = await connect_many(a.url, "cable", a.conns, concurrency=a.concurrency,
                                 source=a.source)  # fmt: skip
    held.clients = clients
    for client in clients:
        held.seqs[id(client)] = []
        client.on_data = held.on_data
    emit("ready", conns=len(clients), seconds=time.monotonic() - started)

    async def check(c: dict[str, Any]) -> dict[str, Any]:
        return held.check(int(c["first"]), int(c["last"]))

    async def reset(_c: dict[str, Any]) -> None:
        held.reset()

    async def status(_c: dict[str, Any]) -> dict[str, Any]:
        return {"open": sum(not c.closed for c in clients)}

    await serve_commands({"check": check, "reset": reset, "status": status})
    for client in clients:
        client.close()


# -- churn -------------------------------------------------------------------------------------


async def churn(url: str, rate: float, seconds: float, sources: list[str]) -> dict[str, Any]:
    """Connect (welcome + subscribe) and close *rate* connections a second for *seconds*."""
    made = failed = skipped = 0
    connect_times: list[float] = []
    in_flight: set[asyncio.Task[None]] = set()

    async def one(source: str) -> None:
        nonlocal made, failed
        t0 = time.monotonic()
        try:
            client = await connect_one(url, "cable", source=source)
        except Exception:  # refused, reset, timed out: counted, the churn goes on
            failed += 1
            return
        connect_times.append(time.monotonic() - t0)
        made += 1
        client.close()

    start = time.monotonic()
    due = 0.0
    n = 0
    while (now := time.monotonic()) - start < seconds:
        due = (now - start) * rate
        while n < due:
            if len(in_flight) >= _CHURN_CONCURRENCY:
                skipped += 1  # the server is that far behind: do not pile on
            else:
                task = asyncio.ensure_future(one(sources[n % len(sources)]))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            n += 1
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - start
    if in_flight:
        await asyncio.wait(in_flight, timeout=30)
    return {
        "made": made, "failed": failed, "skipped": skipped, "seconds": elapsed,
        "rate": made / elapsed if elapsed else 0.0, "connect": stats_ms(connect_times),
    }  # fmt: skip


async def run_churn(a: argparse.Namespace) -> None:
    sources = a.source.split(",")
    emit("ready", conns=0, seconds=0.0)

    async def do_churn(c: dict[str, Any]) -> dict[str, Any]:
        return await churn(a.url, float(c["rate"]), float(c["seconds"]), sources)

    await serve_commands({"churn": do_churn})


# -- probe -------------------------------------------------------------------------------------


class ProbeClient(Client):
    """Times WebSocket pongs and echo replies; one of each outstanding at a time."""

    def __init__(self) -> None:
        super().__init__()
        self.pong: asyncio.Future[None] | None = None
        self.echo: asyncio.Future[None] | None = None
        self.on_data = self._reply

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.PONG:
            if self.pong is not None and not self.pong.done():
                self.pong.set_result(None)
            return
        super().on_ws_frame(transport, frame)

    def _reply(self, _client: Client, payload: bytes) -> None:
        echo = self.echo
        if echo is not None and not echo.done() and b'"echo"' in payload and _ECHO.search(payload):
            echo.set_result(None)


async def _time_loop(
    send: Callable[[], asyncio.Future[None]], interval: float, out: list[tuple[float, float]]
) -> None:
    """Send, wait for the answer, record ``(sent at, round trip)``; every *interval*."""
    while True:
        t0 = time.monotonic()
        await send()
        out.append((t0, time.monotonic() - t0))
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))


async def run_probe(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    probe = await connect_one(a.url, "cable", identifier=PROBE_IDENTIFIER, client=ProbeClient())
    assert isinstance(probe, ProbeClient)
    trigger = await connect_one(a.url, "cable")
    pings: list[tuple[float, float]] = []
    echoes: list[tuple[float, float]] = []
    counter = 0

    def ping() -> asyncio.Future[None]:
        probe.pong = loop.create_future()
        assert probe.transport is not None
        probe.transport.send_ping(b"probe")
        return probe.pong

    def echo() -> asyncio.Future[None]:
        nonlocal counter
        counter += 1
        probe.echo = loop.create_future()
        data = json.dumps({"action": "echo", "n": counter})
        probe.send_text(json.dumps(
            {"command": "message", "identifier": PROBE_IDENTIFIER, "data": data}
        ).encode())  # fmt: skip
        return probe.echo

    tasks = [
        asyncio.ensure_future(_time_loop(ping, a.interval, pings)),
        asyncio.ensure_future(_time_loop(echo, a.interval, echoes)),
    ]
    emit("ready", conns=2, seconds=0.0)

    async def broadcast(c: dict[str, Any]) -> dict[str, Any]:
        t = time.monotonic_ns()
        trigger.send_text(cable_action("broadcast", t=t, seq=int(c["seq"])))
        return {"sent": t / 1e9}

    async def window(c: dict[str, Any]) -> dict[str, Any]:
        """Round trips of the probes sent in [since, until] (a list of such windows)."""
        spans = c["spans"]

        def within(samples: list[tuple[float, float]]) -> list[float]:
            return [rtt for t, rtt in samples if any(s <= t <= u for s, u in spans)]

        return {"ping": stats_ms(within(pings)), "command": stats_ms(within(echoes)),
                "closed": probe.closed}  # fmt: skip

    await serve_commands({"broadcast": broadcast, "window": window})
    for task in tasks:
        task.cancel()
    probe.close()
    trigger.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen.scale")
    p.add_argument("role", choices=["hold", "churn", "probe"])
    p.add_argument("--url", required=True)
    p.add_argument("--conns", type=int, default=0)
    p.add_argument("--source", default="127.0.0.1", help="local address(es), comma-separated")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes at a time")
    p.add_argument("--interval", type=float, default=0.01, help="probe: seconds between probes")
    a = p.parse_args(argv)
    # Pinned to the client core, open-file limit raised: by bench.procs, before exec.
    if a.role != "probe":
        os.nice(NICE)
    role = {"hold": run_hold, "churn": run_churn, "probe": run_probe}[a.role]
    uvloop.run(role(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
