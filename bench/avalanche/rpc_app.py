"""The demo application of the avalanche experiments as an AnyCable RPC application.

The RPC mode of the benchmark (``--rpc``) moves the application out of the real-time server,
as AnyCable does and as the avalanche articles recommend (the real-time server as a proxy):
this process answers ``connect`` and ``command`` over HTTP, written with
:mod:`trio_cable.rpc` (the project's application-side SDK) and served by uvicorn, the ASGI
server most FastAPI and Starlette applications run under (with httptools, on uvloop).  The
work behind every call is the in-process demo's (:mod:`bench.avalanche.app`), on asyncio here:

- ``cpu_ms`` of busy CPU (building the user, rendering the initial state), and
- one query to a simulated database: a pool of ``db_pool`` connections, each query holding
  one for ``db_ms`` (queries queue for a free connection).

What reached the application is counted here, not in the server: calls per endpoint, the
database queue's peak and the queries run, sampled every 0.25 s into ``samples_out`` when the
orchestrator sends ``quit`` on stdin.  Usage: ``python -m bench.avalanche.rpc_app SPEC.json``
(the spec: ``port``, ``secret``, ``cost``, ``samples_out``); prints ``{"event": "ready"}``
once it listens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from bench.procs import emit
from trio_cable.rpc import Channel, Connection, RPCApp

SAMPLE_INTERVAL = 0.25


@dataclass
class Counters:
    """What the application went through (cumulative; sampled)."""

    calls: dict[str, int] = field(default_factory=lambda: {"connect": 0, "command": 0,
                                                           "disconnect": 0})  # fmt: skip
    db_calls: int = 0
    db_waiting: int = 0
    db_waiting_peak: int = 0


class Database:
    """A pool of *size* connections; a query holds one for *query_ms*."""

    def __init__(self, size: int, query_ms: float, counters: Counters) -> None:
        self.pool = asyncio.Semaphore(max(1, size))
        self.query_ms = query_ms
        self.counters = counters

    async def query(self) -> None:
        c = self.counters
        c.db_calls += 1
        c.db_waiting += 1
        c.db_waiting_peak = max(c.db_waiting_peak, c.db_waiting)
        try:
            async with self.pool:
                c.db_waiting -= 1
                await asyncio.sleep(self.query_ms / 1000)
        except BaseException:
            if self.pool.locked():  # cancelled while waiting: no longer queued
                c.db_waiting -= 1
            raise


def build(spec: dict[str, Any], counters: Counters) -> RPCApp:
    """The RPC application: the demo's connect and ``AvalancheChannel``."""
    cost = spec.get("cost", {})
    cpu_ms = float(cost.get("cpu_ms", 0.1))
    db = Database(int(cost.get("db_pool", 8)), float(cost.get("db_ms", 5.0)), counters)

    async def work() -> None:
        if cpu_ms > 0:
            end = time.perf_counter() + cpu_ms / 1000
            while time.perf_counter() < end:  # bounded: at most cpu_ms
                pass
        await db.query()

    rpc = RPCApp(secret=spec["secret"])

    @rpc.connect
    async def connect(conn: Connection) -> dict[str, Any]:
        await work()
        return {"user_id": conn.query.get("uid", "anonymous")}

    @rpc.channel
    class AvalancheChannel(Channel):
        async def subscribed(self) -> None:
            await work()
            stream = self.params.get("stream")
            if not isinstance(stream, str):
                self.reject()
                return
            self.stream_from(stream)

    return rpc


class Counting:
    """ASGI middleware: count every request by the endpoint it reached (the last path
    segment), before the application runs it."""

    def __init__(self, app: Any, counters: Counters) -> None:
        self.app = app
        self.counters = counters

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            name = scope["path"].rstrip("/").rpartition("/")[2]
            if name in self.counters.calls:
                self.counters.calls[name] += 1
        await self.app(scope, receive, send)


async def sampler(counters: Counters, samples: list[dict[str, float]]) -> None:
    while True:
        samples.append({
            "t": time.monotonic(),
            **{f"calls_{k}": float(v) for k, v in counters.calls.items()},
            "db_calls": float(counters.db_calls),
            "db_waiting_peak": float(counters.db_waiting_peak),
        })  # fmt: skip
        counters.db_waiting_peak = counters.db_waiting
        await asyncio.sleep(SAMPLE_INTERVAL)


async def amain(spec: dict[str, Any]) -> None:
    counters = Counters()
    samples: list[dict[str, float]] = []
    app = Counting(build(spec, counters).asgi, counters)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=spec["port"], log_level="warning", access_log=False,
        lifespan="off", backlog=4096,
    )  # fmt: skip
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()  # raises why it could not start
        await asyncio.sleep(0.05)
    sampling = asyncio.create_task(sampler(counters, samples))
    emit("ready", port=spec["port"])
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        if line.strip() == b"quit":
            break
    sampling.cancel()
    with open(spec["samples_out"], "w") as f:
        json.dump({"samples": samples, "calls": counters.calls}, f)
    server.should_exit = True
    await serving
    emit("bye")


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr,
        format="%(asctime)s rpc-app %(levelname)s %(name)s: %(message)s",
    )  # fmt: skip
    try:
        import uvloop  # as uvicorn runs in production (its "standard" extra)
    except ImportError:
        asyncio.run(amain(spec))
    else:
        uvloop.run(amain(spec))


if __name__ == "__main__":
    main()
