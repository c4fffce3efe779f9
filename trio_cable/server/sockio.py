"""Small non-blocking socket helpers for Trio on plain ``socket.socket`` objects.

The server keeps stdlib sockets in non-blocking mode and calls ``send``/``recv_into``
directly, waiting with ``trio.lowlevel.wait_readable``/``wait_writable`` only when the kernel
says the call would block.  That skips Trio's socket wrappers (a checkpoint per call), which a
profile showed to be a fifth of a small-message server's time (ARCHITECTURE.md).
"""

from __future__ import annotations

import socket
import ssl

import trio

# A non-blocking call that would block: plain sockets raise BlockingIOError, TLS sockets
# SSLWantReadError / SSLWantWriteError (a TLS write may need a read first, and vice versa).
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
WOULD_BLOCK_READ = (BlockingIOError, ssl.SSLWantReadError)


async def recv_some(sock: socket.socket, max_bytes: int = 65536) -> bytes:
    """Receive at least one byte, or ``b""`` at end of stream (or on a reset connection)."""
    while True:
        try:
            return sock.recv(max_bytes)
        except WOULD_BLOCK_READ:
            await trio.lowlevel.wait_readable(sock)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(sock)
        except (ConnectionResetError, ConnectionAbortedError, TimeoutError, ssl.SSLError):
            return b""


async def send_all(sock: socket.socket, data: bytes) -> None:
    """Write all of *data*; raises ``OSError`` if the peer went away."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, ssl.SSLWantWriteError):
            await trio.lowlevel.wait_writable(sock)
            continue
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(sock)
            continue
        view = view[sent:]


def close_socket(sock: socket.socket) -> None:
    """Close *sock*, first waking any task that waits on it (Trio requires that)."""
    if sock.fileno() == -1:
        return
    trio.lowlevel.notify_closing(sock)
    sock.close()


async def tls_handshake(sock: ssl.SSLSocket) -> None:
    """Run a non-blocking TLS server handshake to completion (the caller sets a deadline)."""
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(sock)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(sock)
