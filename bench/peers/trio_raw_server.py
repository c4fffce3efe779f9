"""A minimal Trio WebSocket loop on raw non-blocking sockets: the floor for a Trio server.

Handshake by hand, frames parsed in Python with ``websockets.speedups.apply_mask`` for the
unmasking, every complete frame of a read handled before waiting again, and a broadcast
frame built once and written to every socket with a non-blocking ``send``.  No fragmentation,
no extensions, no validation: a measuring stick, not a server.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import socket
import struct

import trio
from websockets.speedups import apply_mask

from bench.peers._args import parse

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLIENTS: set[socket.socket] = set()


def frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked, final server frame."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x80 | opcode, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Non-blocking send; wait for writability only when the kernel buffer is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def recv(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(262144)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def handshake(sock: socket.socket) -> bytes | None:
    """Answer the upgrade request; return bytes received after it, or None."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await recv(sock)
        if not chunk or len(data) > 16384:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    key = b""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"sec-websocket-key":
            key = value.strip()
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    await send_all(
        sock,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n",
    )
    return rest


async def serve_client(sock: socket.socket) -> None:
    try:
        buf = await handshake(sock)
        if buf is None:
            return
        CLIENTS.add(sock)
        while True:
            while len(buf) >= 6:
                opcode, n = buf[0] & 0x0F, buf[1] & 0x7F
                pos = 2
                if n == 126:
                    (n,), pos = struct.unpack_from("!H", buf, 2), 4
                elif n == 127:
                    (n,), pos = struct.unpack_from("!Q", buf, 2), 10
                if len(buf) < pos + 4 + n:
                    break
                payload = apply_mask(buf[pos + 4 : pos + 4 + n], buf[pos : pos + 4])
                buf = buf[pos + 4 + n :]
                if opcode == 8:
                    await send_all(sock, frame(8, payload[:2]))
                    return
                if opcode == 1 and payload[:2] == b"!b":
                    out = frame(1, payload)
                    for client in list(CLIENTS):
                        try:
                            await send_all(client, out)
                        except OSError:
                            CLIENTS.discard(client)
                elif opcode in (1, 2):
                    await send_all(sock, frame(opcode, payload))
            chunk = await recv(sock)
            if not chunk:
                return
            buf += chunk
    except OSError:
        pass
    finally:
        CLIENTS.discard(sock)
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def main() -> None:
    args = parse(__doc__ or "")
    listener = socket.create_server((args.host, args.port), backlog=4096)
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            for _ in range(64):
                try:
                    sock, _addr = listener.accept()
                except BlockingIOError:
                    break
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                nursery.start_soon(serve_client, sock)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        trio.run(main)
