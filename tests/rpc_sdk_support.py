"""Helpers for the trio_cable.rpc tests: the scenario application, and real HTTP servers
(uvicorn for ASGI, wsgiref for WSGI) serving it on a free port in a thread."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from trio_cable.rpc import Channel, Connection, HTTPBroadcaster, RPCApp, Unauthorized

RPC_KEY = "rpc-key-for-tests-0123456789abcdef"
BROADCAST_KEY = "broadcast-key-for-tests-0123456789"
#: Session cookie -> user, as a web application's session store would hold them.
SESSIONS = {"ann-session": "ann", "bob-session": "bob"}


def make_app(broadcast_url: str, events: list[tuple[Any, ...]]) -> RPCApp:
    """The scenario: identify from a session cookie, confirm or reject subscriptions, an
    action that transmits and broadcasts, state kept by the server, disconnect seen.  The
    same channel twice, with plain and ``async def`` callbacks."""
    rpc = RPCApp(rpc_secret=RPC_KEY, broadcaster=HTTPBroadcaster(broadcast_url, key=BROADCAST_KEY))

    @rpc.connect
    def connect(conn: Connection) -> dict[str, Any]:
        user = SESSIONS.get(conn.cookies.get("session", ""))
        if user is None:
            raise Unauthorized()
        conn.state["visits"] = 1
        return {"user_id": user}

    @rpc.disconnect
    def disconnect(conn: Connection) -> None:
        events.append(("disconnect", conn.identifiers, conn.state))

    @rpc.channel
    class ChatChannel(Channel):
        def subscribed(self) -> None:
            room = self.params.get("room")
            if room == "secret":
                self.transmit({"sorry": room})
                self.reject()
                return
            self.stream_from(f"chat/{room}", whisper=True)
            self.join_presence(self.identifiers["user_id"], {"name": self.identifiers["user_id"]})
            self.state["joined"] = room
            self.transmit({"hello": room})

        def speak(self, data: dict[str, Any]) -> None:
            self.connection.state["visits"] += 1
            self.transmit({"echo": data["text"]})
            self.broadcast(
                f"chat/{self.params['room']}",
                {"from": self.identifiers["user_id"], "text": data["text"]},
            )

        def forget(self, data: dict[str, Any]) -> None:
            del self.state["joined"]
            self.stop_stream_from(f"chat/{self.params['room']}")

        def bye(self, data: dict[str, Any]) -> None:
            self.connection.disconnect()

        def unsubscribed(self) -> None:
            events.append(("unsubscribed", self.identifier, self.identifiers, self.state))

    @rpc.channel
    class AsyncChatChannel(ChatChannel):
        async def subscribed(self) -> None:  # type: ignore[override]
            super().subscribed()

        async def speak(self, data: dict[str, Any]) -> None:  # type: ignore[override]
            self.connection.state["visits"] += 1
            self.transmit({"echo": data["text"]})
            await self.abroadcast(
                f"chat/{self.params['room']}",
                {"from": self.identifiers["user_id"], "text": data["text"]},
            )

        async def unsubscribed(self) -> None:  # type: ignore[override]
            super().unsubscribed()

    return rpc


def free_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _wait(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not start within {timeout} s")
        time.sleep(0.01)


@contextmanager
def serve_asgi(app: Any, prefix: str = "/anycable") -> Iterator[str]:
    """*app* served by uvicorn (its own asyncio loop, in a thread); yields the RPC base URL."""
    import uvicorn

    sock = free_socket()
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, "uvicorn")
        yield f"http://127.0.0.1:{sock.getsockname()[1]}{prefix}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    # One thread per request, as production WSGI servers serve concurrent calls.
    daemon_threads = True


@contextmanager
def serve_wsgi(app: Any, prefix: str = "/anycable") -> Iterator[str]:
    """*app* served by the standard library's wsgiref server in a thread; yields the base URL."""
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}{prefix}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(30)
