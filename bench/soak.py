"""``python -m bench soak``: a long run with churning clients, broadcasts and node restarts.

Does the server hold its memory and file descriptors flat while clients come and go for
minutes, broadcasts flow and nodes restart?

**The server process** (``python -m bench.soak --serve SPEC``, pinned to the server core) lives
for the whole run.  It holds one :class:`~trio_cable.broker.memory.MemoryBroker` (stream
history and the session cache: what Redis holds in production), a publisher that broadcasts
steadily on a few streams, and two cable *nodes* (``Server`` instances) on two ports.  Every
``--restart-every`` seconds one node is replaced, alternately: a fresh node starts on the same
port (``SO_REUSEPORT``), the old one stops accepting (``stop_accepting``), slow-drains its clients
(``server_restart`` with reconnect advice) and stops.  Drained clients reconnect and resume their
sessions (ext protocols) on whichever node answers.

Why nodes inside one long-lived process rather than restarting the server process with
``SIGTERM``: a process restart gives the kernel back everything the old process held, so a
leak could never build up across restarts and the RSS curve would only show saw teeth.  With
the process living through every restart, whatever a drained and dropped ``Server`` leaves
behind (tasks, sockets, hub entries, broker subscriptions, sessions) accumulates in the curve.
The ``SIGTERM`` drain of the real CLI process is covered by the drain tests.

**The load generator** (this process, on the other core) runs ``--clients`` client loops over
raw sockets: connect (one of the four subprotocols), welcome, subscribe to one or two streams,
receive broadcasts, sometimes call an action, then leave (clean close or abrupt TCP close) and
come back, resuming the session on ext protocols.  A fifth of the loops keep their connection
for a long time, so every node restart drains someone.

**Sampling**: every ``--sample-every`` seconds the server process's RSS and open file
descriptors (``psutil``), and its live connections, sessions and streams.

**Verdict "flat"**: the least-squares slope of RSS over the last two thirds of the loaded phase
is below ``--rss-slope-limit`` MiB/min (default 0.5; the summary also gives the smallest leak
per connection that slope would reveal at the measured churn), and the open fds after the
clients have gone are back to the idle baseline (±2).  Session and history TTLs are short
(``--ttl``, 30 s) so that the caches reach their steady state in the first third of the run.

Writes ``soak.json``, ``soak.md`` and ``plots/soak.png`` to ``--out DIR`` (default a fresh
``./bench-out/<time>-soak``); ``--update-results`` writes the committed
``bench/results/soak.json``, ``bench/results/soak.md`` and ``bench/plots/soak.png`` instead
(refused for a run shorter than the default ten minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench import output, procs
from bench.deps import require
from bench.procs import HOST, emit

#: The length of a full run (shorter runs are quick: they never replace the committed one).
FULL_MINUTES = 10.0
STREAMS = 8
SUBPROTOCOLS = [
    "actioncable-v1-json",
    "actioncable-v1-ext-json",
    "actioncable-v1-msgpack",
    "actioncable-v1-ext-msgpack",
]

# =================================================================================================
# The server process


def _soak_app() -> Any:
    """The application of the soak run: a connect callback and one channel with an action."""
    from trio_cable import CableApp, Channel, ConnectRequest

    app = CableApp()

    @app.connect
    def connect(request: ConnectRequest) -> dict[str, Any]:
        return {"uid": request.query.get("uid", "anon")}

    @app.channel
    class SoakChannel(Channel):
        """Streams from ``params["stream"]``; ``echo`` transmits its data back."""

        def subscribed(self) -> None:
            self.stream_from(str(self.params.get("stream", "soak-0")))

        def echo(self, data: dict[str, Any]) -> None:
            self.transmit(data)

    return app


async def _serve(spec: dict[str, Any]) -> None:
    """The server process: broker, publisher, two nodes, restarts; controlled over stdin."""
    from trio_cable.broker.memory import MemoryBroker
    from trio_cable.config import Config
    from trio_cable.server import Server

    app = _soak_app()
    broker = MemoryBroker(history_limit=spec["history_limit"], history_ttl=spec["ttl"])
    config_fields = {
        "host": HOST,
        "ping_interval": spec["ping_interval"],
        "drain_period": spec["drain_period"],
        "sessions_ttl": spec["ttl"],
        "history_ttl": spec["ttl"],
        "history_limit": spec["history_limit"],
        "reconnect_advice": 1.0,
        "handshake_rate": 0.0,
        "log_level": "warning",
    }
    nodes: dict[int, tuple[Server, trio.CancelScope, trio.Event]] = {}
    restarts = 0
    published = 0

    async with trio.open_nursery() as nursery:

        async def start_node(slot: int) -> None:
            port = spec["ports"][slot]
            server = Server(Config(**config_fields, port=port), app, broker=broker,
                            listen_socket=procs.listen_socket(port, 1024))  # fmt: skip
            scope = trio.CancelScope()
            done = trio.Event()

            async def run(
                *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
            ) -> None:
                try:
                    with scope:
                        await server.serve(task_status=task_status)
                finally:
                    done.set()

            await nursery.start(run)
            old = nodes.get(slot)
            nodes[slot] = (server, scope, done)
            if old is not None:
                old_server, old_scope, old_done = old
                old_server.stop_accepting()  # out of rotation: the new node gets them all
                await old_server.drain()
                old_scope.cancel()
                await old_done.wait()

        async def restarter() -> None:
            nonlocal restarts
            slot = 0
            while True:
                await trio.sleep(spec["restart_every"])
                emit("restart_begin", slot=slot)
                await start_node(slot)
                restarts += 1
                emit("restart_done", slot=slot, restarts=restarts)
                slot = 1 - slot

        async def publisher() -> None:
            nonlocal published
            interval = 1.0 / spec["publish_rate"]
            pad = "x" * 100
            next_at = trio.current_time()
            while True:
                stream = f"soak-{published % STREAMS}"
                published += 1
                await broker.publish(stream, json.dumps({"seq": published, "pad": pad}))
                next_at += interval
                await trio.sleep_until(max(next_at, trio.current_time()))

        async def sampler() -> None:
            while True:
                servers = [s for s, _scope, _done in nodes.values()]
                emit(
                    "sample",
                    connections=sum(len(s.connections) for s in servers),
                    sessions=len(broker._sessions),
                    streams=len(broker._histories),
                    published=published,
                    restarts=restarts,
                )
                await trio.sleep(spec["sample_every"])

        for slot in (0, 1):
            await start_node(slot)
        nursery.start_soon(publisher)
        nursery.start_soon(sampler)
        restart_scope = trio.CancelScope()

        async def restarts_task() -> None:
            with restart_scope:
                await restarter()

        nursery.start_soon(restarts_task)
        emit("ready", pid=os.getpid())
        stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
        buffer = b""
        while True:
            chunk = await stdin.receive_some(4096)
            buffer += chunk
            if not chunk or b"quit" in buffer:
                break
            if b"stop_restarts" in buffer:
                buffer = buffer.replace(b"stop_restarts", b"")
                restart_scope.cancel()
                emit("restarts_stopped", restarts=restarts)
        metrics = {str(port): s.metrics.snapshot() for port, (s, _sc, _d) in nodes.items()}
        emit("bye", restarts=restarts, published=published, metrics=metrics)
        nursery.cancel_scope.cancel()


def serve_main(spec_path: str) -> None:
    """Entry point of the server process."""
    import logging

    spec = json.loads(Path(spec_path).read_text())  # pinned to the server core by bench.procs
    logging.basicConfig(level="WARNING", format="%(asctime)s server %(levelname)s %(message)s")
    trio.run(_serve, spec)


# =================================================================================================
# The load generator


@dataclass
class LoadStats:
    """What the client loops saw."""

    connects: int = 0
    welcomes: int = 0
    restored: int = 0
    resume_attempts: int = 0
    subscribed: int = 0
    broadcasts: int = 0
    echoes: int = 0
    drained: int = 0
    clean_closes: int = 0
    abrupt_closes: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


def _identifier(stream: int) -> str:
    return json.dumps({"channel": "SoakChannel", "stream": f"soak-{stream}"})


async def client_loop(ports: list[int], stats: LoadStats, rng: random.Random, uid: int,
                      long_lived: bool) -> None:  # fmt: skip
    """One client: connect, subscribe, receive, leave, come back (resuming when it can)."""
    from bench import wsraw

    sid: str | None = None
    subprotocol = rng.choice(SUBPROTOCOLS)
    while True:
        port = rng.choice(ports)
        query = f"uid={uid}"
        resuming = sid is not None and "ext" in subprotocol
        if resuming:
            query += f"&sid={sid}"
            stats.resume_attempts += 1
        try:
            ws = await wsraw.connect(HOST, port, subprotocols=[subprotocol], query=query)
        except wsraw.HandshakeRefused as exc:
            stats.refused[str(exc.status)] += 1
            await trio.sleep(rng.uniform(0.1, 0.5))
            continue
        except OSError as exc:
            stats.errors[f"connect: {type(exc).__name__}"] += 1
            await trio.sleep(rng.uniform(0.1, 0.5))
            continue
        stats.connects += 1
        try:
            sid, subprotocol = await _session(ws, stats, rng, resuming, long_lived)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            stats.errors[f"connection broke: {type(exc).__name__}"] += 1
            sid = None
        finally:
            await ws.aclose()
        await trio.sleep(rng.uniform(0.0, 0.3))


async def _session(ws: Any, stats: LoadStats, rng: random.Random, resuming: bool,
                   long_lived: bool) -> tuple[str | None, str]:  # fmt: skip
    """One connection's life; returns ``(sid to resume next time or None, subprotocol)``."""
    subprotocol = ws.subprotocol or SUBPROTOCOLS[0]
    with trio.move_on_after(5.0) as welcome_scope:
        welcome = await ws.expect(lambda m: m.get("type") in ("welcome", "disconnect"))
    if welcome_scope.cancelled_caught or welcome is None:
        stats.errors["no welcome"] += 1
        return None, subprotocol
    if welcome.get("type") != "welcome":
        stats.refused[f"disconnect {welcome.get('reason')}"] += 1
        return None, subprotocol
    stats.welcomes += 1
    sid = welcome.get("sid")
    restored = bool(welcome.get("restored"))
    if restored:
        stats.restored += 1
    elif resuming:
        stats.errors["session not restored"] += 1
    if not restored:
        for stream in rng.sample(range(STREAMS), rng.choice([1, 2])):
            identifier = _identifier(stream)
            await ws.send_command({"command": "subscribe", "identifier": identifier})
            reply = None
            with trio.move_on_after(5.0):
                reply = await ws.expect(lambda m, i=identifier: m.get("type") == "disconnect"
                                        or (m.get("identifier") == i and "type" in m))  # fmt: skip
            if reply and reply.get("type") == "confirm_subscription":
                stats.subscribed += 1
            elif reply and reply.get("type") == "disconnect" and reply.get("reconnect"):
                stats.drained += 1  # drained while subscribing: come back, start over
                return None, subprotocol
            else:
                stats.errors[f"subscribe: {reply and reply.get('type')}"] += 1
                return None, subprotocol
    lifetime = rng.uniform(20.0, 90.0) if long_lived else rng.uniform(0.5, 6.0)
    deadline = trio.current_time() + lifetime
    want_echo = rng.random() < 0.3
    got_broadcast = False
    silent_since = trio.current_time()
    while trio.current_time() < deadline:
        with trio.move_on_at(min(deadline, trio.current_time() + 1.0)):
            value = await ws.recv_value()
            if value is None and ws.closed:
                if ws.close_code == 1001:  # a drain's close frame right behind its notice
                    stats.drained += 1
                    return sid, subprotocol
                stats.errors[f"closed by server ({ws.close_code})"] += 1
                return None, subprotocol
            if not isinstance(value, dict):
                continue
            kind = value.get("type")
            if kind == "disconnect":
                if value.get("reason") == "server_restart" and value.get("reconnect"):
                    stats.drained += 1
                    await trio.sleep(min(2.0, (value.get("reconnect_after") or 0) / 1000))
                    return sid, subprotocol
                stats.errors[f"disconnect {value.get('reason')}"] += 1
                return None, subprotocol
            message = value.get("message")
            if kind is None and isinstance(message, dict):
                if "seq" in message:
                    stats.broadcasts += 1
                    got_broadcast = True
                    silent_since = trio.current_time()
                    if want_echo:
                        want_echo = False
                        data = json.dumps({"action": "echo", "n": message["seq"]})
                        await ws.send_command({"command": "message",
                                               "identifier": value["identifier"],
                                               "data": data})  # fmt: skip
                elif message.get("action") == "echo":
                    stats.echoes += 1
        if trio.current_time() - silent_since > 5.0:
            stats.errors["no broadcast for 5 s"] += 1
            silent_since = trio.current_time()
    if not got_broadcast and lifetime >= 3.0:  # ~5 broadcasts/s per stream: 3 s gets some
        stats.errors["session of 3 s or more without a broadcast"] += 1
    if rng.random() < 0.5:
        stats.clean_closes += 1
        await ws.close()
    else:
        stats.abrupt_closes += 1
    # Ext clients come back with their sid (resume); others start over.
    return (sid if rng.random() < 0.8 else None), subprotocol


# =================================================================================================
# The run


@dataclass
class ServerHandle:
    """The server process, the last sample it reported, and its events."""

    process: trio.Process
    pid: int = 0
    last: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    ready: trio.Event = field(default_factory=trio.Event)
    bye: dict[str, Any] = field(default_factory=dict)

    async def read_events(self) -> None:
        assert self.process.stdout is not None
        async for event in procs.json_lines(self.process.stdout):
            if event["event"] == "sample":
                self.last = event
            elif event["event"] == "ready":
                self.pid = event["pid"]
                self.ready.set()
            elif event["event"] == "bye":
                self.bye = event
            else:
                self.events.append(event)

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")


def _usage(pid: int) -> tuple[float, int, float]:
    """(RSS MiB, open fds, CPU seconds) of *pid*."""
    import psutil

    proc = psutil.Process(pid)
    times = proc.cpu_times()
    return proc.memory_info().rss / 2**20, proc.num_fds(), times.user + times.system


async def run_soak(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server process, run the clients, sample; return the raw run."""
    procs.raise_nofile()
    server_core, _client = procs.cores()
    procs.pin_self()
    ports = [procs.free_port(), procs.free_port()]
    spec = {
        "ports": ports,
        "ttl": args.ttl,
        "history_limit": 50,
        "ping_interval": 3.0,
        "drain_period": args.drain_period,
        "restart_every": args.restart_every,
        "publish_rate": args.publish_rate,
        "sample_every": args.sample_every,
    }
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    spec_path = workdir / f"soak-spec-{os.getpid()}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"soak-server-{os.getpid()}.log"
    stats = LoadStats()
    samples: list[dict[str, Any]] = []
    load_seconds = args.minutes * 60
    with open(log_path, "wb") as log:
        process = await procs.open_trio(
            procs.python("bench.soak", "--serve", str(spec_path)), core=server_core, nofile=True,
            stderr=log,
        )  # fmt: skip
    handle = ServerHandle(process)
    t0 = time.monotonic()

    def sample(phase: str) -> dict[str, Any]:
        rss, fds, cpu = _usage(handle.pid)
        row = {"t": time.monotonic() - t0, "phase": phase, "rss_mib": rss, "fds": fds,
               "cpu_s": cpu, **{k: handle.last.get(k) for k in
                                ("connections", "sessions", "streams", "published", "restarts")},
               "client_connects": stats.connects}  # fmt: skip
        samples.append(row)
        return row

    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle.read_events)
        with trio.fail_after(30):
            await handle.ready.wait()
        await trio.sleep(2.0)
        sample("idle-before")
        baseline_fds = samples[-1]["fds"]
        rng = random.Random(args.seed)
        load_start = time.monotonic()
        async with trio.open_nursery() as clients:
            for i in range(args.clients):
                clients.start_soon(client_loop, ports, stats, random.Random(rng.getrandbits(64)),
                                   i, i % 5 == 0)  # fmt: skip
                await trio.sleep(0.01)
            while time.monotonic() - load_start < load_seconds:
                await trio.sleep(args.sample_every)
                row = sample("load")
                if not args.quiet and len(samples) % 15 == 0:
                    print(f"[soak] {row['t']:6.0f} s  rss {row['rss_mib']:6.1f} MiB  "
                          f"fds {row['fds']:4d}  conns {row['connections']}  sessions "
                          f"{row['sessions']}  connects {stats.connects}  restarts "
                          f"{row['restarts']}  errors {sum(stats.errors.values())}",
                          file=sys.stderr)  # fmt: skip
            clients.cancel_scope.cancel()
        load_end = time.monotonic()
        # The clients are gone (their sockets closed abruptly when cancelled); no more
        # restarts; let the server notice every close, then sample the idle server.
        await handle.send("stop_restarts")
        settle_until = time.monotonic() + args.settle
        while time.monotonic() < settle_until:
            await trio.sleep(1.0)
            row = sample("idle-after")
            if row["connections"] == 0 and row["fds"] <= baseline_fds:
                break
        for _ in range(3):
            await trio.sleep(1.0)
            sample("idle-after")
        await handle.send("quit")
        with trio.move_on_after(15):
            await process.wait()
        if process.returncode is None:
            process.kill()
        nursery.cancel_scope.cancel()
    log_text = log_path.read_text(errors="replace")
    spec_path.unlink(missing_ok=True)
    return {
        "t0_mono": t0,
        "spec": spec,
        "stats": stats,
        "samples": samples,
        "events": handle.events,
        "bye": handle.bye,
        "load_seconds": load_end - load_start,
        "exit_code": process.returncode,
        "log_errors": [
            ln
            for ln in log_text.splitlines()
            if " ERROR " in ln or "Traceback" in ln or "CRITICAL" in ln
        ][:50],
        "log_path": str(log_path),
    }


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least squares ``y = a + b x``: returns ``(a, b, residual standard deviation)``."""
    n = len(xs)
    if n < 2:
        return (ys[0] if ys else 0.0), 0.0, 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    resid = [y - (a + b * x) for x, y in zip(xs, ys, strict=True)]
    sd = (sum(r * r for r in resid) / max(1, n - 2)) ** 0.5
    return a, b, sd


def verdict(run: dict[str, Any], slope_limit: float, fd_slack: int = 2) -> dict[str, Any]:
    """Is the run flat?  See the module docstring."""
    samples = run["samples"]
    load = [s for s in samples if s["phase"] == "load"]
    before = [s for s in samples if s["phase"] == "idle-before"]
    after = [s for s in samples if s["phase"] == "idle-after"]
    t_start = load[0]["t"] if load else 0.0
    t_end = load[-1]["t"] if load else 0.0
    window = [s for s in load if s["t"] >= t_start + (t_end - t_start) / 3]
    xs = [s["t"] / 60 for s in window]
    a, slope, sd = linear_fit(xs, [s["rss_mib"] for s in window])
    _fd_a, fd_slope, _ = linear_fit(xs, [float(s["fds"]) for s in window])
    stats: LoadStats = run["stats"]
    minutes = run["load_seconds"] / 60 or 1.0
    connects_per_min = stats.connects / minutes
    baseline_fds = before[-1]["fds"] if before else None
    end_fds = after[-1]["fds"] if after else None
    fds_back = (
        baseline_fds is not None and end_fds is not None and end_fds <= baseline_fds + fd_slack
    )
    rss_flat = slope < slope_limit
    return {
        "flat": bool(rss_flat and fds_back),
        "rss_flat": rss_flat,
        "fds_back_to_baseline": fds_back,
        "rss_slope_mib_per_min": slope,
        "rss_slope_limit_mib_per_min": slope_limit,
        "rss_fit_intercept_mib": a,
        "rss_residual_sd_mib": sd,
        "rss_window_minutes": [xs[0], xs[-1]] if xs else [],
        "fds_slope_per_min": fd_slope,
        "smallest_leak_per_connection_bytes": (
            slope_limit * 2**20 / connects_per_min if connects_per_min else None
        ),
        "connects_per_min": connects_per_min,
        "rss_mib_idle_before": before[-1]["rss_mib"] if before else None,
        "rss_mib_idle_after": after[-1]["rss_mib"] if after else None,
        "rss_mib_max": max(s["rss_mib"] for s in samples),
        "rss_mib_window_first": window[0]["rss_mib"] if window else None,
        "rss_mib_window_last": window[-1]["rss_mib"] if window else None,
        "fds_idle_before": baseline_fds,
        "fds_idle_after": end_fds,
        "fds_max": max(s["fds"] for s in samples),
        "connections_max": max((s["connections"] or 0) for s in samples),
    }


def plot(run: dict[str, Any], result: dict[str, Any], path: Path) -> None:
    """RSS, fds and live connections over time, restarts marked, fitted slope drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = run["samples"]
    ts = [s["t"] / 60 for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    ax1.plot(ts, [s["rss_mib"] for s in samples], color="tab:blue", lw=1.2, label="server RSS")
    v = result["verdict"]
    if v["rss_window_minutes"]:
        x0, x1 = v["rss_window_minutes"]
        a, b = v["rss_fit_intercept_mib"], v["rss_slope_mib_per_min"]
        ax1.plot([x0, x1], [a + b * x0, a + b * x1], color="tab:red", lw=1.5, ls="--",
                 label=f"fit over the last 2/3: {b:+.3f} MiB/min")  # fmt: skip
    ax1.set_ylabel("RSS (MiB)")
    ax1.legend(loc="lower right")
    ax1.grid(alpha=0.3)
    ax2.plot(ts, [s["fds"] for s in samples], color="tab:green", lw=1.2, label="open fds")
    ax2.plot(ts, [s["connections"] or 0 for s in samples], color="tab:gray", lw=0.8,
             label="live connections")  # fmt: skip
    ax2.set_ylabel("count")
    ax2.set_xlabel("minutes")
    ax2.legend(loc="upper right")
    ax2.grid(alpha=0.3)
    t0 = run.get("t0_mono")
    for event in run["events"]:
        if event["event"] == "restart_begin" and t0 is not None:
            for ax in (ax1, ax2):
                ax.axvline((event["t"] - t0) / 60, color="tab:orange", lw=0.6, alpha=0.6)
    fig.suptitle(f"soak: {result['minutes']:g} min, {result['clients']} client loops, "
                 f"restart every {result['spec']['restart_every']:g} s (orange) — "
                 f"{'flat' if v['flat'] else 'NOT flat'}")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(result: dict[str, Any], plot_link: str = "../plots/soak.png") -> str:
    """The run as a Markdown section (*plot_link*: the plot, relative to the section's file)."""
    v = result["verdict"]
    s = result["load"]
    leak = v["smallest_leak_per_connection_bytes"]
    lines = [
        "## Soak",
        "",
        f"- date: {result['date']}; {result['minutes']:g} min of load, {result['clients']} client "
        f"loops (a fifth long-lived), restart every {result['spec']['restart_every']:g} s "
        f"(drain period {result['spec']['drain_period']:g} s), {result['spec']['publish_rate']:g} "
        f"broadcasts/s on {STREAMS} streams, session/history TTL {result['spec']['ttl']:g} s",
        f"- **verdict: {'flat' if v['flat'] else 'NOT flat'}** — RSS slope over the last 2/3 "
        f"{v['rss_slope_mib_per_min']:+.3f} MiB/min (limit {v['rss_slope_limit_mib_per_min']:g}; "
        f"residual sd {v['rss_residual_sd_mib']:.2f} MiB); open fds idle {v['fds_idle_before']} "
        f"before → {v['fds_idle_after']} after (max {v['fds_max']} under load)",
        f"- RSS: {v['rss_mib_idle_before']:.1f} MiB idle before, max {v['rss_mib_max']:.1f}, "
        f"{v['rss_mib_window_first']:.1f} → {v['rss_mib_window_last']:.1f} MiB across the fit "
        f"window, {v['rss_mib_idle_after']:.1f} MiB idle after",
        f"- load: {s['connects']:,} connections ({v['connects_per_min']:,.0f}/min; at most "
        f"{v['connections_max']} at once), {s['welcomes']:,} welcomed, {s['subscribed']:,} "
        f"subscriptions, {s['broadcasts']:,} broadcasts received, {s['echoes']:,} echoes; "
        f"{s['drained']:,} drained by restarts, {s['resume_attempts']:,} resume attempts, "
        f"{s['restored']:,} restored; {s['clean_closes']:,} clean and {s['abrupt_closes']:,} "
        f"abrupt closes; {result['restarts']} node restarts",
        f"- sensitivity: at this churn, the slope limit reveals a leak of "
        f"{leak:,.0f} bytes per connection"
        if leak
        else "- sensitivity: n/a",
        f"- refused handshakes: {dict(s['refused']) or 'none'}; client-side errors: "
        f"{dict(s['errors']) or 'none'}; server log errors: {len(result['log_errors'])}",
        "",
        f"![soak]({plot_link})",
    ]
    return "\n".join(lines) + "\n"


#: Sizes of a full run and of ``--quick`` (the smoke test's); an option given wins.
FULL = {"minutes": FULL_MINUTES, "clients": 150, "restart_every": 45.0, "drain_period": 2.0,
        "sample_every": 2.0, "settle": 20.0}  # fmt: skip
QUICK = {"minutes": 0.12, "clients": 12, "restart_every": 4.0, "drain_period": 0.5,
         "sample_every": 1.0, "settle": 10.0}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m bench soak [--minutes M]``; returns 0 when the run is flat."""
    parser = argparse.ArgumentParser(
        prog="python -m bench soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, help="length of the loaded phase (default 10)")
    parser.add_argument("--clients", type=int, help="client loops (default 150)")
    parser.add_argument("--restart-every", type=float, help="seconds between node restarts "
                        "(default 45)")  # fmt: skip
    parser.add_argument("--drain-period", type=float, help="seconds (default 2)")
    parser.add_argument("--publish-rate", type=float, default=40.0, help="broadcasts per second")
    parser.add_argument("--ttl", type=float, default=30.0, help="session and history TTL (s)")
    parser.add_argument("--sample-every", type=float, help="seconds (default 2)")
    parser.add_argument("--settle", type=float, help="seconds to wait for the server to go idle "
                        "after the load (default 20)")  # fmt: skip
    parser.add_argument("--rss-slope-limit", type=float, default=0.5, help="MiB/min")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a few seconds, 12 clients (the "
                        "smoke test's sizes)")  # fmt: skip
    output.add_arguments(parser)
    parser.add_argument("--workdir", default="", help="spec and server log (default: a temp dir)")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the summary (no samples)")
    parser.add_argument("--serve", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve_main(args.serve)
        return 0
    quick = output.sizes(args, FULL, QUICK, "soak")
    require("psutil")
    require("matplotlib")
    from bench.conditions import conditions

    json_path, md_path, png_path = output.files(output.choose(args, "soak", quick=quick), "soak")
    started = time.time()
    run = trio.run(run_soak, args)
    stats: LoadStats = run["stats"]
    result: dict[str, Any] = {
        "bench": "soak",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "minutes": args.minutes,
        "quick": quick,
        "clients": args.clients,
        "spec": run["spec"],
        "verdict": verdict(run, args.rss_slope_limit),
        "load": {**{k: v for k, v in stats.__dict__.items()}},
        "restarts": run["bye"].get("restarts", 0),
        "published": run["bye"].get("published", 0),
        "server_exit_code": run["exit_code"],
        "log_errors": run["log_errors"],
        "samples": run["samples"],
        "conditions": conditions(),
    }
    plot(run, result, png_path)
    md = markdown(result, os.path.relpath(png_path, md_path.parent))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    md_path.write_text(md)
    if not args.quiet:
        print(md, file=sys.stderr)
        print(f"wrote {json_path}, {md_path} and {png_path}", file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k not in ("samples", "conditions")},
                         default=str))  # fmt: skip
    return 0 if result["verdict"]["flat"] else 1


if __name__ == "__main__":
    from bench import run_main

    sys.exit(run_main("python -m bench.soak", main, sys.argv[1:]))
