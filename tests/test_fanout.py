"""Big fan-outs let others in: written in slices by the hub's fan-out task, in publication
order per connection, consecutive ones to one audience joined into one write each."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence

import trio
import trio.testing

from trio_cable import Config, Server
from trio_cable.broker import Broadcast
from trio_cable.metrics import Metrics
from trio_cable.protocol.cable import JSON
from trio_cable.server.hub import FANOUT_SLICE, INLINE_RECIPIENTS, QUEUE_PACE, Hub
from trio_cable.server.transport import WireFormat

PLAIN = WireFormat(JSON, False, bytes, "test-json")


class Recipient:
    """A Subscriber that records what it gets, and costs *cost* seconds of CPU a write."""

    def __init__(self, name: str, cost: float = 0.0) -> None:
        self.sid = name
        self.format = PLAIN
        self.cost = cost
        self.got: list[int] = []
        self.writes = 0

    def _spend(self) -> None:
        end = time.perf_counter() + self.cost
        while time.perf_counter() < end:
            pass

    def send_broadcast(self, frame: bytes, stream: str, offset: int | None) -> None:
        self._spend()
        self.writes += 1
        self.got.append(json.loads(frame)["message"])

    def send_broadcasts(
        self, joined: bytes, frames: Sequence[tuple[bytes, int | None]], stream: str
    ) -> None:
        self._spend()
        self.writes += 1
        assert joined == b"".join(frame for frame, _ in frames)
        self.got += [json.loads(frame)["message"] for frame, _ in frames]

    def cork(self) -> bool:
        return False

    def uncork(self) -> None:
        pass


def broadcast(n: int, stream: str = "s", exclude: str | None = None) -> Broadcast:
    return Broadcast(stream, json.dumps(n), "e", n, exclude)


async def test_a_big_fan_out_yields_and_keeps_order(nursery: trio.Nursery) -> None:
    hub = Hub(Metrics())
    nursery.start_soon(hub.run_fanout)
    await trio.testing.wait_all_tasks_blocked()
    # 20 us a write: 2,000 recipients are 40 ms of work, 20 slices of FANOUT_SLICE.
    recipients = [Recipient(f"r{i}", cost=20e-6) for i in range(2000)]
    for r in recipients:
        hub.add("s", "id", r)
    progress: list[int] = []

    async def watcher() -> None:
        # Runs whenever the fan-out task lets others in: records how far it got.
        while True:
            progress.append(sum(1 for r in recipients if r.got))
            await trio.sleep(0)

    async with trio.open_nursery() as watching:
        watching.start_soon(watcher)
        for n in range(3):
            assert hub.deliver(broadcast(n)) is None  # queued: the publisher goes on
        assert hub.pending_fanouts == 3
        while hub.pending_fanouts:
            await trio.sleep(0)
        watching.cancel_scope.cancel()
    # Other tasks ran while the first fan-out was half written.
    assert any(0 < p < len(recipients) for p in progress)
    assert all(r.got == [0, 1, 2] for r in recipients)
    assert FANOUT_SLICE < 0.01


async def test_small_broadcasts_queue_behind_a_big_one(nursery: trio.Nursery) -> None:
    hub = Hub(Metrics())
    nursery.start_soon(hub.run_fanout)
    await trio.testing.wait_all_tasks_blocked()
    crowd = [Recipient(f"c{i}", cost=10e-6) for i in range(INLINE_RECIPIENTS + 100)]
    for r in crowd:
        hub.add("big", "id", r)
    both = Recipient("both")
    hub.add("big", "id", both)
    hub.add("small", "id", both)
    hub.deliver(broadcast(1, "big"))
    # A small broadcast to a connection in the big audience must not overtake it.
    hub.deliver(broadcast(2, "small"))
    assert hub.pending_fanouts == 2 and both.got == []  # queued behind
    await trio.testing.wait_all_tasks_blocked()
    assert both.got == [1, 2]
    assert hub.deliver(broadcast(3, "small")) is None  # nothing queued: written at once
    assert both.got == [1, 2, 3]


async def test_consecutive_fan_outs_to_one_audience_share_writes(nursery: trio.Nursery) -> None:
    metrics = Metrics()
    hub = Hub(metrics)
    nursery.start_soon(hub.run_fanout)
    await trio.testing.wait_all_tasks_blocked()
    recipients = [Recipient(f"r{i}") for i in range(INLINE_RECIPIENTS + 1)]
    for r in recipients:
        hub.add("s", "id", r)
    for n in range(5):  # one tick: the task has not run yet
        hub.deliver(broadcast(n))
    await trio.testing.wait_all_tasks_blocked()
    assert all(r.got == [0, 1, 2, 3, 4] for r in recipients)
    assert all(r.writes == 1 for r in recipients)  # five frames, one write each
    assert metrics.coalesced_frames_total == 4 * len(recipients)
    # A new subscriber changes the audience: not joined with what was queued before it.
    late = Recipient("late")
    hub.deliver(broadcast(5))
    hub.add("s", "id", late)
    hub.deliver(broadcast(6))
    await trio.testing.wait_all_tasks_blocked()
    assert late.got == [6]
    assert recipients[0].got[-2:] == [5, 6]


async def test_a_long_queue_paces_the_publisher(nursery: trio.Nursery) -> None:
    hub = Hub(Metrics())
    nursery.start_soon(hub.run_fanout)
    await trio.testing.wait_all_tasks_blocked()
    recipients = [Recipient(f"r{i}") for i in range(INLINE_RECIPIENTS + 1)]
    for r in recipients:
        hub.add("s", "id", r)
    waits = [hub.deliver(broadcast(n)) for n in range(QUEUE_PACE + 3)]
    assert waits[: QUEUE_PACE - 1] == [None] * (QUEUE_PACE - 1)
    last = waits[-1]
    assert last is not None
    await last()  # returns once that one (and all before it) was written
    assert recipients[0].got == list(range(QUEUE_PACE + 3))


async def test_exclude_socket_in_a_big_fan_out(nursery: trio.Nursery) -> None:
    hub = Hub(Metrics())
    nursery.start_soon(hub.run_fanout)
    await trio.testing.wait_all_tasks_blocked()
    recipients = [Recipient(f"r{i}") for i in range(INLINE_RECIPIENTS + 1)]
    for r in recipients:
        hub.add("s", "id", r)
    for n, exclude in enumerate([None, "r7", None]):
        hub.deliver(broadcast(n, exclude=exclude))
    await trio.testing.wait_all_tasks_blocked()
    assert recipients[7].got == [0, 2]
    assert recipients[8].got == [0, 1, 2]


# A client process: *count* plain connections subscribed to one stream, reading until
# *expect* broadcasts arrived on each; prints how many arrived out of order (must be 0).
CLIENT = textwrap.dedent(
    """
    import base64, json, os, selectors, socket, sys
    port, count, expect = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ident = json.dumps({"channel": "$pubsub", "stream_name": "crowd"})

    def frame(payload):
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bytes([0x81, 0x80 | len(payload)]) + mask + body

    def messages(buf):
        out = []
        while len(buf) >= 2:
            n, head = buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4: break
                n, head = int.from_bytes(buf[2:4], "big"), 4
            if len(buf) < head + n: break
            out.append(buf[head:head + n]); buf = buf[head + n:]
        return out, buf

    socks, bufs, seen = [], {}, {}
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /cable HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\n"
                   f"Connection: Upgrade\\r\\nSec-WebSocket-Key: {key}\\r\\n"
                   f"Sec-WebSocket-Version: 13\\r\\n"
                   f"Sec-WebSocket-Protocol: actioncable-v1-json\\r\\n\\r\\n").encode())
        got = b""
        while b"welcome" not in got:
            got += s.recv(65536)
        s.sendall(frame(json.dumps({"command": "subscribe", "identifier": ident}).encode()))
        while b"confirm_subscription" not in got:
            got += s.recv(65536)
        s.setblocking(False)
        socks.append(s); bufs[s] = b""; seen[s] = []
    print("ready", flush=True)
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    done = 0
    while done < count:
        for key, _ in sel.select(60):
            s = key.fileobj
            bufs[s] += s.recv(1 << 20)
            msgs, bufs[s] = messages(bufs[s])
            for m in msgs:
                obj = json.loads(m)
                if "identifier" in obj and "message" in obj:
                    seen[s].append(obj["message"])
            if len(seen[s]) >= expect and key in sel.get_map().values():
                sel.unregister(s); done += 1
    bad = sum(1 for s in socks if seen[s][:expect] != list(range(expect)))
    print("out_of_order", bad, flush=True)
    """
)


async def test_every_connection_gets_every_broadcast_in_order(nursery: trio.Nursery) -> None:
    config = Config(port=0, public_streams=True, handshake_rate=0)
    server: Server = await nursery.start(Server(config).serve)
    count, expect = INLINE_RECIPIENTS + 300, 40
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", CLIENT, str(server.port), str(count), str(expect)],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    out = b""
    with trio.fail_after(120):
        while b"ready" not in out:
            out += await proc.stdout.receive_some(1000)
        for n in range(expect):
            await server.broadcast("crowd", n)  # big fan-outs and their queue, in turn
            if n % 7 == 0:
                await trio.sleep(0)
        while chunk := await proc.stdout.receive_some(1000):  # to the end of its output
            out += chunk
        await proc.wait()
    assert proc.returncode == 0, out
    assert out.split(b"out_of_order")[1].split()[0] == b"0"
