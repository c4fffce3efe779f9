"""A small AnyCable HTTP RPC application for the RPC tests: a stdlib HTTP/1.1 server (keep-
alive) in a thread of its own, so that it is a real peer on a real socket and its slowness
never stalls the Trio loop under test.

It records every request it *applied* (and, apart, those it turned away with 503), so that a
test can tell a retried request the application had already applied from one it refused.
Its behaviour can be changed while it runs: ``capacity`` (at most that many requests applied
at once, the rest answered 503 with ``Retry-After``), ``delay`` (seconds each applied
request takes), ``stop()``/``start()`` (dead, then back on the same port).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Applied:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


class RpcTestApp:
    """The application: a chat with cookie login (see :meth:`handle`)."""

    def __init__(self, key: str | None = None) -> None:
        self.key = key
        self.capacity: int | None = None
        self.retry_after = "1"
        self.delay = 0.0
        self.applied: list[Applied] = []
        self.refused = 0  # 503s answered
        self.max_active = 0
        self._active = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._conns: set[socket.socket] = set()
        self._thread: threading.Thread | None = None
        self.port = 0

    # -- running -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/_anycable"

    def start(self) -> None:
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # Head and body are two writes: without this, Nagle and the client's delayed
                # ACK add 40 ms to every answer.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with app._lock:
                    app._conns.add(self.connection)

            def finish(self) -> None:
                with app._lock:
                    app._conns.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                status, answer, extra = app.serve(self.path, dict(self.headers.items()), raw)
                payload = json.dumps(answer).encode() if answer is not None else b""
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                for name, value in extra:
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # (5 by default: a burst of new connections is refused)

        server = Server(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Dead: the port refuses connections (the open keep-alive ones are cut)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    # -- what it counts ------------------------------------------------------------------

    def calls(self, path: str) -> list[Applied]:
        return [a for a in list(self.applied) if a.path.endswith(path)]

    def duplicates(self) -> list[Applied]:
        """Applied requests that were applied before, byte for byte the same body and sid
        (the tests make every request unique: a duplicate is a retry of an applied one)."""
        seen: set[tuple[str, str, str]] = set()
        out = []
        for a in list(self.applied):
            key = (a.path, a.headers.get("x-anycable-meta-sid", ""), json.dumps(a.body))
            if key in seen:
                out.append(a)
            seen.add(key)
        return out

    # -- serving -------------------------------------------------------------------------

    def serve(
        self, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, Any, list[tuple[str, str]]]:
        headers = {k.lower(): v for k, v in headers.items()}
        if path == "/_control":  # the test process steers the application process
            for name, value in json.loads(raw).items():
                setattr(self, name, value)
            return 200, {}, []
        if path == "/_stats":
            applied = [{"path": a.path, "headers": a.headers, "body": a.body} for a in self.applied]
            return 200, {"applied": applied, "refused": self.refused}, []
        if self.key is not None and headers.get("authorization") != f"Bearer {self.key}":
            return 401, None, []
        with self._lock:
            if self.capacity is not None and self._active >= self.capacity:
                self.refused += 1
                return 503, None, [("retry-after", self.retry_after)]
            self._active += 1
            self.max_active = max(self.max_active, self._active)
        try:
            try:
                body = json.loads(raw)
            except ValueError:
                return 422, None, []  # (a request cut short: the server under test stopped)
            self.applied.append(Applied(path, headers, body))
            if self.delay:
                time.sleep(self.delay)
            return 200, self.handle(path.rsplit("/", 1)[-1], body, headers), []
        finally:
            with self._lock:
                self._active -= 1

    def handle(self, method: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, Any]:
        """Cookie ``user=NAME`` logs in; channel ``Chat`` (``room``) streams ``chat/<room>``,
        ``Secret`` rejects; action ``say`` transmits an echo, ``count`` keeps a counter in
        the channel state, ``leave`` disconnects."""
        env = body.get("env") or {}
        sid = headers.get("x-anycable-meta-sid", "")
        if method == "connect":
            cookies = dict(
                part.strip().split("=", 1)
                for part in env.get("headers", {}).get("cookie", "").split(";")
                if "=" in part
            )
            user = cookies.get("user")
            if not user:
                return {
                    "status": 2,
                    "transmissions": [json.dumps({"type": "disconnect", "reason": "unauthorized"})],
                    "error_msg": "no user",
                }
            visits = int((env.get("cstate") or {}).get("visits", "0")) + 1
            return {
                "status": 1,
                "identifiers": json.dumps({"user": user}),
                "transmissions": [
                    json.dumps({"type": "welcome", "sid": sid}),
                    json.dumps({"type": "hello", "user": user}),
                ],
                "env": {"cstate": {"visits": str(visits)}},
            }
        if method == "disconnect":
            return {"status": 1}
        identifier = body["identifier"]
        channel = json.loads(identifier)
        user = json.loads(body.get("connection_identifiers") or "{}").get("user")
        istate = env.get("istate") or {}
        if body["command"] == "subscribe":
            if channel["channel"] == "Secret":
                return {
                    "status": 2,
                    "transmissions": [
                        json.dumps({"identifier": identifier, "type": "reject_subscription"})
                    ],
                }
            room = channel.get("room", "lobby")
            if channel["channel"] == "Room":  # whispers and presence on room/<room>
                return {
                    "status": 1,
                    "streams": [f"room/{room}"],
                    "env": {"istate": {"$w": f"room/{room}", "$p": f"room/{room}"}},
                }
            hello = {"joined": room, "user": user}
            return {
                "status": 1,
                "streams": [f"chat/{room}"],
                "transmissions": [
                    json.dumps({"identifier": identifier, "message": hello}),
                    json.dumps({"identifier": identifier, "type": "confirm_subscription"}),
                ],
                "env": {"istate": {"room": room, "count": "0"}},
            }
        if body["command"] == "unsubscribe":
            return {"status": 1}
        data = json.loads(body["data"])
        action = data.get("action")
        if action == "say":
            message = {"echo": data.get("text"), "user": user, "room": istate.get("room")}
            return {
                "status": 1,
                "transmissions": [json.dumps({"identifier": identifier, "message": message})],
            }
        if action == "count":
            count = int(istate.get("count", "0")) + 1
            return {
                "status": 1,
                "transmissions": [
                    json.dumps({"identifier": identifier, "message": {"count": count}})
                ],
                "env": {"istate": {"count": str(count)}},
            }
        if action == "join":
            info = json.dumps({"name": user})
            return {"status": 1, "presence": {"type": "join", "id": user, "info": info}}
        if action == "part":
            return {"status": 1, "presence": {"type": "leave"}}
        if action == "mute":
            return {"status": 1, "stop_streams": True}
        if action == "leave":
            return {"status": 1, "disconnect": True}
        return {"status": 0, "error_msg": f"no action {action!r}"}


class RpcAppProcess:
    """:class:`RpcTestApp` in a process of its own (``python -m tests.rpc_support PORT``), so
    that its latency is its own, not the test process' (one GIL for the loop under test and
    the application's threads would make the server see its own load as the application's).
    ``stop()`` kills it: the port refuses connections."""

    def __init__(self) -> None:
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/_anycable"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.rpc_support", str(self.port)],
            stdout=subprocess.PIPE,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer

    def set(self, **values: Any) -> None:
        """Change the application's behaviour (``capacity``, ``delay``, ``retry_after``)."""
        self._post("/_control", values)

    def stats(self) -> tuple[list[Applied], int]:
        """What it applied, and how many requests it turned away with 503."""
        data = self._post("/_stats", {})
        return [Applied(a["path"], a["headers"], a["body"]) for a in data["applied"]], data[
            "refused"
        ]

    def duplicates(self) -> list[Applied]:
        app = RpcTestApp()
        app.applied = self.stats()[0]
        return app.duplicates()


def main() -> None:
    app = RpcTestApp()
    app.port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    app.start()
    print(app.port, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
