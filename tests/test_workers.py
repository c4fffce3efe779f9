"""``trio-cable serve --workers N``: real supervisor and worker processes, a real redis-server.

Every test runs ``python -m trio_cable serve --workers 2 --broker redis`` on a free port and
talks to it over real sockets; which worker a connection reaches is the kernel's choice
(``SO_REUSEPORT``), so the tests ask ``/health`` where their clients landed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.procs import ROOT
from tests.redis_support import REDIS_SERVER, SKIP_REASON, RedisProcess
from tests.test_drain_resume import LeanClient
from trio_cable.client import Backoff, open_cable
from trio_cable.config import ConfigError, load_config
from trio_cable.server.cluster import PUBLISH_INTERVAL, STALE

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)

KEY = "workers-test-broadcast-key"
STREAM = "feed"
PUBSUB = {"stream_name": STREAM}


# -- refusals ------------------------------------------------------------------------------------


def test_more_than_one_worker_needs_redis_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trio_cable", "serve", "--workers", "2", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("trio-cable: --workers: 2 workers need --broker redis")
    # The environment and the TOML file say it too, naming themselves.
    with pytest.raises(ConfigError, match=r"^TRIO_CABLE_WORKERS: 3 workers need --broker redis"):
        load_config({}, environ={"TRIO_CABLE_WORKERS": "3"})
    toml = tmp_path / "cable.toml"
    toml.write_text("workers = 2\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(toml))}: workers: 2 workers need"):
        load_config({}, environ={}, toml_path=str(toml))
    assert load_config({"workers": "2", "broker": "redis"}, environ={}).workers == 2
    assert load_config({"workers": "1"}, environ={}).workers == 1  # no supervisor, any broker


def test_auto_is_one_worker_per_core() -> None:
    config = load_config({"workers": "auto", "broker": "redis"}, environ={})
    assert config.workers == (os.cpu_count() or 1)
    with pytest.raises(ConfigError, match=r"--workers: must be >= 1, not 0"):
        load_config({"workers": "0"}, environ={})


# -- a supervised server --------------------------------------------------------------------------


class Supervised:
    """``trio-cable serve --workers 2 --broker redis`` with its log read into a list."""

    def __init__(self, redis_url: str, extra: list[str]) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trio_cable",
                "serve",
                "--workers=2",
                "--broker=redis",
                f"--redis-url={redis_url}",
                "--port=0",
                "--public-streams",
                f"--broadcast-key={KEY}",
                "--drain-period=2",
                "--reconnect-advice=1",
                "--handshake-rate=0",
                *extra,
            ],
            cwd=ROOT,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.wait_for(r"trio_cable listening on (ws://\S+)", timeout=60)
        match = re.search(r"listening on (ws://\S+)", line)
        assert match
        self.url = match.group(1)
        self.port = int(self.url.rsplit(":", 1)[1].split("/")[0])

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, pattern: str, timeout: float = 30, start: int = 0) -> str:
        """The first log line from index *start* on that matches *pattern* (waiting)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no log line matches {pattern!r}:\n" + "".join(self.lines[-60:]))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(10)
        return self.proc.returncode


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def supervised(redis: RedisProcess, *extra: str) -> Iterator[Supervised]:
    server = Supervised(redis.url, list(extra))
    try:
        yield server
    finally:
        status = server.stop()
        log = "".join(server.lines)
        assert "Traceback" not in log, log[-4000:]
        assert status == 0, log[-4000:]


async def http(port: int, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request on a fresh connection (so any worker may answer it)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        if body:
            head += f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n"
        await stream.send_all(head.encode() + b"\r\n" + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


async def health(port: int) -> dict:
    status, body = await http(port, "GET", "/health")
    assert status == 200, body
    return json.loads(body)


async def metrics(port: int) -> dict[str, float]:
    status, body = await http(port, "GET", "/metrics")
    assert status == 200, body
    out: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def publish(port: int, text: str) -> None:
    body = json.dumps({"stream": STREAM, "data": json.dumps(text)}).encode()
    status, answer = await http(port, "POST", "/_broadcast", body)
    assert status == 201, answer


async def wait_until(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    """Poll the async *predicate* until it returns something truthy."""
    with trio.move_on_after(timeout):
        while True:
            result = await predicate()
            if result:
                return result
            await trio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def lean_subscriber(port: int) -> LeanClient:
    client = await LeanClient.connect(port)
    assert (await client.message() or {}).get("type") == "welcome"
    identifier = json.dumps({"channel": "$pubsub", **PUBSUB})
    await client.send({"command": "subscribe", "identifier": identifier})
    assert (await client.message() or {}).get("type") == "confirm_subscription"
    return client


# -- two workers, one port -----------------------------------------------------------------------


async def test_two_workers_serve_one_port_and_share_broadcasts_and_metrics(redis) -> None:
    with supervised(redis) as server:
        port = server.port
        clients = [await lean_subscriber(port) for _ in range(8)]

        async def spread() -> list[int] | None:
            # Connect more until both workers hold some (the kernel hashes each connection).
            doc = await health(port)
            counts = [w["connections"] for w in doc["workers"]]
            if len(counts) == 2 and min(counts) > 0 and doc["connections"] == len(clients):
                return counts
            if len(clients) < 200 and len(counts) == 2 and min(counts) == 0:
                clients.append(await lean_subscriber(port))
            return None

        counts = await wait_until(spread, 60, "clients on both workers")
        assert sum(counts) == len(clients)

        # A broadcast made through whichever worker answers POST reaches every client.
        for n in range(3):
            await publish(port, f"hello {n}")
        for client in clients:
            for n in range(3):
                message = await client.message()
                assert message is not None and message["message"] == f"hello {n}"

        # /metrics answers for both: each worker wrote only its own clients' frames, so the
        # server's total is three frames per client whichever worker the scrape reaches.
        async def aggregated() -> dict[str, float] | None:
            m = await metrics(port)
            if m.get("trio_cable_broadcast_frames_total") == 3 * len(clients):
                return m
            return None

        await wait_until(aggregated, 30, "aggregate metrics")
        # The other workers' figures are as of their last snapshot (one a second).
        await trio.sleep(2.5 * PUBLISH_INTERVAL)
        for _ in range(6):
            m = await metrics(port)
            assert m["trio_cable_workers"] == 2
            assert m["trio_cable_connections"] == len(clients)
            assert m["trio_cable_broadcast_frames_total"] == 3 * len(clients)
            per_worker = {k: v for k, v in m.items() if k.startswith("trio_cable_worker_conn")}
            assert len(per_worker) == 2 and sum(per_worker.values()) == len(clients)
            assert m["trio_cable_connections_total"] >= len(clients)
            assert m["trio_cable_draining"] == 0

        # SIGTERM to the supervisor: every worker slow-drains its clients, then it exits.
        server.proc.send_signal(signal.SIGTERM)
        for client in clients:
            with trio.fail_after(30):
                message = await client.message()
            assert message is not None
            assert (message["type"], message["reason"]) == ("disconnect", "server_restart")
            assert message["reconnect"] is True and "reconnect_after" in message
            await client.stream.aclose()
        status = await trio.to_thread.run_sync(server.proc.wait, 60)
        assert status == 0
        exits = [line for line in server.lines if re.search(r"worker \d \(pid \d+\) exited", line)]
        assert len(exits) == 2 and all("status 0" in line for line in exits), exits


# -- rolling restart and crashes, with the trio_cable client ---------------------------------------


class Receiver:
    """One trio_cable client (extended JSON protocol) that records what it receives."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.connects = 0
        self.subscribed = trio.Event()

    async def run(self, url: str) -> None:
        def on_event(event) -> None:  # type: ignore[no-untyped-def]
            if event.kind == "connected":
                self.connects += 1

        backoff = Backoff("full_jitter", base=0.2, cap=2.0)
        async with open_cable(url, backoff=backoff, on_event=on_event) as cable:
            subscription = await cable.subscribe("$pubsub", PUBSUB)
            self.subscribed.set()
            async for message in subscription:
                self.received.append(int(message.data))


async def roll_scenario(
    server: Supervised, clients: int, *, action, messages_after: int = 40
) -> list[Receiver]:  # type: ignore[no-untyped-def]
    """*clients* receivers subscribe; numbered messages are published every 50 ms while
    *action* (a rolling restart, a kill) runs; then every receiver must hold every number
    once, in order."""
    port = server.port
    receivers = [Receiver() for _ in range(clients)]
    published = 0
    # Generous: the receivers share this process, and the machine may be busy.
    patience = 120 + clients / 2
    async with trio.open_nursery() as nursery:
        for i, receiver in enumerate(receivers):
            nursery.start_soon(receiver.run, server.url)
            if i % 50 == 49:
                await trio.sleep(0.2)
        with trio.fail_after(patience):
            for receiver in receivers:
                await receiver.subscribed.wait()

        stop_publishing = trio.Event()
        publisher_done = trio.Event()

        async def publisher() -> None:
            nonlocal published
            while not stop_publishing.is_set():
                for _attempt in range(50):  # a publication refused by a draining worker
                    try:
                        await publish(port, str(published + 1))
                        break
                    except (AssertionError, OSError):
                        await trio.sleep(0.1)
                else:
                    raise AssertionError(f"publication {published + 1} refused 50 times")
                published += 1
                await trio.sleep(0.05)
            publisher_done.set()

        nursery.start_soon(publisher)
        await trio.sleep(1)
        await action()
        start = published
        with trio.fail_after(patience):
            while published < start + messages_after:
                await trio.sleep(0.1)
        stop_publishing.set()
        with trio.fail_after(60):
            await publisher_done.wait()  # a publication in flight counts, once answered
        with trio.move_on_after(patience):
            while any(len(r.received) < published for r in receivers):
                await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    expected = list(range(1, published + 1))
    bad = [r for r in receivers if r.received != expected]
    assert not bad, f"{len(bad)} of {clients} clients saw other than 1..{published} once in " + (
        "order: " + "; ".join(_deviation(r.received, expected, r.connects) for r in bad[:5])
    )
    return receivers


def _deviation(got: list[int], expected: list[int], connects: int) -> str:
    """Where *got* first differs from *expected*, for a failure message."""
    pairs = enumerate(zip(got, expected, strict=False))
    first = next((i for i, (a, b) in pairs if a != b), len(got))
    missing = sorted(set(expected) - set(got))[:10]
    return (
        f"connects {connects}, ... {got[max(0, first - 3) : first + 6]} ..., "
        f"missing {missing}, dups {len(got) - len(set(got))}"
    )


@pytest.mark.parametrize(
    "clients", [200, pytest.param(1000, marks=pytest.mark.slow)], ids=lambda n: f"{n}-clients"
)
async def test_sighup_rolls_both_workers_while_clients_lose_nothing(redis, clients) -> None:
    with supervised(redis) as server:
        port = server.port
        before = {w["pid"] for w in (await health(port))["workers"]}
        assert len(before) == 2
        accepted_before = 0.0

        async def roll() -> None:
            nonlocal accepted_before
            m = await metrics(port)
            accepted_before = m["trio_cable_connections_total"]
            mark = len(server.lines)
            server.proc.send_signal(signal.SIGHUP)
            await trio.to_thread.run_sync(
                lambda: server.wait_for(r"rolling restart done", timeout=300, start=mark)
            )

        receivers = await roll_scenario(server, clients, action=roll)

        async def two_workers() -> set[int] | None:
            # (An answer may hold one worker's figures alone if Redis is slow to answer.)
            pids = {w["pid"] for w in (await health(port))["workers"]}
            return pids if len(pids) == 2 else None

        after = await wait_until(two_workers, 30, "two workers in /health")
        assert not (after & before), (before, after)
        assert all(r.connects >= 2 for r in receivers if r.received)  # each was moved

        async def all_gone() -> bool:  # the receivers left (others' figures: a second late)
            return (await health(port))["connections"] == 0

        await wait_until(all_gone, 30, "no connections")
        # Counters do not go back when the workers that counted them leave.
        m = await metrics(port)
        assert m["trio_cable_connections_total"] >= accepted_before + clients


async def test_a_killed_worker_is_replaced_and_its_clients_resume(redis) -> None:
    with supervised(redis) as server:
        port = server.port
        victim = 0

        async def kill() -> None:
            nonlocal victim
            doc = await health(port)
            victim = max(doc["workers"], key=lambda w: w["connections"])["pid"]
            mark = len(server.lines)
            os.kill(victim, signal.SIGKILL)
            await trio.to_thread.run_sync(
                lambda: server.wait_for(r"worker \d \(pid \d+\) is serving", 60, start=mark)
            )

        await roll_scenario(server, 100, action=kill)
        assert any(re.search(rf"pid {victim}\) exited on its own", line) for line in server.lines)

        # Its figures leave the aggregate once its last snapshot is STALE (it said no goodbye).
        async def replaced() -> bool:
            pids = {w["pid"] for w in (await health(port))["workers"]}
            return len(pids) == 2 and victim not in pids

        await wait_until(replaced, STALE + 30, "the killed worker out of /health")


def _alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


async def test_workers_drain_and_exit_when_the_supervisor_is_killed(redis) -> None:
    server = Supervised(redis.url, [])
    try:
        pids = [w["pid"] for w in (await health(server.port))["workers"]]
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        server.proc.kill()  # SIGKILL: nothing forwarded, the socket pairs close
        with trio.fail_after(60):
            while any(_alive(pid) for pid in pids):
                await trio.sleep(0.1)
    finally:
        server.stop()
    assert sum("the supervisor is gone: draining" in line for line in server.lines) == 2


def test_a_worker_that_cannot_start_stops_the_start_with_its_message() -> None:
    from tests.redis_support import free_port

    nobody = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "trio_cable", "serve", "--workers=2", "--broker=redis",
         f"--redis-url={nobody}", "--port=0", "--log-level=warning"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "trio-cable: broker redis: cannot connect to" in result.stderr
    assert "Traceback" not in result.stderr
