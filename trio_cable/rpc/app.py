"""The application side of AnyCable's HTTP RPC: connections, channels and the dispatcher.

A real-time server (trio_cable with ``--rpc-host``, or anycable-go) keeps the WebSockets and asks
the application, over HTTP, who a new connection is and what each command does.  This module is
that application's half, without I/O: :class:`RPCApp` reads a request body and returns the answer
(:meth:`RPCApp.handle` for sync code, :meth:`RPCApp.handle_async` for async code);
:mod:`trio_cable.rpc.web` serves it as a WSGI and an ASGI application.

The RPC application is stateless: every call brings what the real-time server keeps for the
connection (its URL and headers, its identifiers, the connection state ``cstate`` and the
subscription's state ``istate``), and a :class:`Connection` and a :class:`Channel` are built
for that one call and thrown away.  What they do is collected and sent back in the answer:
transmissions, streams to start and stop, state changes, presence, disconnect.

The classes have the shape of the in-process :class:`trio_cable.CableApp` and
:class:`trio_cable.Channel`, so moving a channel between the two is mostly moving its file.  The
difference: a broadcast leaves through a broadcaster (HTTP or Redis, see
:mod:`trio_cable.rpc.broadcast`), as ``broadcast()`` in sync code and ``await abroadcast()`` in
async code.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import inspect
import json
import logging
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from trio_cable.channels import (
    BaseChannel,
    ConnectRequest,
    Unauthorized,
    warn_callback_near_misses,
)
from trio_cable.protocol import cable
from trio_cable.rpc.web import ASGIApp, WSGIApp

__all__ = [
    "ERROR",
    "FAILURE",
    "SUCCESS",
    "Channel",
    "Connection",
    "RPCApp",
    "RPCResponse",
    "Unauthorized",
    "derived_key",
]

log = logging.getLogger("trio_cable.rpc")

# AnyCable's Status enum, as integers in the JSON bodies.  A missing status means ERROR.
ERROR, SUCCESS, FAILURE = 0, 1, 2

#: Channel state keys the real-time server reads itself: the whisper stream and the presence
#: stream (AnyCable's names).  Their values are stream names, not JSON.
WHISPER_STATE = "$w"
PRESENCE_STATE = "$p"

#: Request bodies larger than this get 413 (real ones are a few KB: URL, cookies, state).
DEFAULT_MAX_BODY = 1 << 20

_JSON_SEPARATORS = (",", ":")


def _dumps(value: Any) -> str:
    # Compact, UTF-8 as is: the server stores these strings per session.
    return json.dumps(value, separators=_JSON_SEPARATORS, ensure_ascii=False)


def derived_key(secret: str | bytes, purpose: str) -> str:
    """The key anycable-go derives from its global ``--secret`` for *purpose*:
    ``hex(HMAC-SHA256(secret, "<purpose>-cable"))``.

    ``derived_key(secret, "rpc")`` is the RPC key the real-time server sends (trio_cable's
    ``--rpc-host`` does the same), ``derived_key(secret, "broadcast")`` anycable-go's broadcast key.
    """
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("an empty secret derives a key anyone can compute")
    return hmac.new(key, f"{purpose}-cable".encode("ascii"), hashlib.sha256).hexdigest()


# -- state: str -> JSON values, carried as str -> str -----------------------------------------


def _decode_state(raw: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(the application's values, the server's ``$`` keys) of a ``cstate``/``istate`` map.

    Values are JSON (what this SDK and anycable-rails write); one that is not is kept as the
    string it is, so state written by another application stays readable.
    """
    values: dict[str, Any] = {}
    special: dict[str, str] = {}
    for key, text in raw.items():
        if text == "":  # an empty value means "deleted"; the server should not send one
            continue
        if key.startswith("$"):
            special[key] = text
            continue
        try:
            values[key] = cable.JSON.decode(text)
        except cable.InvalidCommand:
            values[key] = text
    return values, special


def _state_changes(before: Mapping[str, str], values: Mapping[str, Any]) -> dict[str, str]:
    """What to send back for a state map: changed and new keys encoded, deleted keys ``""``
    (the contract's deletion); unchanged keys are left out."""
    changes: dict[str, str] = {}
    for key, value in values.items():
        if not isinstance(key, str) or key.startswith("$"):
            raise ValueError(f"state keys are strings not starting with '$', not {key!r}")
        text = _dumps(value)
        if before.get(key) != text:
            changes[key] = text
    for key in before:
        if not key.startswith("$") and key not in values and before[key] != "":
            changes[key] = ""
    return changes


# -- the request's environment ----------------------------------------------------------------


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadRequest(f"{where} must be an object of strings")
    return value


@dataclass
class _Env:
    url: str
    headers: dict[str, str]
    cstate: dict[str, str]
    istate: dict[str, str]

    @classmethod
    def parse(cls, body: dict[str, Any]) -> _Env:
        env = body.get("env")
        if env is None:
            env = {}
        if not isinstance(env, dict):
            raise BadRequest("env must be an object")
        url = env.get("url") or ""
        if not isinstance(url, str):
            raise BadRequest("env.url must be a string")
        return cls(
            url,
            _str_map(env.get("headers"), "env.headers"),
            _str_map(env.get("cstate"), "env.cstate"),
            _str_map(env.get("istate"), "env.istate"),
        )


class BadRequest(Exception):
    """A request body the contract cannot read (answered 422)."""


# -- the connection -------------------------------------------------------------------------


class Connection(ConnectRequest):
    """One client connection, as one RPC call sees it.

    A :class:`trio_cable.ConnectRequest` (``path``, ``query``, ``headers``, ``cookies``,
    ``remote``, ``subprotocol``, ``sid``), so a connect callback written for the in-process
    server reads requests the same way here, plus ``url``, the connection's ``identifiers`` and
    its ``state`` (AnyCable's ``cstate``: JSON values the real-time server keeps for the
    connection's life and every later call brings back).
    """

    def __init__(self, sid: str, env: _Env, identifiers: dict[str, Any] | None = None) -> None:
        parts = urlsplit(env.url)
        # The contract sends header names lower-case, and the client's address as REMOTE_ADDR.
        headers = {name.lower(): value for name, value in env.headers.items()}
        super().__init__(
            path=parts.path,
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers=headers,
            remote=env.headers.get("REMOTE_ADDR", headers.get("remote_addr", "")),
            subprotocol=headers.get("sec-websocket-protocol", ""),
            sid=sid,
        )
        self.url = env.url
        self.identifiers: dict[str, Any] = identifiers if identifiers is not None else {}
        self._cstate = env.cstate
        self.state, _ = _decode_state(env.cstate)
        self.transmissions: list[str] = []
        self.rejected = False
        self.closed = False

    def transmit(self, message: Any) -> None:
        """Send *message* (any JSON value, or a pre-encoded JSON string) to the client as a
        whole Action Cable message, e.g. ``{"type": "notice", ...}``."""
        self.transmissions.append(message if isinstance(message, str) else _dumps(message))

    def reject(self) -> None:
        """Refuse the connection (in a connect callback; same as raising :class:`Unauthorized`)."""
        self.rejected = True

    def disconnect(self) -> None:
        """Close the connection once this call's answer is delivered (in any callback)."""
        self.closed = True

    def _state_changes(self) -> dict[str, str]:
        return _state_changes(self._cstate, self.state)


# -- channels -------------------------------------------------------------------------------


class Channel(BaseChannel):
    """Base class of channels served over RPC; one instance per call.

    As in :class:`trio_cable.Channel`: ``identifier`` is the client's identifier string,
    ``params`` its fields without ``channel``, ``identifiers`` the connection's identity;
    ``subscribed``, ``unsubscribed`` and ``receive`` are the callbacks and every other public
    method is an action (it gets the whole decoded message).  Callbacks may be ``async def`` or
    plain ``def``.  ``state`` is the subscription's state (AnyCable's ``istate``: JSON values
    kept by the real-time server for the subscription's life).
    """

    def __init__(
        self,
        connection: Connection,
        identifier: str,
        params: dict[str, Any],
        istate: Mapping[str, str] | None = None,
        app: RPCApp | None = None,
    ) -> None:
        self.connection = connection
        self.identifier = identifier
        self.params = params
        self.app = app
        self._istate = dict(istate or {})
        self.state, self._special = _decode_state(self._istate)
        #: Streams this call started (the server keeps the ones of earlier calls).
        self.streams: list[str] = []
        self.stopped_streams: list[str] = []
        self.stop_streams = False
        self.rejected = False
        self.transmissions: list[str] = []
        self.presence: dict[str, str] | None = None

    @property
    def identifiers(self) -> dict[str, Any]:
        """The connection's identifiers."""
        return self.connection.identifiers

    # -- what a channel can do -------------------------------------------------------------

    def transmit(self, message: Any) -> None:
        """Send *message* (any JSON value) to this subscription's client only."""
        self.transmissions.append(_dumps(cable.data_message(self.identifier, message)))

    def stream_from(self, stream: str, *, whisper: bool = False) -> None:
        """Deliver broadcasts on *stream* to this subscription.  With ``whisper=True`` the
        client may also whisper to the stream's other subscribers (AnyCable's ``$w``).

        Raises ``ValueError`` for a name no broker can carry (empty, or a lone surrogate)."""
        if not isinstance(stream, str) or not cable.is_stream_name(stream):
            raise ValueError(f"not a usable stream name: {str(stream)[:100]!r}")
        if stream not in self.streams:
            self.streams.append(stream)
        if stream in self.stopped_streams:
            self.stopped_streams.remove(stream)
        if whisper:
            self._special[WHISPER_STATE] = stream

    def stop_stream_from(self, stream: str) -> None:
        """Stop delivering broadcasts on *stream* (and whispers, if it was the whisper stream)."""
        if stream in self.streams:
            self.streams.remove(stream)
        if stream not in self.stopped_streams:
            self.stopped_streams.append(stream)
        if self._special.get(WHISPER_STATE) == stream:
            del self._special[WHISPER_STATE]

    def stop_all_streams(self) -> None:
        """Stop every stream of this subscription, those of earlier calls included."""
        self.streams.clear()
        self.stop_streams = True
        self._special.pop(WHISPER_STATE, None)

    def reject(self) -> None:
        """Refuse the subscription (only meaningful inside :meth:`subscribed`)."""
        self.rejected = True

    def join_presence(self, id: Any, info: Any = None, *, stream: str | None = None) -> None:
        """Join the presence set of *stream* (default: the first stream this call started) as
        *id*, with *info* (any JSON value) for the other members.  The real-time server
        broadcasts the ``join`` (AnyCable's presence; needs a broker that keeps presence)."""
        if stream is None:
            if not self.streams:
                raise ValueError("join_presence needs a stream: call stream_from first or pass one")
            stream = self.streams[0]
        self._special[PRESENCE_STATE] = stream
        self.presence = {"type": "join", "id": str(id)}
        if info is not None:
            self.presence["info"] = _dumps(info)

    def leave_presence(self, id: Any = None) -> None:
        """Leave the presence set this subscription joined."""
        self.presence = {"type": "leave"}
        if id is not None:
            self.presence["id"] = str(id)

    def broadcast(self, stream: str, data: Any) -> None:
        """Broadcast *data* (any JSON value) to every subscriber of *stream*, through the
        application's broadcaster, from sync code.  (The in-process
        :meth:`trio_cable.Channel.broadcast` is awaited; over RPC, async code awaits
        :meth:`abroadcast`.)"""
        self._broadcaster().broadcast(stream, data)

    async def abroadcast(self, stream: str, data: Any) -> None:
        """:meth:`broadcast` for async code."""
        await self._broadcaster().abroadcast(stream, data)

    def _broadcaster(self) -> Broadcaster:
        broadcaster = self.app.broadcaster if self.app is not None else None
        if broadcaster is None:
            raise RuntimeError("no broadcaster: give RPCApp(broadcaster=HTTPBroadcaster(...))")
        return broadcaster

    # -- dispatch --------------------------------------------------------------------------

    def action(self, name: str) -> Callable[[dict[str, Any]], Any] | None:
        """The bound method for action *name*, or None when the channel has no such action."""
        if name not in self.action_names():
            return None
        method: Callable[[dict[str, Any]], Any] = getattr(self, name)
        return method

    def _discard(self) -> None:
        """Forget what this call started: a refused or failed subscribe starts nothing."""
        self.streams.clear()
        self.presence = None
        self.state, self._special = _decode_state(self._istate)

    def _state_changes(self) -> dict[str, str]:
        changes = _state_changes(self._istate, self.state)
        for key in (WHISPER_STATE, PRESENCE_STATE):
            value = self._special.get(key, "")
            if self._istate.get(key, "") != value:
                changes[key] = value
        return changes


Channel._framework_class = Channel


class Broadcaster(Protocol):
    """What a channel broadcasts through (:class:`trio_cable.rpc.HTTPBroadcaster`,
    :class:`trio_cable.rpc.RedisBroadcaster`)."""

    def broadcast(self, stream: str, data: Any) -> None: ...

    async def abroadcast(self, stream: str, data: Any) -> None: ...


# -- the application ----------------------------------------------------------------------


@dataclass
class RPCResponse:
    """An HTTP answer: status code, headers, body."""

    status: int
    body: bytes
    content_type: str = "application/json"

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The answer's headers."""
        return [("content-type", self.content_type), ("content-length", str(len(self.body)))]

    @classmethod
    def json(cls, value: Any) -> RPCResponse:
        return cls(200, _dumps(value).encode("utf-8"))

    @classmethod
    def text(cls, status: int, message: str) -> RPCResponse:
        return cls(status, (message + "\n").encode("utf-8"), "text/plain; charset=utf-8")


ConnectCallback = Callable[[Connection], Any]
DisconnectCallback = Callable[[Connection], Any]
#: Runs one callback with its arguments and returns its result, awaited if need be.
_Runner = Callable[..., Coroutine[Any, Any, Any]]

RPC_METHODS = ("connect", "command", "disconnect")


class RPCApp:
    """An AnyCable RPC application: its channels, a connect and a disconnect callback.

    ``rpc_secret`` is the key the real-time server presents (``Authorization: Bearer <key>``);
    or give the global ``secret`` the server was started with and the key is derived from it
    as anycable-go and trio_cable do (:func:`derived_key`).  With neither, every caller is
    served (a warning says so).  ``broadcaster`` carries :meth:`Channel.broadcast`.

    Serve it with :attr:`wsgi` or :attr:`asgi` (see :mod:`trio_cable.rpc.web`), or from any
    framework's view with :meth:`handle` / :meth:`handle_async`.
    """

    def __init__(
        self,
        *,
        rpc_secret: str | None = None,
        secret: str | None = None,
        broadcaster: Broadcaster | None = None,
        max_body: int = DEFAULT_MAX_BODY,
        sync_callbacks_in_thread: bool = True,
    ) -> None:
        self.channels: dict[str, type[Channel]] = {}
        self.connect_callback: ConnectCallback | None = None
        self.disconnect_callback: DisconnectCallback | None = None
        self.broadcaster = broadcaster
        self.max_body = max_body
        #: Under ASGI, run plain ``def`` callbacks in a worker thread (as FastAPI runs sync
        #: endpoints), so blocking code (an ORM, a sync broadcaster) does not stall the loop.
        self.sync_callbacks_in_thread = sync_callbacks_in_thread
        key = rpc_secret or (derived_key(secret, "rpc") if secret else None)
        self._expected = f"Bearer {key}".encode() if key else None
        if key is None:
            warnings.warn(
                "RPCApp without rpc_secret or secret: every caller may identify connections",
                stacklevel=2,
            )
        self._wsgi: WSGIApp | None = None
        self._asgi: ASGIApp | None = None

    # -- registration --------------------------------------------------------------------

    def channel(self, cls: type[Channel]) -> type[Channel]:
        """Register a channel class (usable as a decorator).  A method named like a misspelt
        callback (``subscribe``, ``recieve``...) gets a :class:`CallbackNameWarning`."""
        if not (isinstance(cls, type) and issubclass(cls, Channel)):
            raise TypeError(f"{cls!r} is not a trio_cable.rpc.Channel subclass")
        warn_callback_near_misses(cls)
        self.channels[cls.name()] = cls
        return cls

    def connect(self, fn: ConnectCallback) -> ConnectCallback:
        """Register the connect callback (usable as a decorator).

        It receives the :class:`Connection` and returns its identifiers (a dict; ``None`` is
        no identifiers), or refuses it: raise :class:`Unauthorized`, return ``False`` or call
        ``connection.reject()``.  It may set ``connection.state`` and ``transmit``.  Without
        one, every connection is accepted with no identifiers.
        """
        self.connect_callback = fn
        return fn

    def disconnect(self, fn: DisconnectCallback) -> DisconnectCallback:
        """Register the disconnect callback (usable as a decorator): called with the
        :class:`Connection` after every subscription's ``unsubscribed``."""
        self.disconnect_callback = fn
        return fn

    # -- serving -------------------------------------------------------------------------

    @property
    def wsgi(self) -> WSGIApp:
        """This application as a WSGI application (:class:`trio_cable.rpc.web.WSGIApp`)."""
        if self._wsgi is None:
            self._wsgi = WSGIApp(self)
        return self._wsgi

    @property
    def asgi(self) -> ASGIApp:
        """This application as an ASGI application (:class:`trio_cable.rpc.web.ASGIApp`)."""
        if self._asgi is None:
            self._asgi = ASGIApp(self)
        return self._asgi

    def authorized(self, authorization: str | bytes | None) -> bool:
        """Whether an ``Authorization`` header value carries the RPC key (constant time)."""
        if self._expected is None:
            return True
        if authorization is None:
            return False
        if isinstance(authorization, str):
            authorization = authorization.encode("latin-1", "replace")
        return hmac.compare_digest(authorization, self._expected)

    def handle(
        self, path: str, headers: Mapping[str, str], body: bytes, *, http_method: str = "POST"
    ) -> RPCResponse:
        """Answer one RPC request from sync code.  *path* ends with ``connect``, ``command`` or
        ``disconnect`` (whatever prefix the application is mounted under); *headers* are the
        request's, names in any case.  ``async def`` callbacks run to completion on a
        short-lived event loop (prefer :meth:`handle_async` where there is a loop)."""
        coro = self._handle(path, headers, body, http_method, _run_inline)
        # Nothing below awaits anything that suspends (see _run_inline): the coroutine
        # finishes in one step, without an event loop.
        try:
            coro.send(None)
        except StopIteration as stop:
            response: RPCResponse = stop.value
            return response
        coro.close()
        raise RuntimeError("RPCApp.handle suspended: call handle_async from async code")

    async def handle_async(
        self, path: str, headers: Mapping[str, str], body: bytes, *, http_method: str = "POST"
    ) -> RPCResponse:
        """Answer one RPC request from async code (asyncio or Trio)."""
        runner = _run_in_thread if self.sync_callbacks_in_thread else _run_awaiting
        return await self._handle(path, headers, body, http_method, runner)

    # -- the contract --------------------------------------------------------------------

    async def _handle(
        self,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        http_method: str,
        run: _Runner,
    ) -> RPCResponse:
        method = path.rstrip("/").rpartition("/")[2]
        if method not in RPC_METHODS or http_method != "POST":
            return RPCResponse.text(404, "not found: POST .../connect, .../command, .../disconnect")
        lower = {name.lower(): value for name, value in headers.items()}
        if not self.authorized(lower.get("authorization")):
            return RPCResponse.text(401, "unauthorized: the RPC key does not match")
        if len(body) > self.max_body:
            return RPCResponse.text(413, f"request body over {self.max_body} bytes")
        sid = lower.get("x-anycable-meta-sid", "")
        try:
            request = cable.JSON.decode(body, max_depth=64)
            if not isinstance(request, dict):
                raise BadRequest("the body is not a JSON object")
            if method == "connect":
                answer = await self._connect(sid, request, run)
            elif method == "command":
                answer = await self._command(sid, request, run)
            else:
                answer = await self._disconnect(sid, request, run)
        except cable.InvalidCommand as exc:
            return RPCResponse.text(422, f"unreadable body: {exc.reason}")
        except BadRequest as exc:
            return RPCResponse.text(422, f"unreadable body: {exc}")
        return RPCResponse.json(answer)

    async def _connect(self, sid: str, request: dict[str, Any], run: _Runner) -> dict[str, Any]:
        conn = Connection(sid, _Env.parse(request))
        identifiers: Any = {}
        try:
            if self.connect_callback is not None:
                identifiers = await run(self.connect_callback, conn)
        except Unauthorized:
            conn.reject()
        except Exception as exc:
            log.exception("connect callback failed (sid %s)", sid)
            return {"status": ERROR, "error_msg": f"connect failed: {type(exc).__name__}"}
        if identifiers is False:
            conn.reject()
        if conn.rejected:
            conn.transmit(cable.disconnect("unauthorized", False))
            return {
                "status": FAILURE,
                "identifiers": "",
                "transmissions": conn.transmissions,
                "error_msg": "unauthorized",
            }
        if identifiers is None:
            identifiers = {}
        if not isinstance(identifiers, Mapping):
            log.error("connect callback returned %r, not a dict of identifiers", identifiers)
            return {"status": ERROR, "error_msg": "connect callback returned no dict"}
        try:
            encoded, cstate = _dumps(dict(identifiers)), conn._state_changes()
        except (TypeError, ValueError) as exc:
            # e.g. {"user": <User object>}: identifiers travel as JSON, give the user's id.
            log.exception("connect callback returned identifiers or state that are not JSON")
            return {"status": ERROR, "error_msg": f"identifiers or state: {exc}"[:200]}
        welcome: dict[str, Any] = {"type": "welcome"}
        if sid:
            welcome["sid"] = sid
        # The welcome comes first: clients treat nothing before it as part of the session.
        conn.transmissions.insert(0, _dumps(welcome))
        return {
            "status": SUCCESS,
            "identifiers": encoded,
            "transmissions": conn.transmissions,
            "env": {"cstate": cstate},
        }

    def _identifiers(self, value: Any, field: str) -> dict[str, Any]:
        if value in (None, ""):
            return {}
        if not isinstance(value, str):
            raise BadRequest(f"{field} must be a JSON string")
        decoded = cable.JSON.decode(value)
        if not isinstance(decoded, dict):
            raise BadRequest(f"{field} is not a JSON object")
        return decoded

    def _build_channel(
        self, conn: Connection, identifier: str, istate: Mapping[str, str]
    ) -> Channel | None:
        try:
            name, params = cable.parse_identifier(identifier)
        except cable.InvalidCommand:
            return None
        cls = self.channels.get(name)
        return None if cls is None else cls(conn, identifier, params, istate, self)

    async def _command(self, sid: str, request: dict[str, Any], run: _Runner) -> dict[str, Any]:
        command = request.get("command")
        identifier = request.get("identifier")
        if command not in ("subscribe", "unsubscribe", "message"):
            raise BadRequest(f"unknown command {str(command)[:50]!r}")
        if not isinstance(identifier, str) or not identifier:
            raise BadRequest("identifier must be a non-empty string")
        env = _Env.parse(request)
        ids = self._identifiers(request.get("connection_identifiers"), "connection_identifiers")
        conn = Connection(sid, env, ids)
        channel = self._build_channel(conn, identifier, env.istate)
        if channel is None:
            log.info("%s for an unknown channel: %s", command, identifier[:200])
            reply = (
                [_dumps(cable.reject_subscription(identifier))] if command == "subscribe" else []
            )
            return {"status": FAILURE, "transmissions": reply, "error_msg": "unknown channel"}
        status, error = SUCCESS, ""
        try:
            if command == "subscribe":
                await run(channel.subscribed)
            elif command == "unsubscribe":
                await run(channel.unsubscribed)
                channel.stop_all_streams()
            else:
                data = request.get("data")
                if not isinstance(data, str):
                    raise BadRequest("data must be a JSON string for message")
                try:
                    action, message = cable.parse_action(data, identifier=identifier)
                except cable.InvalidCommand as exc:
                    action, message = "", {}
                    status, error = FAILURE, exc.reason
                method = channel.action(action) if action else None
                if method is not None:
                    await run(method, message)
                elif status == SUCCESS:
                    log.info("unknown action %r on %s", action[:50], identifier[:200])
                    status, error = FAILURE, f"unknown action {action[:50]!r}"
        except BadRequest:
            raise
        except Exception as exc:
            log.exception("%s failed on %s (sid %s)", command, identifier[:200], sid)
            status, error = ERROR, f"{command} failed: {type(exc).__name__}"
        if command == "subscribe":
            if status == ERROR or channel.rejected:
                if status == SUCCESS:
                    status, error = FAILURE, "subscription rejected"
                channel._discard()
                channel.transmissions.append(_dumps(cable.reject_subscription(identifier)))
            else:
                channel.transmissions.append(_dumps(cable.confirm_subscription(identifier)))
        try:
            changes = {"cstate": conn._state_changes(), "istate": channel._state_changes()}
        except (TypeError, ValueError) as exc:
            # State the application set that JSON cannot carry: the call failed.
            log.exception("%s on %s set state that is not JSON", command, identifier[:200])
            reply = []
            if command == "subscribe":
                reply.append(_dumps(cable.reject_subscription(identifier)))
            return {"status": ERROR, "transmissions": reply, "error_msg": f"state: {exc}"[:200]}
        answer: dict[str, Any] = {
            "status": status,
            "disconnect": conn.closed,
            "stop_streams": channel.stop_streams,
            "streams": channel.streams,
            "stopped_streams": channel.stopped_streams,
            # The connection's own transmissions first, as they were made outside the channel.
            "transmissions": conn.transmissions + channel.transmissions,
            "env": changes,
        }
        if channel.presence is not None:
            answer["presence"] = channel.presence
        if error:
            answer["error_msg"] = error
        return answer

    async def _disconnect(self, sid: str, request: dict[str, Any], run: _Runner) -> dict[str, Any]:
        env = _Env.parse(request)
        conn = Connection(sid, env, self._identifiers(request.get("identifiers"), "identifiers"))
        subscriptions = request.get("subscriptions") or []
        if not isinstance(subscriptions, list) or not all(
            isinstance(s, str) for s in subscriptions
        ):
            raise BadRequest("subscriptions must be a list of strings")
        failed = 0
        for identifier in subscriptions:
            # Here istate maps each identifier to its state map, JSON-encoded.
            istate: Any = {}
            raw = env.istate.get(identifier)
            if raw:
                try:
                    istate = cable.JSON.decode(raw)
                except cable.InvalidCommand:
                    istate = {}
            if not isinstance(istate, dict):
                istate = {}
            channel = self._build_channel(
                conn, identifier, {k: v for k, v in istate.items() if isinstance(v, str)}
            )
            if channel is None:
                continue
            try:
                await run(channel.unsubscribed)
            except Exception:
                # One subscription's failure must not cost the others their unsubscribed.
                failed += 1
                log.exception("unsubscribed failed on %s (sid %s)", identifier[:200], sid)
        try:
            if self.disconnect_callback is not None:
                await run(self.disconnect_callback, conn)
        except Exception:
            failed += 1
            log.exception("disconnect callback failed (sid %s)", sid)
        if failed:
            return {"status": ERROR, "error_msg": f"{failed} callbacks failed"}
        return {"status": SUCCESS}


# -- running callbacks, sync or async ---------------------------------------------------------


async def _run_inline(fn: Callable[..., Any], *args: Any) -> Any:
    """Sync mode: call *fn*; an awaitable result (an ``async def`` callback) is run on an
    event loop of its own.  Never suspends, so :meth:`RPCApp.handle` needs no loop."""
    result = fn(*args)
    if inspect.isawaitable(result):
        import asyncio  # only for async callbacks served from sync code

        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


async def _run_awaiting(fn: Callable[..., Any], *args: Any) -> Any:
    """Async mode: call *fn* here and await its result if it is awaitable."""
    result = fn(*args)
    if inspect.isawaitable(result):
        return await result
    return result


async def _run_in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Async mode: ``async def`` callbacks are awaited here, plain ``def`` ones run in a worker
    thread (AnyIO's, which works under asyncio and Trio alike)."""
    if _is_async(fn):
        return await fn(*args)
    import anyio.to_thread  # only ASGI needs it: the sync paths import no event-loop library

    result = await anyio.to_thread.run_sync(functools.partial(fn, *args))
    if inspect.isawaitable(result):
        return await result
    return result


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn)
