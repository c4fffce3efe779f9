"""The server side of an avalanche run: one process, pinned to the server core.

It holds what survives a restart in production — the broker (Redis in production: here one
:class:`MemoryBroker` for stream history and the session cache) and the application that
publishes (a ticker broadcasting sequence-numbered messages on every stream) — and runs the
cable *nodes*: ``Server`` instances that come and go.  A **restart** replaces the node:

- ``hard``: the node dies at once (its tasks are cancelled: every socket closes without a
  close frame or a ``disconnect``, like a killed process); after ``boot_gap`` seconds a new
  node listens on the same port.
- ``drain``: a new node starts on the same port first (``SO_REUSEPORT``), the old one is taken
  out of rotation (its listening socket stops accepting, as a load balancer does once
  ``/health`` turns 503), then drains slowly (``server.drain()``: disconnects with
  ``reconnect_after`` advice) and stops.

In the RPC mode (``"rpc": true`` in the spec, ``rpc_host`` in its config) the nodes have no
application of their own: :mod:`bench.avalanche.rpc_app`, another process, answers them over
AnyCable's HTTP RPC, and the sampler records the RPC executor's calls, limit and queue.

Driven by the orchestrator over stdin (``restart hard|drain``, ``stop_publish``, ``quit``);
reports JSON lines on stdout.  Usage: ``python -m bench.avalanche.server_proc SPEC.json``.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.avalanche import app as demo
from bench.procs import emit, listen_socket
from trio_cable.broker.memory import MemoryBroker
from trio_cable.channels import CableApp
from trio_cable.config import Config
from trio_cable.server import Server

SAMPLE_INTERVAL = 0.25
LAG_PROBE = 0.01


class _DropAcceptErrors(logging.Filter):
    """A node taken out of rotation keeps polling its shut-down listener (``accept`` fails
    with EINVAL ten times a second until the node stops); those errors are expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("accept failed")


@dataclass(eq=False)
class Node:
    """A running server node and the cancel scope that stops it."""

    server: Server
    scope: trio.CancelScope
    done: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class Cluster:
    """The broker, the current node, and every node ever started (for cumulative metrics)."""

    spec: dict[str, Any]
    broker: MemoryBroker
    nursery: trio.Nursery
    current: Node | None = None
    nodes: list[Node] = field(default_factory=list)
    live: set[Node] = field(default_factory=set)

    async def start_node(self) -> Node:
        """Start a node on the run's port; returns once it listens."""
        config = Config(**{**self.spec["config"], "port": self.spec["port"]})
        # A pre-bound SO_REUSEPORT socket, so that old and new node can overlap in a handoff.
        # RPC mode: an empty application, so that every connect and command goes to the
        # RPC application (in-process channels would be served here).
        app = CableApp() if self.spec.get("rpc") else demo.app
        server = Server(
            config, app, broker=self.broker, listen_socket=listen_socket(self.spec["port"])
        )
        node = Node(server, trio.CancelScope())

        async def run(*, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with node.scope:
                    await server.serve(task_status=task_status)
            finally:
                self.live.discard(node)
                node.done.set()

        await self.nursery.start(run)
        self.nodes.append(node)
        self.live.add(node)
        self.current = node
        return node

    async def restart(self, mode: str) -> None:
        """Replace the current node (see the module docstring)."""
        old = self.current
        assert old is not None
        if mode == "hard":
            old.scope.cancel()
            await old.done.wait()
            await trio.sleep(self.spec.get("boot_gap", 1.0))
            await self.start_node()
        elif mode == "drain":
            await self.start_node()
            # Out of rotation: the old listener leaves the SO_REUSEPORT group, so new
            # connections all go to the new node; the old one keeps its clients to drain.
            old.server.stop_accepting()
            await old.server.drain()
            old.scope.cancel()
            await old.done.wait()
        else:
            raise ValueError(f"unknown restart mode {mode!r}")


@dataclass
class Recorder:
    """Time series sampled in the server process (one event loop for every node)."""

    cluster: Cluster
    samples: list[dict[str, float]] = field(default_factory=list)
    lags: list[tuple[float, float]] = field(default_factory=list)
    # (t, seconds) of every full garbage collection (generation 2): it walks every object of
    # 10,000 connections and stops the event loop while it does.
    gc_pauses: list[tuple[float, float]] = field(default_factory=list)
    _window_lag: float = 0.0
    _gc_started: float = 0.0

    def on_gc(self, phase: str, info: dict[str, int]) -> None:
        """A ``gc.callbacks`` hook."""
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif info["generation"] == 2:
            duration = time.perf_counter() - self._gc_started
            self.gc_pauses.append((time.monotonic(), duration))

    def totals(self) -> dict[str, float]:
        handshakes = refused = commands = 0.0
        for node in self.cluster.nodes:
            m = node.server.metrics
            handshakes += m.connections_total + m.handshakes_failed_total
            refused += sum(m.labeled["handshakes_refused_total"].values())
            commands += m.commands_total
        live = list(self.cluster.live)
        rpc_calls = rpc_refusals = 0.0
        for node in self.cluster.nodes:
            labeled = node.server.metrics.labeled
            rpc_calls += sum(labeled.get("rpc_calls_total", {}).values())
            rpc_refusals += sum(labeled.get("rpc_refusals_total", {}).values())
        # The RPC executors' limits and queues (0 without RPC): what the nodes let through.
        slots = [getattr(n.server.executor, "slots", None) for n in live]
        rpc_limit = sum(s.total_tokens for s in slots if s is not None)
        rpc_queued = sum(s.statistics().tasks_waiting for s in slots if s is not None)
        return {
            "rpc_calls": rpc_calls,
            "rpc_refusals": rpc_refusals,
            "rpc_limit": float(rpc_limit),
            "rpc_queued": float(rpc_queued),
            "connections": float(sum(len(n.server.connections) for n in live)),
            "handshakes": handshakes,
            "refused": refused,
            "commands": commands,
            "callbacks": float(sum(n.server.callback_limiter.borrowed_tokens for n in live)),
            "callback_limit": float(sum(n.server.callback_limiter.total_tokens for n in live)),
        }

    async def lag_probe(self) -> None:
        """How late a 10 ms timer fires: the time every ready task waits for the CPU."""
        while True:
            before = time.monotonic()
            await trio.sleep(LAG_PROBE)
            now = time.monotonic()
            lag = max(0.0, now - before - LAG_PROBE)
            self.lags.append((now, lag))
            self._window_lag = max(self._window_lag, lag)

    async def sampler(self) -> None:
        while True:
            sample = {"t": time.monotonic(), **self.totals()}
            sample["lag_max"] = self._window_lag
            sample["db_waiting_peak"] = float(demo.stats.waiting_peak)
            sample["db_busy"] = float(demo.stats.busy())
            sample["db_calls"] = float(demo.stats.calls)
            self._window_lag = 0.0
            demo.stats.waiting_peak = demo.stats.waiting()
            self.samples.append(sample)
            await trio.sleep(SAMPLE_INTERVAL)


async def publisher(broker: MemoryBroker, spec: dict[str, Any], seqs: dict[str, int],
                    stop: trio.Event) -> None:  # fmt: skip
    """Broadcast ``{"seq": n}`` on every stream, each every ``msg_interval`` seconds, spread
    evenly in 0.1 s ticks (round robin over the streams)."""
    streams = [f"room-{k}" for k in range(spec["streams"])]
    per_tick = len(streams) * 0.1 / spec["msg_interval"]
    owed = 0.0
    index = 0
    while not stop.is_set():
        owed += per_tick
        for _ in range(int(owed)):
            stream = streams[index % len(streams)]
            index += 1
            seqs[stream] = seqs.get(stream, 0) + 1
            await broker.publish(stream, json.dumps({"seq": seqs[stream]}))
        owed -= int(owed)
        await trio.sleep(0.1)


async def control(cluster: Cluster, recorder: Recorder, seqs: dict[str, int],
                  stop_publishing: trio.Event) -> None:  # fmt: skip
    """Read commands from stdin until ``quit``."""
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    buffer = b""
    async with trio.open_nursery() as nursery:
        while True:
            chunk = await stdin.receive_some(4096)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                words = line.decode().split()
                if not words:
                    continue
                if words[0] == "restart":

                    async def do_restart(mode: str = words[1]) -> None:
                        emit("restart_begin", mode=mode, seqs=dict(seqs))
                        await cluster.restart(mode)
                        emit("restart_done", mode=mode)

                    nursery.start_soon(do_restart)
                elif words[0] == "stop_publish":
                    stop_publishing.set()
                    await trio.sleep(0.15)  # the ticker's last batch
                    emit("final", seqs=seqs)
                elif words[0] == "quit":
                    with open(cluster.spec["samples_out"], "w") as f:
                        json.dump(
                            {
                                "samples": recorder.samples,
                                "lags": recorder.lags,
                                "gc_pauses": recorder.gc_pauses,
                                "metrics": [n.server.metrics.snapshot() for n in cluster.nodes],
                            },
                            f,
                        )
                    emit("bye")
                    nursery.cancel_scope.cancel()
                    return


async def amain(spec: dict[str, Any]) -> None:
    cost = spec.get("cost", {})
    demo.cost.cpu_ms = cost.get("cpu_ms", demo.cost.cpu_ms)
    demo.cost.db_pool = cost.get("db_pool", demo.cost.db_pool)
    demo.cost.db_ms = cost.get("db_ms", demo.cost.db_ms)
    config = spec["config"]
    broker = MemoryBroker(
        history_limit=config.get("history_limit", 100), history_ttl=config.get("history_ttl", 300)
    )
    seqs: dict[str, int] = {}
    stop_publishing = trio.Event()
    async with trio.open_nursery() as nursery:
        cluster = Cluster(spec, broker, nursery)
        recorder = Recorder(cluster)
        gc.callbacks.append(recorder.on_gc)
        await cluster.start_node()
        nursery.start_soon(recorder.lag_probe)
        nursery.start_soon(recorder.sampler)
        nursery.start_soon(publisher, broker, spec, seqs, stop_publishing)
        emit("ready", port=spec["port"])
        await control(cluster, recorder, seqs, stop_publishing)
        nursery.cancel_scope.cancel()


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    # Pinned to the server core: by bench.procs, before exec.
    logging.basicConfig(
        level=spec.get("log_level", "WARNING"),
        format="%(asctime)s server %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropAcceptErrors())
    trio.run(amain, spec)


if __name__ == "__main__":
    main()
