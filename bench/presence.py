"""Scenario **presence** (issue 16): a drain of a big presence stream, events per member.

Two ``trio-cable serve --broker redis`` nodes share one ``redis-server`` (started here in a
temp dir, no persistence).  ``--members`` raw WebSocket clients (``actioncable-v1-ext-json``,
one Trio process on the client core) subscribe to one public stream with ``presence`` (each
its own id) on node A.  Once the stream holds every member, node A gets SIGTERM (a slow drain
over ``--drain-period`` s, the way a deploy restarts a node); each client, told
``server_restart``, reconnects to node B after its backoff (uniform in ``--reconnect-min``
.. ``--reconnect-max`` s), either resuming its session (``sid``, then ``join`` again as
``@anycable/core`` does) or as a new session that subscribes with presence.

Measured: the presence messages the members receive from the SIGTERM until the stream is
quiet again (and every linger is over), per member, for each row:

- ``naive``: no linger (``--presence-ttl 0``), no coalescing, clients do not resume: N
  leaves and N joins, each sent to every member (about 2N per member, N^2 in all);
- ``+ linger``: ``--presence-ttl 15``, clients come back as new sessions of the same id;
- ``+ coalescing``: ``--presence-window 0.1`` alone;
- ``all``: linger, coalescing and session resume (the defaults, and what @anycable/core does).

Also ``info`` at 10,000 members, in process: the cost of answering a ``presence`` command.

    python -m bench presence [--members 2000] [--quick] [--out DIR | --update-results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench import output, procs
from bench.deps import require
from bench.procs import HOST, free_port
from bench.wsraw import RawWS, connect, http_request

STREAM = "presence/bench"
KEY = "presence-bench-key"
SUBPROTOCOL = "actioncable-v1-ext-json"
IDENTIFIER = json.dumps({"channel": "$pubsub", "stream_name": STREAM})
PRESENCE_PREFIX = b'{"type":"presence"'

#: (row, presence ttl, presence window, clients resume)
ROWS: list[tuple[str, float, float, bool]] = [
    ("naive", 0.0, 0.0, False),
    ("+ linger", 15.0, 0.0, False),
    ("+ coalescing", 0.0, 0.1, False),
    ("all (defaults + resume)", 15.0, 0.1, True),
]


def _node(port: int, redis_url: str, ttl: float, window: float, drain: float, log: Any) -> Any:
    return procs.start(
        procs.python(
            "trio_cable", "serve", f"--host={HOST}", f"--port={port}", "--broker=redis",
            f"--redis-url={redis_url}", "--public-streams", f"--broadcast-key={KEY}",
            f"--presence-ttl={ttl}", f"--presence-window={window}", f"--drain-period={drain}",
            f"--shutdown-timeout={drain + 20}", "--reconnect-advice=0", "--handshake-rate=0",
            "--no-adaptive-admission", "--command-rate=0", "--ping-interval=30",
            "--log-level=warning",
        ),
        name=f"node:{port}", port=port, core=procs.cores()[0], nofile=True, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


@dataclass
class Crowd:
    """The members' shared counters."""

    counting: bool = False
    presence_messages: int = 0
    published: int = 0  # presence events published through Redis while counting
    on_b: int = 0
    last_presence: float = 0.0
    resumed: int = 0
    errors: list[str] = field(default_factory=list)


def _parser() -> Any:
    from trio_cable import _speedups

    return _speedups.FrameParser(max_message_size=1 << 26, require_mask=False)


async def _open(port: int, query: str = "") -> tuple[RawWS, dict[str, Any]]:
    ws = await connect(HOST, port, subprotocols=[SUBPROTOCOL], query=query)
    welcome = await ws.expect(lambda m: m.get("type") == "welcome")
    # The welcome is all the server sends before the client's first command: from here on
    # the compiled parser (thousands of presence messages per member in the naive row).
    ws.parser = _parser()
    return ws, welcome


async def member(index: int, a: int, b: int, resume: bool, delay: float, crowd: Crowd) -> None:
    """One member: join on node A, count presence messages, move to B when told (after
    *delay* seconds, as a client's reconnect backoff would)."""
    presence = {"id": f"u{index}"}
    subscribe = {"command": "subscribe", "identifier": IDENTIFIER, "presence": presence}
    ws, welcome = await _open(a)
    sid = welcome["sid"]
    await ws.send_command(subscribe)
    moved = False
    while True:
        message = await ws.recv()
        if message is None:
            if moved:
                return
            # Node A is draining: over to node B after the client's backoff.
            await ws.aclose()
            await trio.sleep(delay)
            ws, welcome = await _open(b, f"sid={sid}" if resume else "")
            if welcome.get("restored"):
                crowd.resumed += 1
                if IDENTIFIER not in welcome.get("restored_ids", ()):
                    crowd.errors.append(f"u{index}: restored without its subscription")
                # What @anycable/core does for a restored subscription with presence.
                await ws.send_command(
                    {"command": "join", "identifier": IDENTIFIER, "presence": presence}
                )
            else:
                await ws.send_command(subscribe)
            moved = True
            crowd.on_b += 1
            continue
        _opcode, payload = message
        if bytes(payload[: len(PRESENCE_PREFIX)]) == PRESENCE_PREFIX:
            crowd.last_presence = time.monotonic()
            if crowd.counting:
                crowd.presence_messages += 1
        elif b'"disconnect"' in bytes(payload[:40]):
            await ws.aclose()
            ws.closed = True


async def count_published(redis_port: int, crowd: Crowd) -> None:
    """Count the presence events the nodes publish through Redis (every ``join`` and
    ``leave`` made, whether or not it reached anyone): ``redis-cli SUBSCRIBE`` on the
    brokers' channel, one ``["<stream>",null,"presence"]`` header per event."""
    process = await trio.lowlevel.open_process(
        ["redis-cli", "-p", str(redis_port), "SUBSCRIBE", "trio_cable:pubsub"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    marker, tail = b',"presence"]', b""
    try:
        async for chunk in process.stdout:
            data = tail + chunk
            if crowd.counting:
                crowd.published += data.count(marker)
            tail = data[-(len(marker) - 1) :]
    finally:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


async def presence_total(port: int) -> int:
    status, body = await http_request(
        HOST, port, "GET", f"/api/presence/{STREAM.replace('/', '%2F')}?records=false",
        headers={"Authorization": f"Bearer {KEY}"},
    )  # fmt: skip
    return int(json.loads(body)["total"]) if status == 200 else -1


async def metric(port: int, name: str) -> float:
    _status, body = await http_request(HOST, port, "GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(f"trio_cable_{name} ") or line.startswith(f"{name} "):
            return float(line.split()[-1])
    return 0.0


async def run_row(
    row: tuple[str, float, float, bool], args: argparse.Namespace, redis_port: int, logdir: Path
) -> dict[str, Any]:
    redis_url = f"redis://{HOST}:{redis_port}/0"
    name, ttl, window, resume = row
    n = args.members
    ports = free_port(), free_port()
    logs = [open(logdir / f"{name.split()[-1]}-{i}.log", "wb") for i in (0, 1)]  # noqa: SIM115
    nodes = [
        _node(port, redis_url, ttl, window, args.drain_period, log)
        for port, log in zip(ports, logs, strict=True)
    ]
    crowd = Crowd()
    result: dict[str, Any] = {"row": name, "members": n, "presence_ttl": ttl,
                              "presence_window": window, "resume": resume}  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(count_published, redis_port, crowd)

            async def one(index: int) -> None:
                try:
                    delay = random.uniform(args.reconnect_min, args.reconnect_max)
                    await member(index, ports[0], ports[1], resume, delay, crowd)
                except (OSError, trio.BrokenResourceError) as exc:
                    crowd.errors.append(f"u{index}: {exc!r}")

            # The arrival is N^2/2 presence messages whatever the pace (every join reaches
            # everyone there): batches of 100, each present before the next comes.
            ramp_started = time.monotonic()
            for start in range(0, n, 100):
                for index in range(start, min(n, start + 100)):
                    nursery.start_soon(one, index)
                await _reach(ports[1], min(n, start + 100) - len(crowd.errors))
            result["present_before"] = await presence_total(ports[1])
            result["ramp_s"] = round(time.monotonic() - ramp_started, 1)
            await _quiet(crowd, 1.0, args.timeout)
            await trio.sleep(2.0)  # the nodes save the sessions the arrival changed
            # The drain: counted from SIGTERM until quiet and every linger is over.
            crowd.counting = True
            started = time.monotonic()
            nodes[0].popen.send_signal(signal.SIGTERM)
            with trio.fail_after(args.timeout):
                while crowd.on_b < n - len(crowd.errors):
                    await trio.sleep(0.1)
            result["moved_s"] = round(time.monotonic() - started, 1)
            await trio.sleep(ttl + 1.0)  # the lingers end (and their leaves, if any, go out)
            await _quiet(crowd, 2.0, args.timeout)
            last = crowd.last_presence - started if crowd.presence_messages else 0.0
            result["settled_s"] = round(last, 1)
            result["events_published"] = crowd.published
            result["presence_messages"] = crowd.presence_messages
            result["per_member"] = round(crowd.presence_messages / n, 2)
            result["final_total"] = await presence_total(ports[1])
            result["resumed"] = crowd.resumed
            coalesced = await metric(ports[1], "presence_events_coalesced_total")
            result["coalesced_on_b"] = int(coalesced)
            result["events_fanned_out_on_b"] = int(await metric(ports[1], "presence_events_total"))
            result["errors"] = len(crowd.errors)
            if crowd.errors:
                print(f"  errors: {crowd.errors[:5]}", file=sys.stderr)
            nursery.cancel_scope.cancel()
    finally:
        for node in nodes:
            node.stop(10)
        for log in logs:
            log.close()
    return result


async def _reach(port: int, total: int, patience: float = 10.0) -> None:
    """Wait until the stream's presence holds *total* members, or it stopped growing for
    *patience* seconds (a join lost under load: the row reports it)."""
    best, since = -1, time.monotonic()
    while (now := await presence_total(port)) < total:
        if now > best:
            best, since = now, time.monotonic()
        elif time.monotonic() - since > patience:
            return
        await trio.sleep(0.1)


async def _quiet(crowd: Crowd, seconds: float, timeout: float) -> None:
    """Wait until no presence message arrived for *seconds*."""
    with trio.fail_after(timeout):
        while time.monotonic() - max(crowd.last_presence, 0.0) < seconds:
            await trio.sleep(0.2)


def info_cost(members: int = 10_000, repeats: int = 200) -> dict[str, Any]:
    """The cost of answering a ``presence`` command at *members* (memory broker and the
    node's InfoAnswers: records built and encoded once per change), unchanged (µs) and
    right after a change (ms)."""
    from trio_cable.broker.presence import PresenceState
    from trio_cable.protocol import cable
    from trio_cable.server.presence import InfoAnswers

    state = PresenceState()
    answers = InfoAnswers()
    for i in range(members):
        state.join(STREAM, f"sid{i}", f"user{i}", {"name": f"User {i}"})

    def answer() -> bytes:  # what a session does for a presence command
        total, records = state.info(STREAM)
        return answers.encoder(STREAM, total, records, True).encode(cable.JSON, IDENTIFIER)

    size = len(answer())
    started = time.perf_counter()
    for _ in range(repeats):
        answer()
    unchanged = (time.perf_counter() - started) / repeats
    started = time.perf_counter()
    for i in range(repeats):
        state.join(STREAM, "sid0", "user0", {"name": f"renamed {i}"})  # a change: rebuilt
        answer()
    changed = (time.perf_counter() - started) / repeats
    return {"members": members, "bytes": size, "unchanged_us": round(unchanged * 1e6, 1),
            "after_change_ms": round(changed * 1e3, 2)}  # fmt: skip


def table(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "## Presence under a drain (issue 16)",
        "",
        f"`python -m bench presence --members {args.members}` ({when}, 2 vCPU shared, "
        "loopback): two `trio-cable serve --broker redis` nodes on the server core, "
        f"{args.members} raw ext-json clients on the client core, each present on one public "
        f"stream under its own id. Node A gets SIGTERM ({args.drain_period} s slow drain); "
        "every client reconnects to node B after a delay uniform in "
        f"[{args.reconnect_min}, {args.reconnect_max}] s (its backoff). Counted: presence "
        "events the brokers made (joins and leaves published through Redis, each meant for "
        "every member) and presence messages the members received, from the SIGTERM until the "
        "stream was quiet and every linger was over.",
        "",
        "| row | presence-ttl | presence-window | resume | present before | events made | "
        "presence messages received | per member | coalesced (node B) | clients resumed | "
        "final total | settled after (s) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['row']} | failed: {r['failed'][:200]} |")
            continue
        lines.append(
            f"| {r['row']} | {r['presence_ttl']:g} | {r['presence_window']:g} | "
            f"{'yes' if r['resume'] else 'no'} | {r['present_before']} | "
            f"{r['events_published']:,} | "
            f"{r['presence_messages']:,} | {r['per_member']} | "
            f"{r['coalesced_on_b']:,} | {r['resumed']} | {r['final_total']} | {r['settled_s']} |"
        )
    lines += [
        "",
        f"`info` at {info['members']:,} members (in process, memory broker, one `presence` "
        f"answer of {info['bytes']:,} bytes): {info['unchanged_us']} µs when the set is "
        f"unchanged (the bytes encoded at the last change), {info['after_change_ms']} ms right "
        "after a change (records rebuilt and encoded once).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the presence scenario; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bench presence", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--members", type=int, default=2000)
    parser.add_argument("--drain-period", type=float, default=3.0)
    parser.add_argument("--reconnect-min", type=float, default=0.5,
                        help="a client's reconnect delay is uniform in [min, max] s")  # fmt: skip
    parser.add_argument("--reconnect-max", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=300.0, help="bound of each phase (s)")
    parser.add_argument("--rows", default="", help="comma-separated row numbers (default all)")
    parser.add_argument("--quick", action="store_true",
                        help="200 members (refuses --update-results)")  # fmt: skip
    output.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.members = 200
    quick = args.quick or args.members < 2000
    output.check(args, quick=quick, why_quick="a run below 2,000 members")
    require("coredis", purpose="the nodes' Redis broker")
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise output.UsageError("redis-server is needed (apt-get install redis-server)")
    out = output.choose(args, "presence", quick=quick, why_quick="a run below 2,000 members")
    json_path = (out or output.RESULTS_DIR) / "presence.json"
    md_path = (out or output.RESULTS_DIR) / "presence.md"
    procs.raise_nofile()
    procs.pin_self()
    rows = [ROWS[int(i) - 1] for i in args.rows.split(",") if i] or ROWS
    results = []
    with tempfile.TemporaryDirectory(prefix="presence-") as tmp:
        redis = procs.start_redis(redis_server, tmp)
        redis_port = redis.port
        try:
            for row in rows:
                print(f"presence: {row[0]}, {args.members} members ...", file=sys.stderr)
                with contextlib.suppress(Exception):
                    subprocess.run(
                        ["redis-cli", "-p", str(redis_port), "FLUSHALL"],
                        check=False, capture_output=True,
                    )  # fmt: skip
                try:
                    result = trio.run(run_row, row, args, redis_port, Path(tmp))
                except Exception as exc:  # one row's failure is a result, not the end
                    result = {"row": row[0], "members": args.members, "failed": repr(exc)}
                results.append(result)
                print(f"  {json.dumps(result)}", file=sys.stderr)
        finally:
            redis.kill()
    info = info_cost()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"rows": results, "info": info}, indent=1))
    md_path.write_text(table(results, info, args))
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from bench import run_main

    sys.exit(run_main("python -m bench.presence", main, sys.argv[1:]))
