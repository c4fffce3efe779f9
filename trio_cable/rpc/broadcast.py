"""Broadcasting from the application into the real-time server, over HTTP or Redis.

Both carry AnyCable's publication format, which trio_cable and anycable-go read alike::

    {"stream": "<name>", "data": "<the data, JSON-encoded>", "meta": {"exclude_socket": "<sid>"}}

* :class:`HTTPBroadcaster` posts it to the server's broadcast endpoint (trio_cable's
  ``POST /_broadcast``, anycable-go's ``--http_broadcast_port``/``_broadcast``), with
  ``Authorization: Bearer <key>``.  For trio_cable the key is its ``--broadcast-key`` (else its
  ``--secret``); for anycable-go its ``--broadcast_key``, or ``derived_key(secret, "broadcast")``.
* :class:`RedisBroadcaster` publishes it on the ``__anycable__`` channel (trio_cable's Redis
  broker, anycable-go's legacy ``redis`` broadcaster, anycable-rails' Redis adapter).

Each has ``broadcast()`` for sync code and ``await abroadcast()`` for async code (asyncio or
Trio).  The clients are created on first use: the HTTP one needs ``httpx``, the Redis one
``redis`` (``pip install -e '.[rpc]'`` from a checkout).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx
    import redis
    import redis.asyncio

__all__ = [
    "BroadcastError",
    "HTTPBroadcaster",
    "RedisBroadcaster",
    "publication",
    "remote_disconnect",
]

_SEPARATORS = (",", ":")
#: Marks an async client the caller gave: used on every loop as it is.
_GIVEN = object()


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=_SEPARATORS, ensure_ascii=False)


def publication(stream: str, data: Any, *, exclude_socket: str | None = None) -> dict[str, Any]:
    """One publication: *data* (any JSON value) to the subscribers of *stream*, but not to the
    connection whose sid is *exclude_socket*.  The data travels JSON-encoded, so a *string*
    ``'{"a":1}'`` arrives as that string, not as an object."""
    if not isinstance(stream, str) or not stream:
        raise ValueError("a publication needs a non-empty stream name")
    message: dict[str, Any] = {"stream": stream, "data": _dumps(data)}
    if exclude_socket:
        message["meta"] = {"exclude_socket": exclude_socket}
    return message


def remote_disconnect(identifiers: Mapping[str, Any], *, reconnect: bool = False) -> dict[str, Any]:
    """AnyCable's remote disconnect command: every connection whose identifiers equal
    *identifiers* is closed (``reason: "remote"``)."""
    if not identifiers:
        raise ValueError("a remote disconnect needs the connection's identifiers")
    return {
        "command": "disconnect",
        "payload": {"identifier": _dumps(dict(identifiers)), "reconnect": reconnect},
    }


def _loop_token() -> object:
    """The running event loop (asyncio's or Trio's), comparable across calls."""
    import anyio.lowlevel

    return anyio.lowlevel.current_token()


class BroadcastError(Exception):
    """The real-time server refused a broadcast (``status`` is its HTTP status)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"broadcast refused: HTTP {status}: {detail[:200]}")
        self.status = status


class _Broadcaster:
    """What both broadcasters share: the API, and sync and async clients made on first use.
    A client of our own belongs to the loop that made it: an async callback served by WSGI
    runs on a new loop each call, and gets a new client (see :meth:`_async`)."""

    def __init__(self, client: Any, async_client: Any) -> None:
        self._client = client
        self._async_client = async_client
        self._async_loop: object | None = None if async_client is None else _GIVEN

    def _new_client(self) -> Any:
        raise NotImplementedError

    def _new_async_client(self) -> Any:
        raise NotImplementedError

    def _sync(self) -> Any:
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _async(self) -> Any:
        if self._async_loop is not _GIVEN:
            loop = _loop_token()
            if self._async_client is None or loop != self._async_loop:
                self._async_client = self._new_async_client()
                self._async_loop = loop
        return self._async_client

    def send(self, body: Any) -> None:
        """Send one publication or command (see :func:`publication`)."""
        raise NotImplementedError

    async def asend(self, body: Any) -> None:
        """:meth:`send` for async code."""
        raise NotImplementedError

    def broadcast(self, stream: str, data: Any, *, exclude_socket: str | None = None) -> None:
        """Deliver *data* to the subscribers of *stream* (see :func:`publication`)."""
        self.send(publication(stream, data, exclude_socket=exclude_socket))

    async def abroadcast(
        self, stream: str, data: Any, *, exclude_socket: str | None = None
    ) -> None:
        """:meth:`broadcast` for async code."""
        await self.asend(publication(stream, data, exclude_socket=exclude_socket))

    def disconnect(self, identifiers: Mapping[str, Any], *, reconnect: bool = False) -> None:
        """Close the connections identified by *identifiers* (see :func:`remote_disconnect`)."""
        self.send(remote_disconnect(identifiers, reconnect=reconnect))

    def close(self) -> None:
        """Close the sync client's connections."""
        if self._client is not None:
            self._client.close()

    async def aclose(self) -> None:
        """Close the async client's connections."""
        if self._async_client is not None:
            await self._async_client.aclose()


class HTTPBroadcaster(_Broadcaster):
    """Broadcasts by ``POST`` to the real-time server's broadcast endpoint *url*.

    ``key`` is sent as ``Authorization: Bearer <key>``.  ``client``/``async_client`` are
    ``httpx.Client``/``httpx.AsyncClient`` to use instead of the ones made on first use
    (keep-alive pools, reused across calls).  A refusal raises :class:`BroadcastError`, a
    network failure httpx's error: a broadcast is never retried, as it may have been applied.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8080/_broadcast",
        *,
        key: str | None = None,
        timeout: float = 5.0,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(client, async_client)
        self.url = url
        self.timeout = timeout
        self.headers = {"content-type": "application/json"}
        if key:
            self.headers["authorization"] = f"Bearer {key}"

    def _new_client(self) -> httpx.Client:
        import httpx

        return httpx.Client(timeout=self.timeout)

    def _new_async_client(self) -> httpx.AsyncClient:
        import httpx

        return httpx.AsyncClient(timeout=self.timeout)

    @staticmethod
    def _check(response: httpx.Response) -> None:
        if not 200 <= response.status_code < 300:
            raise BroadcastError(response.status_code, response.text)

    def send(self, body: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Post publications or commands (one, or a list: one request)."""
        self._check(self._sync().post(self.url, content=_dumps(body), headers=self.headers))

    async def asend(self, body: dict[str, Any] | list[dict[str, Any]]) -> None:
        """:meth:`send` for async code."""
        client = self._async()
        self._check(await client.post(self.url, content=_dumps(body), headers=self.headers))

    def broadcast_many(self, items: Iterable[tuple[str, Any]]) -> None:
        """Several ``(stream, data)`` publications in one request, delivered in order."""
        self.send([publication(stream, data) for stream, data in items])


class RedisBroadcaster(_Broadcaster):
    """Broadcasts by ``PUBLISH <channel> <publication>`` on the Redis server at *url*.

    ``client``/``async_client`` are ``redis.Redis``/``redis.asyncio.Redis`` to use instead of
    the ones made from *url* on first use.  (``redis.asyncio`` runs on asyncio only: under
    Trio, call :meth:`broadcast` in a worker thread.)
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        channel: str = "__anycable__",
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
    ) -> None:
        super().__init__(client, async_client)
        self.url = url
        self.channel = channel

    def _new_client(self) -> redis.Redis:
        import redis

        return redis.Redis.from_url(self.url)

    def _new_async_client(self) -> redis.asyncio.Redis:
        import redis.asyncio

        return redis.asyncio.Redis.from_url(self.url)

    def send(self, body: dict[str, Any]) -> None:
        """Publish one publication or command."""
        self._sync().publish(self.channel, _dumps(body))

    async def asend(self, body: dict[str, Any]) -> None:
        """:meth:`send` for async code."""
        await self._async().publish(self.channel, _dumps(body))
