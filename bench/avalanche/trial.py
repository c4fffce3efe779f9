"""One trial: a server process, load-generator processes, an optional restart, the raw data.

The orchestrator (this process) pins itself to the client core with the load generators;
the server process gets a core of its own.  Every wait is bounded (``max_wait``), and the
child processes are killed on the way out whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench import procs

SECRET = "avalanche-bench-secret-0123456789abcdef"  # loopback-only benchmark secret
_BOOT = 1.5  # seconds for a child process to import trio_cable and start
#: With this variable set to a directory, the server serves its dashboard (``--dashboard``)
#: and headless Chromium screenshots it every few seconds while the trial runs, into it.
DASHBOARD_ENV = "TRIO_CABLE_BENCH_DASHBOARD"
_DASHBOARD_KEY = "avalanche-bench-dashboard-key-0123456789"
_SHOT_EVERY = 2.0


@dataclass
class ClientOpts:
    """How the clients of a row behave (trio_cable.client.open_cable arguments)."""

    subprotocol: str = "actioncable-v1-ext-json"
    strategy: str = "full_jitter"
    base: float = 0.5
    cap: float = 30.0
    linearized: bool = True
    resume: bool = True
    jwt: bool = False
    signed: bool = False
    subscribe_timeout: float = 5.0
    connect_timeout: float = 10.0
    ping_interval: float = 10.0


@dataclass
class TrialSpec:
    """Everything one trial needs."""

    name: str
    clients: int
    subs: int = 5
    streams: int = 100
    msg_interval: float = 2.0  # seconds between two messages on one stream
    server: dict[str, Any] = field(default_factory=dict)  # Config overrides
    cost: dict[str, float] = field(default_factory=dict)  # demo app cost
    client: ClientOpts = field(default_factory=ClientOpts)
    restart: str | None = None  # None, "hard" or "drain"
    ramp: float = 2.0  # seconds over which the clients start
    steady: float = 2.0  # seconds all-ready before the restart
    loadgens: int = 2
    max_wait: float = 60.0  # bound on each waiting phase
    settle: float = 2.0  # after recovery, before the publisher stops
    boot_gap: float = 1.0  # hard restart: seconds without a listener
    #: The application answers over AnyCable HTTP RPC from a process of its own
    #: (bench.avalanche.rpc_app, on the server core) instead of in the server's process.
    rpc: bool = False


class Child:
    """A child process speaking JSON lines on stdout and reading commands on stdin."""

    def __init__(self, process: trio.Process, name: str) -> None:
        self.process = process
        self.name = name
        self.events: dict[str, dict[str, Any]] = {}
        self.last_status: dict[str, Any] = {}
        self.changed = trio.Event()

    async def send(self, line: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    async def pump(self, on_line: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Read lines until EOF, remembering the last of each event kind."""
        assert self.process.stdout is not None
        async for item in procs.json_lines(self.process.stdout):
            if item.get("event") == "status":
                self.last_status = item
            else:
                self.events[item["event"]] = item
            if on_line is not None:
                on_line(item)
            self.changed.set()
            self.changed = trio.Event()

    async def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while name not in self.events:
                await self.changed.wait()
        return self.events[name]

    def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)


async def _spawn(module: str, spec_path: Path, name: str, log: Path, core: int | None) -> Child:
    with log.open("ab") as stderr:
        process = await procs.open_trio(
            procs.python(module, str(spec_path)), core=core, nofile=True, stderr=stderr
        )
    return Child(process, name)


def _split(total: int, parts: int) -> list[tuple[int, int]]:
    out, start = [], 0
    for k in range(parts):
        count = total // parts + (1 if k < total % parts else 0)
        if count:
            out.append((start, count))
        start += count
    return out


def _dashboard_config() -> dict[str, Any]:
    if not os.environ.get(DASHBOARD_ENV):
        return {}
    return {"dashboard": True, "dashboard_key": _DASHBOARD_KEY}


async def _screenshots(port: int, out: Path, tag: str) -> None:
    """Open the dashboard in headless Chromium, log in, and keep a screenshot every few
    seconds (``<tag>-<seconds>.png``) until cancelled with the trial.  Never fails a trial:
    a browser problem is reported and the trial goes on."""
    from bench.browser import CHROMIUM

    if CHROMIUM is None:
        print("dashboard screenshots: chromium is not installed", file=sys.stderr)
        return
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="dashboard-chromium-") as profile:
            await _shoot(port, Path(profile), out, tag, started)
    except Exception as exc:  # a screenshot is a bonus, never the trial's failure
        print(f"dashboard screenshots stopped: {exc!r}", file=sys.stderr)


async def _shoot(port: int, profile: Path, out: Path, tag: str, started: float) -> None:
    from bench.browser import chromium_page

    async with chromium_page(f"http://127.0.0.1:{port}/_dashboard", profile) as page:
        await page.call(
            "Emulation.setDeviceMetricsOverride",
            width=1500, height=1150, deviceScaleFactor=1, mobile=False,
        )  # fmt: skip
        await page.wait_for("!!document.getElementById('key')")
        await page.evaluate(
            f"document.getElementById('key').value = {_DASHBOARD_KEY!r};"
            "document.getElementById('login').requestSubmit(); true"
        )
        await page.wait_for("dashboard.points.length >= 1")
        while True:
            elapsed = int(time.monotonic() - started)
            (out / f"{tag}-{elapsed:03d}.png").write_bytes(await page.screenshot())
            await trio.sleep(_SHOT_EVERY)


async def run_trial(
    spec: TrialSpec, workdir: Path, on_progress: Callable[[str, int, int], None] | None = None
) -> dict[str, Any]:
    """Run one trial; returns the raw data (client records, server samples, timings)."""
    workdir.mkdir(parents=True, exist_ok=True)
    server_core, client_core = procs.cores()
    port = procs.free_port()
    tag = spec.name.replace(" ", "_").replace("+", "p").replace("/", "_")
    rpc_config: dict[str, Any] = {}
    app_spec_path: Path | None = None
    app_port = procs.free_port() if spec.rpc else 0
    if spec.rpc:
        rpc_config = {"rpc_host": f"http://127.0.0.1:{app_port}"}
        app_spec_path = workdir / f"{tag}.app_spec.json"
    server_spec = {
        "port": port,
        "rpc": spec.rpc,
        "config": {"log_level": "warning", **spec.server, **rpc_config, **_dashboard_config()},
        "cost": spec.cost,
        "streams": spec.streams,
        "msg_interval": spec.msg_interval,
        "boot_gap": spec.boot_gap,
        "samples_out": str(workdir / f"{tag}.server.json"),
    }
    # Outputs of an earlier run with the same tag must not pass for this run's.
    for stale in workdir.glob(f"{tag}.*"):
        stale.unlink()
    server_path = workdir / f"{tag}.server_spec.json"
    server_path.write_text(json.dumps(server_spec))
    if app_spec_path is not None:
        app_spec_path.write_text(json.dumps({
            "port": app_port, "secret": SECRET, "cost": spec.cost,
            "samples_out": str(workdir / f"{tag}.app.json"),
        }))  # fmt: skip
    log = workdir / f"{tag}.log"
    log.write_text("")
    children: list[Child] = []
    timeline: list[tuple[float, int, int]] = []  # (t, ready, connected), all load generators
    # (t, generator, CPU seconds, loop lag): is the load generator itself keeping up?
    gen_timeline: list[tuple[float, int, float, float]] = []
    progress = on_progress or (lambda phase, done, total: None)
    try:
        async with trio.open_nursery() as nursery:
            app: Child | None = None
            if app_spec_path is not None:
                # The application first: the server's first connect must find it.  It shares
                # the server core, where the in-process rows run their callbacks.
                app = await _spawn("bench.avalanche.rpc_app", app_spec_path, "app", log,
                                   server_core)  # fmt: skip
                children.append(app)
                nursery.start_soon(app.pump)
                await app.wait_event("ready", 30)
            server = await _spawn(
                "bench.avalanche.server_proc", server_path, "server", log, server_core
            )
            children.append(server)
            nursery.start_soon(server.pump)
            await server.wait_event("ready", 30)
            start_at = time.monotonic() + _BOOT
            gens: list[Child] = []
            for k, (first, count) in enumerate(_split(spec.clients, spec.loadgens)):
                gen_spec = {
                    "url": f"ws://127.0.0.1:{port}/cable",
                    "clients": [first, count],
                    "subs": spec.subs,
                    "streams": spec.streams,
                    "client": {**asdict(spec.client), "secret": SECRET},
                    "start_at": start_at,
                    "ramp": spec.ramp,
                    "result_out": str(workdir / f"{tag}.clients{k}.json"),
                    "seed": 7,
                }
                path = workdir / f"{tag}.loadgen{k}.json"
                path.write_text(json.dumps(gen_spec))
                gen = await _spawn("bench.avalanche.loadgen", path, f"loadgen{k}", log, client_core)
                gens.append(gen)
                children.append(gen)

            def totals() -> tuple[int, int]:
                return (
                    sum(g.last_status.get("ready", 0) for g in gens),
                    sum(g.last_status.get("connected", 0) for g in gens),
                )

            changed = trio.Event()

            def on_status(item: dict[str, Any], k: int) -> None:
                nonlocal changed
                if item.get("event") == "status":
                    gen_timeline.append((item["t"], k, item["cpu"], item["lag"]))
                    ready, connected = totals()
                    timeline.append((time.monotonic(), ready, connected))
                    changed.set()
                    changed = trio.Event()

            for k, gen in enumerate(gens):
                nursery.start_soon(gen.pump, lambda item, k=k: on_status(item, k))
            shots = os.environ.get(DASHBOARD_ENV)
            if shots:
                nursery.start_soon(_screenshots, port, Path(shots), tag)

            async def until(condition: Callable[[], bool], phase: str, timeout: float) -> bool:
                with trio.move_on_after(timeout):
                    while not condition():
                        progress(phase, totals()[0], spec.clients)
                        await changed.wait()
                    progress(phase, totals()[0], spec.clients)
                    return True
                return False

            t0 = start_at
            initial_ok = await until(
                lambda: totals()[0] >= spec.clients,
                "connecting",
                spec.ramp + _BOOT + spec.max_wait,
            )
            t_initial = time.monotonic()
            t_restart = None
            recovered = initial_ok
            if spec.restart and initial_ok:
                await trio.sleep(spec.steady)
                t_restart = time.monotonic()
                await server.send(f"restart {spec.restart}")
                recovered = await until(
                    lambda: "restart_done" in server.events and totals()[0] >= spec.clients,
                    "recovering",
                    spec.max_wait,
                )
            t_recovered = time.monotonic()
            await trio.sleep(spec.settle)
            await server.send("stop_publish")
            final = await server.wait_event("final", 10)
            await trio.sleep(1.5)  # the last messages reach the clients
            for gen in gens:
                await gen.send("finish")
            with trio.move_on_after(60):
                for gen in gens:
                    await gen.wait_event("done", 60)
            await server.send("quit")
            with trio.move_on_after(30):
                await server.wait_event("bye", 30)
            if app is not None:
                await app.send("quit")
                with trio.move_on_after(30):
                    await app.wait_event("bye", 30)
            nursery.cancel_scope.cancel()
    finally:
        for child in children:
            child.kill()
    clients: list[dict[str, Any]] = []
    for k in range(len(_split(spec.clients, spec.loadgens))):
        path = workdir / f"{tag}.clients{k}.json"
        if path.exists():
            clients.extend(json.loads(path.read_text()))
    server_data_path = workdir / f"{tag}.server.json"
    server_data = json.loads(server_data_path.read_text()) if server_data_path.exists() else {}
    app_data_path = workdir / f"{tag}.app.json"
    app_data = json.loads(app_data_path.read_text()) if app_data_path.exists() else None
    return {
        "spec": asdict(spec),
        "t0": t0,
        "t_initial": t_initial,
        "initial_ok": initial_ok,
        "t_restart": t_restart,
        "restart_begin": server.events.get("restart_begin"),
        "restart_done": server.events.get("restart_done"),
        "t_recovered": t_recovered,
        "recovered": recovered,
        "final_seqs": final.get("seqs", {}),
        "restart_seqs": (server.events.get("restart_begin") or {}).get("seqs"),
        "timeline": timeline,
        "gen_timeline": gen_timeline,
        "clients": clients,
        "server": server_data,
        "app": app_data,
    }
