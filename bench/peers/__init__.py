"""The servers under test and how to start them.

Every peer is a tiny server of its own module here that speaks one *raw* dialect: it echoes
each text or binary message back, and a text message starting with ``!b`` is broadcast as is
to every connected client (the sender included).  trio_cable runs as itself
(``python -m trio_cable serve``): its raw echo endpoint ``/echo`` and its Action Cable
endpoint ``/cable`` with ``BenchmarkChannel``.

A *target* is what a benchmark talks to: a server, a dialect (``raw`` or ``cable``) and a path.
``trio_cable@<sha>`` and ``trio_cable-cable@<sha>`` are the same targets run from another git
revision's tree (:mod:`bench.baseline`), registered with :func:`add_baseline`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from pathlib import Path

# Long enough that pings do not weigh on per-message CPU figures; wsbench uses the default.
BENCH_PING_INTERVAL = 30.0


@dataclass(frozen=True)
class Target:
    """A server, the dialect its clients speak, the WebSocket path, and what it needs."""

    name: str
    server: str
    dialect: str  # "raw" or "cable"
    path: str
    label: str
    needs: tuple[str, ...] = ()  # optional packages of its server (bench.deps)
    tree: Path | None = None  # run trio_cable from this tree instead (a baseline revision)
    #: permessage-deflate: the server is started with it, the clients offer it.
    compression: bool = False


_WS = ("websockets", "uvloop")
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("picows", "picows", "raw", "/echo", "picows (uvloop)", ("picows", "uvloop")),
        Target("aiohttp", "aiohttp", "raw", "/echo", "aiohttp (uvloop)", ("aiohttp", "uvloop")),
        Target("websockets", "websockets", "raw", "/echo", "websockets (asyncio+uvloop)", _WS),
        Target("trio-raw", "trio-raw", "raw", "/echo", "minimal Trio loop"),
        Target("trio-websocket", "trio-websocket", "raw", "/echo", "trio-websocket"),
        Target("trio_cable", "trio_cable", "raw", "/echo", "trio_cable raw /echo"),
        Target("trio_cable-cable", "trio_cable", "cable", "/cable", "trio_cable Action Cable"),
        Target(
            "websockets-deflate",
            "websockets",
            "raw",
            "/echo",
            "websockets permessage-deflate",
            _WS,
            compression=True,
        ),
        Target(
            "trio_cable-deflate",
            "trio_cable",
            "cable",
            "/cable",
            "trio_cable Action Cable, permessage-deflate",
            compression=True,
        ),
    )
}

_MODULES = {
    "picows": "bench.peers.picows_server",
    "aiohttp": "bench.peers.aiohttp_server",
    "websockets": "bench.peers.websockets_server",
    "trio-raw": "bench.peers.trio_raw_server",
    "trio-websocket": "bench.peers.trio_websocket_server",
}


def add_baseline(short: str, tree: Path) -> list[str]:
    """Register ``<target>@<short>`` for every trio_cable target, run from *tree*; their names."""
    names = []
    # Not the compressing target: revisions before permessage-deflate do not know the flag.
    for base in [
        t
        for t in TARGETS.values()
        if t.server == "trio_cable" and t.tree is None and not t.compression
    ]:
        name = f"{base.name}@{short}"
        TARGETS[name] = replace(base, name=name, label=f"{base.label} @{short}", tree=tree)
        names.append(name)
    return names


def server_command(
    server: str,
    host: str,
    port: int,
    *,
    ping_interval: float | None = None,
    compression: bool = False,
) -> list[str]:
    """The command line that starts *server* listening on ``host:port`` (compressing, with
    permessage-deflate, when *compression*)."""
    extra = ["--compression"] if compression else []
    if server == "trio_cable":
        interval = BENCH_PING_INTERVAL if ping_interval is None else ping_interval
        return [
            sys.executable, "-m", "trio_cable", "serve",
            "--host", host, "--port", str(port),
            "--benchmark-channel", "--echo-path", "/echo",
            "--ping-interval", str(interval), "--log-level", "warning",
            # No handshake rate limit: the peers have none, and the benches measure steady state.
            "--handshake-rate", "0", "--no-adaptive-admission", "--command-rate", "0",
            *extra,
        ]  # fmt: skip
    try:
        module = _MODULES[server]
    except KeyError:
        raise ValueError(f"unknown server {server!r}") from None
    return [sys.executable, "-m", module, "--host", host, "--port", str(port), *extra]
