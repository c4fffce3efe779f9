"""The Redis broker on Sentinel and on a Cluster, against real ``redis-server`` and
``redis-sentinel`` processes.

Sentinel: broadcasts flow while the primary is killed and a replica is promoted; what was
kept (sessions, the new primary's streams) and what a resuming client gets for the old
primary's epoch (``reject_history``, never a silent gap or a reused offset).

Cluster: three shards; streams spread over them, each stream's history and offsets stay in
one slot (hash tags), every node receives every broadcast in order, history and the read
barrier work across shards.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import identifier, make_app
from tests.redis_support import REDIS_SERVER, SKIP_REASON, free_port
from tests.test_redis_broker import BROKER_OPTIONS, client_of, wait_for
from trio_cable import Config, Server
from trio_cable.broker import HistoryUnavailable
from trio_cable.broker.redis import RedisBroker, RedisTarget, RedisUnavailable, redact_url

REDIS_SENTINEL = shutil.which("redis-sentinel")
REDIS_CLI = shutil.which("redis-cli")

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)


def _command(port: int, *args: str) -> bytes:
    payload = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        payload += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        return sock.recv(1 << 16)


class Proc:
    """A redis-server / redis-sentinel process on a port, killed at the end."""

    def __init__(self, directory: Path, argv: list[str], port: int) -> None:
        self.port = port
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.proc = subprocess.Popen(
            argv, cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                if _command(port, "PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start on {port}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _server(directory: Path, port: int, *extra: str) -> Proc:
    assert REDIS_SERVER is not None
    argv = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(directory), *extra]  # fmt: skip
    return Proc(directory, argv, port)


# -- URLs -------------------------------------------------------------------------------------


def test_redis_urls_name_the_deployment() -> None:
    assert RedisTarget.parse("redis://h:1/0").kind == "single"
    sentinel = RedisTarget.parse("redis+sentinel://:pw@s1:26379,s2:26380/cable/2")
    assert (sentinel.kind, sentinel.hosts, sentinel.service, sentinel.db) == (
        "sentinel", (("s1", 26379), ("s2", 26380)), "cable", 2,
    )  # fmt: skip
    assert sentinel.password == "pw"
    cluster = RedisTarget.parse("redis+cluster://n1:7000,n2:7001")
    assert (cluster.kind, cluster.hosts) == ("cluster", (("n1", 7000), ("n2", 7001)))
    for bad in ("redis+sentinel://s1:26379", "redis+cluster://n1", "memcached://x:1"):
        with pytest.raises(ValueError):
            RedisTarget.parse(bad)
    with pytest.raises(RedisUnavailable, match="bad URL"):
        RedisBroker("redis+sentinel://:hunter2@s1:1")
    assert "hunter2" not in redact_url("redis+sentinel://:hunter2@s1:1,s2:2/x")


# -- Sentinel ---------------------------------------------------------------------------------


@pytest.fixture
def sentinel_setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    if REDIS_SENTINEL is None:
        pytest.skip("redis-sentinel is not installed (apt-get install redis-sentinel)")
    primary_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    primary = _server(tmp_path / "primary", primary_port)
    replica = _server(
        tmp_path / "replica", replica_port, "--replicaof", "127.0.0.1", str(primary_port)
    )
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor cable 127.0.0.1 {primary_port} 1\n"
        "sentinel down-after-milliseconds cable 1000\n"
        "sentinel failover-timeout cable 5000\n"
    )
    sentinel = Proc(tmp_path / "s", [REDIS_SENTINEL, str(conf)], sentinel_port)
    procs = [primary, replica, sentinel]
    try:
        yield {
            "primary": primary,
            "replica": replica,
            "sentinel": sentinel,
            "url": f"redis+sentinel://127.0.0.1:{sentinel_port}/cable",
        }
    finally:
        for proc in procs:
            proc.kill()


def _primary_port(sentinel_port: int) -> int:
    reply = _command(sentinel_port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", "cable")
    return int(reply.split(b"\r\n")[-2])


async def test_sentinel_failover_keeps_serving_and_rejects_the_old_epoch(
    nursery: trio.Nursery, sentinel_setup: dict[str, Any]
) -> None:
    primary, replica, sentinel = (sentinel_setup[k] for k in ("primary", "replica", "sentinel"))
    nodes = []
    for _ in range(2):
        broker = RedisBroker(sentinel_setup["url"], **BROKER_OPTIONS)
        config = Config(port=0, secret="s3Krit", close_timeout=1.0, sessions_ttl=60)
        nodes.append(await nursery.start(Server(config, make_app(), broker=broker).serve))
    a, b = nodes
    ident = identifier(stream="fo")
    async with client_of(b) as on_b:
        await on_b.subscribe(ident)
        for n in range(1, 4):
            await a.broadcast("fo", n)
        got = [await on_b.recv(raw=True) for _ in range(3)]
        assert [m["message"] for m in got] == [1, 2, 3]
        old_epoch = got[-1]["epoch"]
        await a.broker.save_session("kept-sid", {"x": 1}, 60)
        # Replicated before the primary dies (WAIT: one replica acknowledged every write).
        assert _command(primary.port, "WAIT", "1", "5000").startswith(b":1")

        primary.kill()
        with trio.fail_after(60):
            while _primary_port(sentinel.port) != replica.port:
                await trio.sleep(0.2)
        # Both nodes find the new primary (their pub/sub links come back through Sentinel).
        await wait_for(lambda: a.broker.connected and b.broker.connected, timeout=60)
        # Publications resume; the first on the new primary starts a new epoch.
        with trio.fail_after(60):
            while True:
                await a.broadcast("fo", "after")
                got_after = await on_b.recv(raw=True)
                if got_after.get("epoch") is not None:
                    break
        assert got_after["message"] == "after"
        assert got_after["epoch"] != old_epoch and got_after["offset"] == 1
        # Kept: the session written before the failover.
        assert await b.broker.take_session("kept-sid") == {"x": 1}
        # Rejected: history of the old primary's epoch (its offsets may not all have been
        # replicated), never a silent gap.
        with pytest.raises(HistoryUnavailable):
            await b.broker.history_since_offset("fo", old_epoch, 3)
        history = {"streams": {"fo": {"epoch": old_epoch, "offset": 3}}}
        await on_b.send({"command": "history", "identifier": ident, "history": history})
        while True:
            reply = await on_b.recv()
            if reply.get("type") == "reject_history":
                break
    assert a.broker.stats["redis_reconnects"] >= 1


# -- Cluster ----------------------------------------------------------------------------------


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is a port too, and free."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            port = port - 20000 if port > 30000 else port
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@pytest.fixture
def cluster_url(tmp_path: Path) -> Iterator[str]:
    if REDIS_CLI is None:
        pytest.skip("redis-cli is not installed")
    ports = [_cluster_port() for _ in range(3)]
    procs = [
        _server(tmp_path / str(p), p, "--cluster-enabled", "yes", "--cluster-config-file",
                "nodes.conf", "--cluster-node-timeout", "2000")
        for p in ports
    ]  # fmt: skip
    try:
        out = subprocess.run(
            [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        deadline = time.monotonic() + 30
        while b"cluster_state:ok" not in _command(ports[0], "CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the cluster never became ok"
            time.sleep(0.1)
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    finally:
        for proc in procs:
            proc.kill()


async def test_cluster_spreads_streams_and_keeps_each_in_order(
    nursery: trio.Nursery, cluster_url: str
) -> None:
    nodes = []
    for _ in range(2):
        broker = RedisBroker(cluster_url, **BROKER_OPTIONS)
        config = Config(port=0, secret="s3Krit", close_timeout=1.0, sessions_ttl=60)
        nodes.append(await nursery.start(Server(config, make_app(), broker=broker).serve))
    a, b = nodes
    streams = [f"room/{k}" for k in range(6)]
    # The streams land on more than one shard (else this would test a single server).
    ports = {int(p.rsplit(":", 1)[1]) for p in cluster_url.split("//")[1].split(",")}
    owners = set()
    for stream in streams:
        key = a.broker.history_key(stream)
        slot = int(_command(next(iter(ports)), "CLUSTER", "KEYSLOT", key)[1:].split(b"\r")[0])
        assert slot == int(
            _command(next(iter(ports)), "CLUSTER", "KEYSLOT", a.broker.meta_key(stream))[1:].split(
                b"\r"
            )[0]
        )  # the script's two keys share a slot
        owners.add(slot * 3 // 16384)
    assert len(owners) > 1
    async with client_of(b) as on_b:
        for stream in streams:
            await on_b.subscribe(identifier(stream=stream))
        for n in range(1, 6):
            for stream in streams:
                await a.broadcast(stream, {"s": stream, "n": n})
        seen: dict[str, list[int]] = {s: [] for s in streams}
        with trio.fail_after(60):
            while sum(map(len, seen.values())) < 5 * len(streams):
                got = await on_b.recv(raw=True)
                message = got["message"]
                seen[message["s"]].append(message["n"])
                assert got["offset"] == message["n"]  # offsets count per stream, from 1
        assert all(ns == [1, 2, 3, 4, 5] for ns in seen.values()), seen
        # History across shards, through the read barrier (markers go through each
        # stream's shard).
        epoch = got["epoch"] if got["stream_id"] == streams[-1] else None
        for stream in streams:
            entries = await b.broker.history_since_offset(
                stream, epoch or (await b.broker.stream_position(stream))[0], 2
            )
            assert [e.offset for e in entries] == [3, 4, 5]
            epoch = None
        await b.broker.save_session("cluster-sid", {"y": 2}, 60)
        assert await a.broker.take_session("cluster-sid") == {"y": 2}
    assert b.broker.stats["barrier_timeouts"] == 0
