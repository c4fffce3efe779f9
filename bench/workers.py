"""Scenario **workers** (issue 15): ``trio-cable serve --workers 2 --broker redis`` on one machine.

1. **hold**: ``--conns`` connections (``actioncable-v1-json``, each subscribed to one public
   stream) held by ``--loadgens`` processes, each from its own loopback source address
   (127.0.0.2, .3 ...: one address has ~28,000 ephemeral ports towards one server port, and
   one process may open 20,000 files here).  ``/health`` (any worker: the aggregate) must
   count them all; then one broadcast through ``POST /_broadcast`` must reach every one.
2. **roll**: ``--roll-clients`` raw extended-protocol clients (bench.rollout's: they follow
   the reconnect advice, resume with ``sid`` and ask ``history``) receive a numbered message
   every ``--publish-interval`` s while the supervisor gets SIGHUP and replaces both workers
   one at a time; every client must end with every message once, in order.

Writes ``workers.json`` and prints a table.  Loopback only; every wait is bounded.

    python -m bench.workers --conns 36000 --roll-clients 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import output, procs
from bench.deps import require, require_tool
from bench.procs import HOST, free_port

STREAM = "rollout"  # bench.rollout's clients subscribe to it
KEY = "rollout-bench-key"
HOLD_IDENTIFIER = json.dumps({"channel": "$pubsub", "stream_name": STREAM})


# -- the load generator: python -m bench.workers hold ... (asyncio, one source address) ----------


class _Conn(asyncio.Protocol):
    """One lean WebSocket client: handshake, subscribe, count the marker broadcasts."""

    def __init__(self, gen: _Holder) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.subscribed: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.seen: set[str] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(
            (
                f"GET /cable HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: actioncable-v1-json\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost += 1
        if not self.subscribed.done():
            self.subscribed.set_result(False)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.subscribed.set_result(False)
                assert self.transport is not None
                self.transport.close()
                return
            self.upgraded = True
            del buf[: end + 4]
        while len(buf) >= 2:
            n, pos = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, pos = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, pos = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < pos + n:
                return
            payload = bytes(buf[pos : pos + n])
            del buf[: pos + n]
            self._message(payload)

    def _message(self, payload: bytes) -> None:
        if b'"ping"' in payload:
            return
        if b'"welcome"' in payload:
            command = json.dumps({"command": "subscribe", "identifier": HOLD_IDENTIFIER})
            body = command.encode()
            assert len(body) < 126 and self.transport is not None
            # A masked text frame; a zero mask key makes masking the identity.
            self.transport.write(bytes([0x81, 0x80 | len(body)]) + b"\0\0\0\0" + body)
        elif b"confirm_subscription" in payload:
            if not self.subscribed.done():
                self.subscribed.set_result(True)
        elif b'"message"' in payload:
            match = re.search(rb'"message":"(mark-\d+)"', payload)
            if match:
                marker = match.group(1).decode()
                if marker not in self.seen:
                    self.seen.add(marker)
                    self.gen.marks[marker] = self.gen.marks.get(marker, 0) + 1


class _Holder:
    def __init__(self, port: int, source: str, conns: int) -> None:
        self.port = port
        self.source = source
        self.conns = conns
        self.clients: list[_Conn] = []
        self.marks: dict[str, int] = {}
        self.lost = 0
        self.refused = 0

    async def one(self, gate: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        for attempt in range(30):
            async with gate:
                try:
                    _t, conn = await loop.create_connection(
                        lambda: _Conn(self), HOST, self.port, local_addr=(self.source, 0)
                    )
                    ok = await asyncio.wait_for(conn.subscribed, 60)
                except (OSError, TimeoutError):
                    ok = False
            if ok:
                self.clients.append(conn)
                return
            self.refused += 1
            await asyncio.sleep(min(5.0, 0.2 * (attempt + 1)))

    async def run(self) -> None:
        gate = asyncio.Semaphore(100)
        started = time.monotonic()
        await asyncio.gather(*(self.one(gate) for _ in range(self.conns)))
        procs.emit(
            "connected",
            count=len(self.clients),
            refused=self.refused,
            seconds=round(time.monotonic() - started, 1),
        )
        lost_at_connect = self.lost
        reader = asyncio.StreamReader()
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            if line.strip() == b"report":
                procs.emit(
                    "report",
                    open=sum(1 for c in self.clients if not c.transport.is_closing()),  # type: ignore[union-attr]
                    marks=self.marks,
                    lost=self.lost - lost_at_connect,
                )
        for client in self.clients:
            assert client.transport is not None
            client.transport.close()


def _hold_main(argv: list[str]) -> int:
    import uvloop

    parser = argparse.ArgumentParser(prog="python -m bench.workers hold")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--source", required=True)
    parser.add_argument("--conns", type=int, required=True)
    args = parser.parse_args(argv)
    procs.raise_nofile()
    uvloop.run(_Holder(args.port, args.source, args.conns).run())
    return 0


# -- the orchestrator --------------------------------------------------------------------------


def _http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    import socket

    with socket.create_connection((HOST, port), timeout=10) as sock:
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n"
        if body:
            head += f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n"
        sock.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def _health(port: int) -> dict[str, Any]:
    return json.loads(_http(port, "GET", "/health")[1])


def _worker_pids(port: int, workers: int = 2, timeout: float = 30) -> set[int]:
    """The workers' pids, from /health (asked again while it lists fewer than *workers*: on
    a busy machine an answer may come from one worker's figures alone)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {w["pid"] for w in _health(port)["workers"]}
        if len(pids) >= workers or time.monotonic() > deadline:
            return pids
        time.sleep(0.5)


def _rss_mb(pid: int) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return None


class Supervised:
    """The server under test: supervisor and workers, log in a file."""

    def __init__(self, redis_url: str, args: argparse.Namespace, logdir: Path) -> None:
        self.port = free_port()
        self.log_path = logdir / "server.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = procs.start(
            procs.python(
                "trio_cable",
                "serve",
                "--workers=2",
                "--broker=redis",
                f"--redis-url={redis_url}",
                f"--host={HOST}",
                f"--port={self.port}",
                "--public-streams",
                f"--broadcast-key={KEY}",
                "--handshake-rate=0",
                "--max-pending-handshakes=20000",
                f"--drain-period={args.drain_period}",
                f"--shutdown-timeout={args.drain_period + 30}",
                f"--reconnect-advice={args.reconnect_advice}",
                f"--history-limit={args.history_limit}",
                "--log-level=info",
            ),
            name="trio-cable",
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_log(r"trio_cable listening on", 0, 120)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, start: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.text()[start:]):
                return
            if not self.proc.alive():
                raise RuntimeError("the server exited:\n" + self.text()[-3000:])
            time.sleep(0.2)
        raise RuntimeError(f"no {pattern!r} in the server log:\n" + self.text()[-3000:])

    def stop(self) -> int | None:
        status = self.proc.stop(120)
        self.log.close()
        return status


def hold(server: Supervised, args: argparse.Namespace) -> dict[str, Any]:
    """Phase 1: hold --conns connections, check the aggregate, one broadcast to all."""
    per = -(-args.conns // args.loadgens)
    gens = []
    for i in range(args.loadgens):
        count = min(per, args.conns - i * per)
        gens.append(
            subprocess.Popen(
                procs.python(
                    "bench.workers",
                    "hold",
                    f"--port={server.port}",
                    f"--source=127.0.0.{i + 2}",
                    f"--conns={count}",
                ),
                cwd=procs.ROOT,
                env=procs.child_env(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    started = time.monotonic()
    connected = [json.loads(_next_event(g, "connected", 600)) for g in gens]
    connect_seconds = round(time.monotonic() - started, 1)
    time.sleep(3)  # the workers' snapshots catch up
    health = _health(server.port)
    workers = [
        {"pid": w["pid"], "connections": w["connections"], "rss_mb": _rss_mb(w["pid"])}
        for w in health["workers"]
    ]
    sent_at = time.monotonic()
    body = json.dumps({"stream": STREAM, "data": json.dumps("mark-1")}).encode()
    status, _ = _http(server.port, "POST", "/_broadcast", body)
    reached = 0
    reports: list[dict[str, Any]] = []
    while time.monotonic() - sent_at < 60:
        reports = []
        for g in gens:
            assert g.stdin is not None
            g.stdin.write("report\n")
            g.stdin.flush()
            reports.append(json.loads(_next_event(g, "report", 60)))
        reached = sum(r["marks"].get("mark-1", 0) for r in reports)
        if reached >= sum(c["count"] for c in connected):
            break
        time.sleep(0.5)
    reach_seconds = round(time.monotonic() - sent_at, 2)
    for g in gens:
        assert g.stdin is not None
        g.stdin.close()
    for g in gens:
        g.wait(120)
    return {
        "conns": args.conns,
        "loadgens": args.loadgens,
        "connected": sum(c["count"] for c in connected),
        "refused_retried": sum(c["refused"] for c in connected),
        "connect_seconds": connect_seconds,
        "health_connections": health["connections"],
        "workers": workers,
        "broadcast_status": status,
        "broadcast_reached": reached,
        "broadcast_seconds": reach_seconds,
        "lost_while_held": sum(r["lost"] for r in reports),
    }


def _next_event(gen: subprocess.Popen[str], event: str, timeout: float) -> str:
    assert gen.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = gen.stdout.readline()
        if not line:
            raise RuntimeError(f"a load generator exited (status {gen.poll()})")
        if line.startswith("{") and json.loads(line).get("event") == event:
            return line
    raise RuntimeError(f"no {event!r} from a load generator in {timeout} s")


def roll(server: Supervised, args: argparse.Namespace) -> dict[str, Any]:
    """Phase 2: SIGHUP while --roll-clients ext clients receive numbered broadcasts."""
    import trio

    from bench.rollout import Run

    before = _worker_pids(server.port)
    events: dict[str, float] = {}

    async def scenario() -> Run:
        run = Run(server.port, args.roll_clients, trio.current_time() + 600)
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i, stats in enumerate(run.clients):
                nursery.start_soon(run.client, stats)
                if i % 100 == 99:
                    await trio.sleep(0.1)
            with trio.fail_after(180):
                while any(s.subscribed_at is None for s in run.clients):
                    await trio.sleep(0.2)
            events["subscribed"] = trio.current_time() - t0
            publishing = trio.CancelScope()

            async def publisher() -> None:
                with publishing:
                    await run.publisher(args.publish_interval)

            nursery.start_soon(publisher)
            await trio.sleep(3)
            mark = len(server.text())
            events["sighup"] = trio.current_time() - t0
            server.proc.popen.send_signal(signal.SIGHUP)
            await trio.to_thread.run_sync(
                server.wait_log, r"rolling restart done", mark, 4 * args.drain_period + 240
            )
            events["rolled"] = trio.current_time() - t0
            await trio.sleep(3)
            publishing.cancel()
            last = run.published[-1][0]
            # Wait (bounded) until every client has every message.
            with trio.move_on_after(120):
                while any(last not in s.received for s in run.clients):
                    await trio.sleep(0.5)
            events["settled"] = trio.current_time() - t0
            run.stop = True
            nursery.cancel_scope.cancel()
        return run

    run = trio.run(scenario)
    after = _worker_pids(server.port)
    expected = [seq for seq, _sent in run.published]
    # A publication cancelled in flight may have been made: it is the next number, which
    # every client may then hold; only what the publisher saw answered counts.
    orders = [[x for x in s.order if x <= expected[-1]] for s in run.clients]
    exact = sum(1 for order in orders if order == expected)
    lost = sum(len(set(expected) - set(order)) for order in orders)
    duplicated = sum(len(order) - len(set(order)) for order in orders)
    out_of_order = sum(1 for order in orders if order != sorted(order))
    anomalies = []
    for stats, order in zip(run.clients, orders, strict=True):
        if order != expected and len(anomalies) < 10:
            first = next(i for i, (a, b) in enumerate(zip(order, expected, strict=False)) if a != b)
            anomalies.append(
                {
                    "around": order[max(0, first - 3) : first + 6],
                    "missing": sorted(set(expected) - set(order))[:20],
                    "connects": stats.connects,
                    "resumed": stats.resumed,
                }
            )
    return {
        "clients": args.roll_clients,
        "published": len(expected),
        "clients_exact": exact,
        "lost": lost,
        "duplicated": duplicated,
        "out_of_order_clients": out_of_order,
        "resumed": sum(s.resumed for s in run.clients),
        "history_rejected": sum(s.history_rejected for s in run.clients),
        "connects": sum(s.connects for s in run.clients),
        "workers_before": sorted(before),
        "workers_after": sorted(after),
        "both_replaced": len(after) == 2 and not (before & after),
        "events": {k: round(v, 1) for k, v in events.items()},
        "anomalies": anomalies,
    }


def table(result: dict[str, Any]) -> list[str]:
    h, r = result.get("hold"), result.get("roll")
    rows = []
    if h:
        spread = " / ".join(f"{w['connections']} ({w['rss_mb']} MB)" for w in h["workers"])
        rows += [
            "| connections asked | held | /health says | per worker (RSS) | connect s | "
            "broadcast reached | in s |",
            "|---:|---:|---:|---|---:|---:|---:|",
            f"| {h['conns']} | {h['connected']} | {h['health_connections']} | {spread} | "
            f"{h['connect_seconds']} | {h['broadcast_reached']} | {h['broadcast_seconds']} |",
        ]
    if r:
        rows += [
            "",
            "| ext clients | published | every message once, in order | lost | duplicated | "
            "resumed | history rejected | both workers replaced |",
            "|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {r['clients']} | {r['published']} | {r['clients_exact']} / {r['clients']} | "
            f"{r['lost']} | {r['duplicated']} | {r['resumed']} | {r['history_rejected']} | "
            f"{r['both_replaced']} |",
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the scenario (or, as ``hold``, one load generator); the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["hold"]:
        return _hold_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m bench.workers", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--conns", type=int, default=36000, help="phase 1 (0: skip it)")
    parser.add_argument("--loadgens", type=int, default=3)
    parser.add_argument("--roll-clients", type=int, default=2000, help="phase 2 (0: skip it)")
    parser.add_argument("--publish-interval", type=float, default=0.1)
    parser.add_argument("--drain-period", type=float, default=5.0)
    parser.add_argument("--reconnect-advice", type=float, default=2.0)
    parser.add_argument("--history-limit", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="2,000 connections, 300 clients")
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.conns, args.roll_clients = min(args.conns, 2000), min(args.roll_clients, 300)
    output.check(args, quick=args.quick)
    require("uvloop")
    require("coredis", purpose="the workers' Redis broker")
    redis_server = require_tool(
        "redis-server", "the workers scenario", "apt-get install redis-server"
    )
    out = output.choose(args, "workers", quick=args.quick)
    json_path = (out or output.RESULTS_DIR) / "workers.json"
    procs.raise_nofile()
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory(prefix="workers-") as tmp:
        redis = procs.start_redis(redis_server, tmp)
        redis_port = redis.port
        server = Supervised(f"redis://{HOST}:{redis_port}/0", args, Path(tmp))
        try:
            if args.conns:
                print(f"workers: holding {args.conns} connections ...", file=sys.stderr)
                result["hold"] = hold(server, args)
            if args.roll_clients:
                print(f"workers: SIGHUP under {args.roll_clients} clients ...", file=sys.stderr)
                result["roll"] = roll(server, args)
        finally:
            result["server_exit_status"] = server.stop()
            redis.kill()
            log = Path(tmp) / "server.log"
            result["server_log_tracebacks"] = log.read_text(errors="replace").count("Traceback")
            if os.environ.get("WORKERS_KEEP_LOGS"):
                shutil.copy(log, json_path.parent / "workers-server.log")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    print("\n".join(table(result)))
    print(f"wrote {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from bench import run_main

    sys.exit(run_main("python -m bench.workers", main, sys.argv[1:]))
