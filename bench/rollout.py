"""Scenario **rollout** (issue 7): a rolling restart of 3 Redis-backed nodes behind HAProxy.

Three ``trio-cable serve --broker redis`` processes share one ``redis-server`` (started here
in a temp dir, no persistence) behind Debian's HAProxy with ``roundrobin`` or ``leastconn``
and an HTTP health check on ``/health`` (503 while a node drains).  ``--clients`` raw
WebSocket clients (extended protocol, one process, Trio) subscribe to one public stream,
follow the server's reconnect advice, and resume with ``sid`` + ``history`` after each
disconnect.  A publisher POSTs a numbered message every ``--publish-interval`` s through
HAProxy.  Then each node in turn gets SIGTERM (slow drain over ``--drain-period`` s), is
started again on the same port, and the next one follows after ``--settle`` s.

Measured, sampled every 0.5 s from each node's ``/health`` and ``/metrics``: connections per
node over time, handshakes per second per node (peak), and messages lost (published after a
client's first subscription, never received) and duplicated.  Writes a JSON file, a PNG
(connections per node over time, one panel per balancer algorithm) and prints table rows.

Only loopback addresses; every loop is bounded by the scenario's deadline.

    python -m bench.rollout --clients 3000 --algorithms roundrobin,leastconn
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench import output, procs
from bench.deps import require, require_tool
from bench.procs import HOST, free_port

STREAM = "rollout"
KEY = "rollout-bench-key"
SUBPROTOCOL = "actioncable-v1-ext-json"
IDENTIFIER = json.dumps({"channel": "$pubsub", "stream_name": STREAM})


# -- processes ---------------------------------------------------------------------------------


class Node:
    """One ``trio-cable serve`` process on a fixed port (restartable)."""

    def __init__(
        self,
        index: int,
        redis_url: str,
        args: argparse.Namespace,
        logdir: Path,
        rebalance: bool = False,
    ):
        self.index = index
        self.rebalance = rebalance
        self.port = free_port()
        self.redis_url = redis_url
        self.args = args
        self.logdir = logdir
        self.proc: procs.Proc | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        with open(self.logdir / f"node{self.index}.{self.starts}.log", "wb") as log:
            self.proc = self._start(log)

    def _start(self, log: Any) -> procs.Proc:
        return procs.start(
            procs.python(
                "trio_cable",
                "serve",
                f"--host={HOST}",
                f"--port={self.port}",
                "--broker=redis",
                f"--redis-url={self.redis_url}",
                "--public-streams",
                f"--broadcast-key={KEY}",
                "--pong-timeout=0",
                f"--drain-period={self.args.drain_period}",
                f"--shutdown-timeout={self.args.drain_period + 10}",
                f"--reconnect-advice={self.args.reconnect_advice}",
                f"--handshake-rate={self.args.handshake_rate}",
                "--log-level=warning",
                *(
                    ["--rebalance", f"--rebalance-rate={self.args.rebalance_rate}"]
                    if self.rebalance
                    else []
                ),
            ),
            name=f"node{self.index}",
            port=self.port,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop(self, timeout: float) -> None:
        if self.proc is not None:
            self.proc.stop(timeout)
        self.proc = None


#: The HAProxy config of the deployment kit: the benchmark runs the file users deploy.
HAPROXY_CFG_PATH = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg"


def start_haproxy(algorithm: str, nodes: list[Node], workdir: Path) -> procs.Proc:
    port = free_port()
    # The deploy config reads its bind address and algorithm from the environment and ends
    # with its backend, where the nodes go.
    servers = "".join(f"    server n{n.index} {HOST}:{n.port} check\n" for n in nodes)
    cfg = workdir / f"haproxy-{algorithm}.cfg"
    cfg.write_text(HAPROXY_CFG_PATH.read_text() + servers)
    env = procs.child_env(CABLE_BIND=f"{HOST}:{port}", CABLE_BALANCE=algorithm)
    with open(workdir / f"haproxy-{algorithm}.log", "wb") as log:
        return procs.start([_tool("haproxy"), "-f", str(cfg), "-db"], name="haproxy", port=port,
                           stdout=subprocess.DEVNULL, stderr=log, env=env)  # fmt: skip


def _tool(name: str) -> str:
    return require_tool(name, "the rollout", f"apt-get install {name}")


# -- clients -----------------------------------------------------------------------------------


def _frame(text: str) -> bytes:
    """A masked client text frame (zero mask key: masking is then the identity)."""
    payload = text.encode()
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


@dataclass
class ClientStats:
    """What one client saw."""

    received: dict[int, int] = field(default_factory=dict)  # seq -> times
    order: list[int] = field(default_factory=list)  # every seq, as it arrived
    subscribed_at: float | None = None
    connects: int = 0
    resumed: int = 0
    history_rejected: int = 0


class Run:
    """State of one scenario run (one balancer algorithm)."""

    def __init__(self, port: int, clients: int, deadline: float) -> None:
        self.port = port
        self.clients = [ClientStats() for _ in range(clients)]
        self.deadline = deadline
        self.published: list[tuple[int, float]] = []
        self.stop = False
        self.publishing = True
        self.t0 = time.time()

    async def client(self, stats: ClientStats) -> None:
        sid: str | None = None
        position: tuple[str, int] | None = None
        delay = 0.0
        while not self.stop and trio.current_time() < self.deadline:
            if delay:
                await trio.sleep(delay)
            delay = random.uniform(0.5, 2.0)
            try:
                stream = await trio.open_tcp_stream(HOST, self.port)
            except OSError:
                continue
            try:
                query = f"?sid={sid}" if sid else ""
                await stream.send_all(
                    (
                        f"GET /cable{query} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
                        "\r\n"
                    ).encode()
                )
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise EOFError
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101"):
                    match = re.search(rb"(?i)retry-after:\s*(\d+)", head)
                    delay = float(match.group(1)) if match else delay
                    continue
                stats.connects += 1
                while True:
                    message, buf = await _next_message(stream, buf)
                    if message is None:
                        break
                    kind = message.get("type")
                    if kind == "ping":
                        continue
                    if kind == "welcome":
                        sid = message["sid"]
                        if message.get("restored") and position is not None:
                            stats.resumed += 1
                            history = {
                                "streams": {STREAM: {"epoch": position[0], "offset": position[1]}}
                            }
                            cmd = {
                                "command": "history",
                                "identifier": IDENTIFIER,
                                "history": history,
                            }
                        else:
                            cmd = {"command": "subscribe", "identifier": IDENTIFIER}
                            if position is not None:
                                cmd["history"] = {
                                    "streams": {
                                        STREAM: {"epoch": position[0], "offset": position[1]}
                                    }
                                }
                        await stream.send_all(_frame(json.dumps(cmd)))
                    elif kind == "confirm_subscription":
                        if stats.subscribed_at is None:
                            stats.subscribed_at = time.time()
                    elif kind == "reject_history":
                        stats.history_rejected += 1
                    elif kind == "disconnect":
                        advice = message.get("reconnect_after")
                        delay = (advice / 1000) if isinstance(advice, (int, float)) else delay
                        if not message.get("reconnect", True):
                            return
                    elif "offset" in message:
                        seq = int(message["message"])
                        stats.received[seq] = stats.received.get(seq, 0) + 1
                        stats.order.append(seq)
                        position = (message["epoch"], message["offset"])
            except (OSError, EOFError, trio.BrokenResourceError, ValueError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()

    async def publisher(self, interval: float) -> None:
        seq = 0
        while self.publishing and not self.stop and trio.current_time() < self.deadline:
            seq += 1
            body = json.dumps({"stream": STREAM, "data": str(seq)}).encode()
            request = (
                f"POST /_broadcast HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n"
            ).encode() + body
            sent_at = time.time()
            ok = False
            for _attempt in range(3):
                try:
                    with trio.fail_after(5):
                        stream = await trio.open_tcp_stream(HOST, self.port)
                        async with stream:
                            await stream.send_all(request)
                            reply = await stream.receive_some(1024)
                    if reply.startswith(b"HTTP/1.1 201"):
                        ok = True
                        break
                except (OSError, trio.TooSlowError, trio.BrokenResourceError):
                    pass
                await trio.sleep(0.05)
            if ok:
                self.published.append((seq, sent_at))
            await trio.sleep(interval)


async def _next_message(stream: trio.SocketStream, buf: bytes) -> tuple[Any, bytes]:
    while True:
        if len(buf) >= 2:
            opcode = buf[0] & 0x0F
            n = buf[1] & 0x7F
            pos = 2
            if n == 126 and len(buf) >= 4:
                n, pos = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127 and len(buf) >= 10:
                n, pos = int.from_bytes(buf[2:10], "big"), 10
            if (n < 126 or pos > 2) and len(buf) >= pos + n:
                payload, buf = buf[pos : pos + n], buf[pos + n :]
                if opcode == 8:
                    return None, buf
                if opcode == 1:
                    return json.loads(payload), buf
                continue
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None, buf
        buf += chunk


# -- sampling -----------------------------------------------------------------------------------


def _http_get(port: int, path: str) -> bytes | None:
    try:
        with socket.create_connection((HOST, port), timeout=1) as sock:
            sock.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode()
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data.partition(b"\r\n\r\n")[2]
    except OSError:
        return None


def sample_node(port: int) -> tuple[int | None, float | None, float | None, float | None]:
    """(open connections, connections accepted so far, connections handed on by rebalancing
    so far, the most it handed on within any one second) of the node on *port*."""
    health = _http_get(port, "/health")
    metrics = _http_get(port, "/metrics")
    connections = None
    accepted = rebalanced = peak = None
    with contextlib.suppress(ValueError, TypeError):
        connections = int(json.loads(health or b"")["connections"])
    if metrics:
        match = re.search(rb"(?m)^\w*connections_total(?:\{\})?\s+([0-9.e+]+)$", metrics)
        if match:
            accepted = float(match.group(1))
        match = re.search(rb"(?m)^\w*rebalanced_total(?:\{\})?\s+([0-9.e+]+)$", metrics)
        if match:
            rebalanced = float(match.group(1))
        match = re.search(rb"(?m)^\w*rebalance_peak_per_second\s+([0-9.e+]+)$", metrics)
        if match:
            peak = float(match.group(1))
    return connections, accepted, rebalanced, peak


async def run_algorithm(
    algorithm: str, args: argparse.Namespace, redis_url: str, workdir: Path, rebalance: bool
) -> dict[str, Any]:
    nodes = [Node(i, redis_url, args, workdir, rebalance) for i in range(3)]
    for node in nodes:
        node.start()
    haproxy = start_haproxy(algorithm, nodes, workdir)
    port = haproxy.port
    samples: list[dict[str, Any]] = []
    events: list[tuple[float, str]] = []
    t0 = time.time()
    budget = args.ramp + 3 * (args.drain_period + args.settle + 5) + 30
    if rebalance:
        budget += args.rebalance_wait
    run = Run(port, args.clients, trio.current_time() + budget)
    last_accepted: dict[int, tuple[float, float]] = {}
    last_moved: dict[int, tuple[float, float]] = {}
    try:
        async with trio.open_nursery() as nursery:

            async def sampler() -> None:
                while not run.stop:
                    now = time.time()
                    row: dict[str, Any] = {"t": round(now - t0, 2)}
                    for node in nodes:
                        conns, accepted, moved, peak = await trio.to_thread.run_sync(
                            sample_node, node.port
                        )
                        row[f"peak{node.index}"] = peak
                        rate = moved_rate = None
                        if moved is not None:
                            prev = last_moved.get(node.index)
                            if prev is not None and now > prev[0]:
                                delta = moved - prev[1] if moved >= prev[1] else moved
                                moved_rate = delta / (now - prev[0])
                                row[f"moved{node.index}"] = delta
                            last_moved[node.index] = (now, moved)
                        if accepted is not None:
                            prev = last_accepted.get(node.index)
                            if prev is not None and now > prev[0]:
                                delta = accepted - prev[1] if accepted >= prev[1] else accepted
                                rate = delta / (now - prev[0])
                            last_accepted[node.index] = (now, accepted)
                        row[f"n{node.index}"] = conns
                        row[f"rate{node.index}"] = rate
                        row[f"moved_rate{node.index}"] = moved_rate
                    samples.append(row)
                    await trio.sleep(0.5)

            nursery.start_soon(sampler)
            # Ramp up: clients arrive spread over --ramp seconds.
            for i, stats in enumerate(run.clients):
                nursery.start_soon(run.client, stats)
                if i % 50 == 49:
                    await trio.sleep(args.ramp * 50 / args.clients)
            nursery.start_soon(run.publisher, args.publish_interval)
            await trio.sleep(args.settle)
            for node in nodes:
                events.append((round(time.time() - t0, 2), f"drain n{node.index}"))
                await trio.to_thread.run_sync(node.stop, args.drain_period + 15)
                events.append((round(time.time() - t0, 2), f"restart n{node.index}"))
                await trio.to_thread.run_sync(node.start)
                await trio.sleep(args.settle)
            if rebalance:
                # Until the counts are even (every node within 10 % of the mean for five
                # samples in a row), or the wait is over.
                events.append((round(time.time() - t0, 2), "rollout done"))
                deadline = trio.current_time() + args.rebalance_wait
                while trio.current_time() < deadline:
                    recent = samples[-5:]
                    if len(recent) == 5 and all(_even(row) for row in recent):
                        break
                    await trio.sleep(0.5)
            # The last publications reach clients that are between two nodes too: publishing
            # stops, then they have the reconnect advice and a margin to come back for them.
            run.publishing = False
            await trio.sleep(args.reconnect_advice + 5)
            run.stop = True
            nursery.cancel_scope.cancel()
    finally:
        haproxy.stop(10)
        for node in nodes:
            node.stop(5)
    return summarize(algorithm, args, run, samples, events, rebalance)


def _even(row: dict[str, Any], within: float = 1.10) -> bool:
    counts = [row.get(f"n{i}") for i in range(3)]
    if any(c is None for c in counts) or not sum(counts):  # type: ignore[arg-type]
        return False
    return max(counts) <= within * sum(counts) / 3  # type: ignore[type-var,arg-type,operator]


def summarize(
    algorithm: str,
    args: argparse.Namespace,
    run: Run,
    samples: list[dict[str, Any]],
    events: list[tuple[float, str]],
    rebalance: bool = False,
) -> dict[str, Any]:
    lost = duplicated = expected = 0
    lost_examples: list[dict[str, Any]] = []  # a few clients' lost messages, to look into
    for stats in run.clients:
        if stats.subscribed_at is None:
            continue
        for seq, sent_at in run.published:
            if sent_at < stats.subscribed_at + 1.0:
                continue
            expected += 1
            times = stats.received.get(seq, 0)
            if times == 0:
                lost += 1
                if len(lost_examples) < 40:
                    lost_examples.append(
                        {"seq": seq, "sent_at": round(sent_at - run.t0, 2),
                         "client_connects": stats.connects, "resumed": stats.resumed}
                    )  # fmt: skip
            elif times > 1:
                duplicated += times - 1
    peak_rate = max((row.get(f"rate{i}") or 0.0 for row in samples for i in range(3)), default=0.0)
    final = samples[-3] if len(samples) >= 3 else (samples[-1] if samples else {})
    counts = [final.get(f"n{i}") or 0 for i in range(3)]
    peak_conns = max((row.get(f"n{i}") or 0 for row in samples for i in range(3)), default=0)
    moved = sum(row.get(f"moved{i}") or 0 for row in samples for i in range(3))
    # The nodes' own count: the most disconnects one node's rebalancer made within any one
    # second (t - 1, t] (the gauge rebalance_peak_per_second), exact where the scrapes are
    # not.
    peak_own = max((row.get(f"peak{i}") or 0.0 for row in samples for i in range(3)), default=0.0)
    # From the scrapes, over windows of at least a second (pairs of samples): an estimate
    # that carries the scrapes' own timing (half-second samples, late on a busy machine).
    peak_moved = 0.0
    for first, second in itertools.pairwise(samples):
        span = second["t"] - first["t"] + 0.5
        for i in range(3):
            moved_in = (first.get(f"moved{i}") or 0) + (second.get(f"moved{i}") or 0)
            peak_moved = max(peak_moved, moved_in / max(span, 1.0))
    return {
        "algorithm": algorithm,
        "rebalance": rebalance,
        "rebalance_rate_limit": args.rebalance_rate if rebalance else None,
        "rebalanced": int(moved),
        "peak_rebalance_rate_per_node": round(peak_own, 1),
        "scraped_rebalance_rate_per_node": round(peak_moved, 1),
        "clients": args.clients,
        "subscribed": sum(1 for s in run.clients if s.subscribed_at is not None),
        "published": len(run.published),
        "deliveries_expected": expected,
        "lost": lost,
        "duplicated": duplicated,
        "history_rejected": sum(s.history_rejected for s in run.clients),
        "resumed": sum(s.resumed for s in run.clients),
        "peak_handshake_rate_per_node": round(peak_rate, 1),
        "peak_connections_per_node": peak_conns,
        "final_connections_per_node": counts,
        "final_imbalance": round(max(counts) / max(1, sum(counts) / 3), 2) if any(counts) else None,
        "events": events,
        "lost_examples": lost_examples,
        "samples": samples,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 3.6 * len(results)), sharex=True)
    if len(results) == 1:
        axes = [axes]
    for ax, result in zip(axes, results, strict=True):
        samples = result["samples"]
        ts = [row["t"] for row in samples]
        for i in range(3):
            # A sample that timed out (node busy or restarting) is a gap, not a zero.
            values = [row.get(f"n{i}") for row in samples]
            ax.plot(ts, [float("nan") if v is None else v for v in values], label=f"node {i}")
        for t, label in result["events"]:
            ax.axvline(t, color="grey", lw=0.6, ls="--")
            ax.text(t, ax.get_ylim()[1] * 0.95, label, rotation=90, fontsize=7, va="top")
        with_rebalancing = ", then rebalancing" if result.get("rebalance") else ""
        ax.set_title(
            f"{result['algorithm']}: {result['clients']} clients, rolling restart with slow "
            f"drain{with_rebalancing}"
        )
        ax.set_ylabel("connections")
        ax.legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table_rows(results: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| balancer | clients | rebalancing | peak conns/node | final conns per node | "
        "final max/mean | peak handshakes/s/node | published | lost | duplicated | "
        "history rejected | handed on (busiest second of a node, bound) |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        moved = (
            f"{r['rebalanced']} ({r['peak_rebalance_rate_per_node']}/s, "
            f"<= {r['rebalance_rate_limit']:g}/s)"
            if r.get("rebalance")
            else "-"
        )
        rows.append(
            f"| {r['algorithm']} | {r['clients']} | {'yes' if r.get('rebalance') else 'no'} | "
            f"{r['peak_connections_per_node']} | "
            f"{' / '.join(str(c) for c in r['final_connections_per_node'])} | "
            f"{r['final_imbalance']} | {r['peak_handshake_rate_per_node']} | {r['published']} | "
            f"{r['lost']} / {r['deliveries_expected']} | {r['duplicated']} | "
            f"{r['history_rejected']} | {moved} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the rollout scenario; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bench rollout", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--clients", type=int, default=3000)
    parser.add_argument("--algorithms", default="roundrobin,leastconn")
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds to connect all clients")
    parser.add_argument("--drain-period", type=float, default=6.0)
    parser.add_argument("--settle", type=float, default=8.0, help="seconds between restarts")
    parser.add_argument("--reconnect-advice", type=float, default=3.0)
    parser.add_argument("--handshake-rate", type=float, default=0.0)
    parser.add_argument("--publish-interval", type=float, default=0.2)
    parser.add_argument(
        "--rebalance",
        choices=["no", "yes", "both"],
        default="no",
        help="run with --rebalance on the nodes (both: each algorithm twice)",
    )
    parser.add_argument(
        "--rebalance-rate",
        type=float,
        default=20.0,
        help="the nodes' --rebalance-rate (disconnects/s/node)",
    )
    parser.add_argument("--rebalance-wait", type=float, default=150.0,
                        help="longest wait for even counts after the rollout")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="small and short: 300 clients, "
                        "one algorithm, 2 s drains (refuses --update-results)")  # fmt: skip
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.ramp, args.drain_period, args.settle = 300, 2.0, 2.0, 3.0
        args.algorithms = args.algorithms.split(",")[0]
    output.check(args, quick=args.quick)
    require("matplotlib")
    require("coredis", purpose="the nodes' Redis broker")
    redis_server, _haproxy = _tool("redis-server"), _tool("haproxy")
    out = output.choose(args, "rollout", quick=args.quick)
    json_path = (out or output.RESULTS_DIR) / "rollout.json"
    png_path = (out / "plots" if out else output.PLOTS_DIR) / "rollout.png"
    procs.raise_nofile()
    results = []
    with tempfile.TemporaryDirectory(prefix="rollout-") as tmp:
        workdir = Path(tmp)
        redis = procs.start_redis(redis_server, tmp)
        redis_port = redis.port
        try:
            modes = {"no": [False], "yes": [True], "both": [False, True]}[args.rebalance]
            for algorithm, rebalance in [(a, r) for a in args.algorithms.split(",") for r in modes]:
                label = " with rebalancing" if rebalance else ""
                print(f"rollout: {algorithm}{label}, {args.clients} clients ...", file=sys.stderr)
                result = trio.run(
                    run_algorithm, algorithm, args, f"redis://{HOST}:{redis_port}/0", workdir,
                    rebalance,
                )  # fmt: skip
                results.append(result)
                print(
                    f"  lost {result['lost']}/{result['deliveries_expected']}, "
                    f"peak {result['peak_handshake_rate_per_node']} handshakes/s/node, "
                    f"final {result['final_connections_per_node']}",
                    file=sys.stderr,
                )
        finally:
            redis.kill()
            if os.environ.get("ROLLOUT_KEEP_LOGS"):
                shutil.copytree(tmp, json_path.parent / "rollout-logs", dirs_exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1))
    png_path.parent.mkdir(parents=True, exist_ok=True)
    plot(results, png_path)
    print("\n".join(table_rows(results)))
    print(f"wrote {json_path} and {png_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from bench import run_main

    sys.exit(run_main("python -m bench.rollout", main, sys.argv[1:]))
