"""An :class:`~trio_cable.rpc.RPCApp` served as a WSGI and as an ASGI application.

Neither needs a web framework; each mounts in the frameworks that host its kind::

    # Flask (WSGI): the RPC endpoints under /anycable
    from werkzeug.middleware.dispatcher import DispatcherMiddleware
    flask_app.wsgi_app = DispatcherMiddleware(flask_app.wsgi_app, {"/anycable": rpc.wsgi})

    # FastAPI / Starlette (ASGI)
    api.mount("/anycable", rpc.asgi)

    # Django: a view (trio_cable.rpc.django.rpc_view), or the WSGI/ASGI app in front of Django's

The real-time server is then started with ``--rpc-host http://app/anycable`` (trio_cable) or
``--rpc_host`` (anycable-go).  Both apps answer ``POST <prefix>/connect``, ``/command`` and
``/disconnect`` and nothing else (404), check the key (401), refuse an unreadable body (422) or
one over ``max_body`` (413).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["ASGIApp", "WSGIApp"]


class Answer(Protocol):
    """An HTTP answer (:class:`trio_cable.rpc.RPCResponse`)."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> list[tuple[str, str]]: ...

    @property
    def body(self) -> bytes: ...


class Handler(Protocol):
    """What the adapters serve (:class:`trio_cable.rpc.RPCApp`; a protocol, so that this
    module imports nothing of the application's side)."""

    max_body: int
    broadcaster: Any

    def handle(
        self, path: str, headers: Mapping[str, str], body: bytes, *, http_method: str = ...
    ) -> Answer: ...

    async def handle_async(
        self, path: str, headers: Mapping[str, str], body: bytes, *, http_method: str = ...
    ) -> Answer: ...


@dataclass
class _Refusal:
    status: int
    message: str

    @property
    def body(self) -> bytes:
        return (self.message + "\n").encode("utf-8")

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [
            ("content-type", "text/plain; charset=utf-8"),
            ("content-length", str(len(self.body))),
        ]


_STATUS_LINES = {
    200: "200 OK",
    400: "400 Bad Request",
    401: "401 Unauthorized",
    404: "404 Not Found",
    411: "411 Length Required",
    413: "413 Content Too Large",
    422: "422 Unprocessable Content",
}


class WSGIApp:
    """PEP 3333 application answering the RPC calls (sync: plain ``def`` callbacks run in the
    server's request thread)."""

    def __init__(self, app: Handler) -> None:
        self.app = app

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        headers = {
            key[5:].replace("_", "-").lower(): value
            for key, value in environ.items()
            if key.startswith("HTTP_")
        }
        response = self._read_and_handle(environ, headers)
        start_response(_STATUS_LINES.get(response.status, str(response.status)), response.headers)
        return [response.body]

    def _read_and_handle(self, environ: dict[str, Any], headers: dict[str, str]) -> Answer:
        path = environ.get("PATH_INFO", "")
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _Refusal(400, "bad Content-Length")
        if length > self.app.max_body:
            return _Refusal(413, f"request body over {self.app.max_body} bytes")
        body = environ["wsgi.input"].read(length) if length > 0 else b""
        return self.app.handle(
            path, headers, body, http_method=environ.get("REQUEST_METHOD", "GET")
        )


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class ASGIApp:
    """ASGI 3 application answering the RPC calls, under asyncio or Trio (``async def``
    callbacks run on the server's loop, plain ``def`` ones in a worker thread)."""

    def __init__(self, app: Handler) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            raise RuntimeError(f"trio_cable.rpc serves HTTP, not {scope['type']!r}")

        headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", ())
        }
        # The path under the mount point: the RPC method is its last segment either way.
        path = scope.get("path", "")
        body = bytearray()
        too_big = False
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            if len(body) + len(chunk) > self.app.max_body:
                too_big = True  # keep reading (and dropping) so the server can answer
            else:
                body += chunk
            more = message.get("more_body", False)
        response: Answer
        if too_big:
            response = _Refusal(413, f"request body over {self.app.max_body} bytes")
        else:
            response = await self.app.handle_async(
                path, headers, bytes(body), http_method=scope.get("method", "GET")
            )
        await send(
            {
                "type": "http.response.start",
                "status": response.status,
                "headers": [(k.encode(), v.encode()) for k, v in response.headers],
            }
        )
        await send({"type": "http.response.body", "body": response.body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                broadcaster = self.app.broadcaster
                aclose = getattr(broadcaster, "aclose", None)
                if aclose is not None:
                    await aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
