"""Garbage-collector discipline: a closed connection leaves no reference cycle behind, so the
server can freeze long-lived objects out of the collector's full passes (gc_control.py)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

import pytest
import trio

from trio_cable import Config, Server

# A client in another process (its own objects must not count): connects, is welcomed,
# subscribes, then leaves the way *how* says: a close frame, a TCP reset, or by waiting for
# the server to close it.
CLIENT = textwrap.dedent(
    """
    import base64, json, os, socket, struct, sys
    port, count, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    ident = json.dumps({"channel": "BenchmarkChannel", "id": "1"})

    def frame(payload, opcode=1):
        mask = os.urandom(4)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body

    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET /cable HTTP/1.1\\r\\nHost: x\\r\\nUpgrade: websocket\\r\\n"
                   f"Connection: Upgrade\\r\\nSec-WebSocket-Key: {key}\\r\\n"
                   f"Sec-WebSocket-Version: 13\\r\\n"
                   f"Sec-WebSocket-Protocol: actioncable-v1-ext-json\\r\\n\\r\\n").encode())
        got = b""
        while b"welcome" not in got:
            got += s.recv(65536)
        sub = json.dumps({"command": "subscribe", "identifier": ident}).encode()
        s.sendall(frame(sub))
        while b"confirm_subscription" not in got:
            got += s.recv(65536)
        socks.append(s)
    print("ready", flush=True)
    if how == "server":
        sys.stdin.readline()
    for s in socks:
        if how == "close":
            s.sendall(frame(struct.pack("!H", 1000), opcode=8))
            s.recv(65536)
        elif how == "reset":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    """
)


@pytest.mark.parametrize("how", ["close", "reset", "server"])
async def test_closed_connections_leave_no_cycles(nursery: trio.Nursery, how: str) -> None:
    config = Config(port=0, benchmark_channel=True, handshake_rate=0, close_timeout=1.0)
    server: Server = await nursery.start(Server(config).serve)
    await trio.sleep(0.1)
    count = 300
    gc.collect()
    gc.disable()
    try:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", CLIENT, str(server.port), str(count), how],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdin is not None
        with trio.fail_after(120):
            line = b""
            while b"ready" not in line:
                line += await proc.stdout.receive_some(100)
            while len(server.connections) < count:
                await trio.sleep(0.05)
            if how == "server":
                for conn in list(server.connections):
                    conn.close()
                while server.connections:
                    await trio.sleep(0.05)
                await proc.stdin.send_all(b"go\n")
            await proc.wait()
            while server.connections:
                await trio.sleep(0.05)
        await trio.sleep(0.2)
        found = gc.collect()
    finally:
        gc.enable()
    # Nothing per connection (300 were opened and closed); a few objects of Trio's own may
    # come and go.  Before, each closed connection left 19 objects in cycles.
    assert found < 50, found


async def test_survivors_of_a_full_collection_are_frozen(nursery: trio.Nursery) -> None:
    server: Server = await nursery.start(Server(Config(port=0)).serve)
    before = server.metrics.gc_full_collections_total
    gc.collect()  # a full pass, as the collector itself would run one
    with trio.fail_after(20):
        while gc.get_freeze_count() == 0:
            await trio.sleep(0.02)
    assert server.metrics.gc_full_collections_total == before + 1
    assert server.metrics.value("gc_frozen_objects") > 0
    assert server.metrics.histograms["gc_full_pause_seconds"].count >= 1
