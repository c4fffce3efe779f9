"""The AnyCable HTTP RPC executor: an application in any language answers over HTTP.

With ``--rpc-host http(s)://host/base`` the server keeps the connections and the streams, and
asks the application (anycable-rails, ``@anycable/serverless-js``, ``trio_cable.rpc``...) what
to do: ``POST {base}/connect`` identifies a connection, ``/command`` runs ``subscribe``,
``unsubscribe`` and actions (``message``), ``/disconnect`` says goodbye.  The contract is
AnyCable's (PROTOCOL.md, "AnyCable HTTP RPC"); what the application answers is honoured:
transmissions, streams, stopped streams, ``stop_streams``, ``disconnect``, ``presence`` events,
and the connection and channel state (``cstate``, ``istate``, whose ``$w`` and ``$p`` name the
whisper and presence streams) that is sent back with every later call and kept with resumable
sessions.

What never reaches the application, as with in-process callbacks: connections identified by
a JWT (no ``connect``), the built-in signed-stream channels (``$pubsub``,
``Turbo::StreamsChannel``) and any in-process channel registered with ``--channels``, and
restored sessions (no call at all).  A ``disconnect`` call is made only for a connection the
application has seen (it identified it, or it served one of its commands); they wait in one
queue, paced by ``--rpc-disconnect-rate``, so a drain of 10,000 clients is not 10,000
simultaneous requests.

The protocol messages among the application's transmissions (``welcome``,
``confirm_subscription``, ``reject_subscription``, ``disconnect``) are read, not forwarded:
the server sends its own, in the order its protocol needs (a resumable welcome carries the
sid, history follows a confirm, a disconnect closes the socket), from the answer's status and
those messages' fields.

Overload (see :mod:`~trio_cable.server.rpc_control` for the rules): calls go through one
HTTP client and connection pool, under an adaptive concurrency limit fed by 429/503 answers,
timeouts and latency; a call that was never applied (not sent, or refused with 429/503) is
retried with jittered backoff, one that may have been applied never is; a circuit breaker
turns a dead application into fast refusals.  A refused connect is told to come back
(``server_restart``, close 1013, ``reconnect_after`` advice), never ``unauthorized``; a
refused subscribe gets ``reject_subscription``; every command ends within
``--rpc-command-timeout``.

The HTTP client is httpx: well kept, HTTP/1.1 keep-alive with a bounded pool (HTTP/2 with
the ``h2`` extra), per-phase timeouts that tell a request that was never sent (connect, pool)
from one that may have been, and it runs on Trio through AnyIO, which it uses natively.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, cast

import httpx
import trio

from trio_cable.channels import Channel, ChannelHost, ConnectRequest
from trio_cable.config import Config
from trio_cable.metrics import Metrics
from trio_cable.protocol.cable import is_stream_name
from trio_cable.protocol.codes import CloseCode, DisconnectReason
from trio_cable.server.admission import reconnect_after_ms
from trio_cable.server.executor import (
    ChannelExecutor,
    Connected,
    Connection,
    Refused,
)
from trio_cable.server.rpc_control import (
    AdaptiveLimit,
    CircuitBreaker,
    parse_retry_after,
    retry_delay,
)
from trio_cable.server.transport import Work

__all__ = ["RpcChannel", "RpcConnection", "RpcExecutor", "RpcUnavailable"]

log = logging.getLogger("trio_cable.rpc")

# AnyCable's protobuf status enum, as JSON numbers.
ERROR, SUCCESS, FAILURE = 0, 1, 2

#: Transmissions the server answers itself (see the module docstring).
_PROTOCOL_TYPES = frozenset({"welcome", "confirm_subscription", "reject_subscription"})

_REASONS = frozenset(str(reason) for reason in DisconnectReason)

#: The JWT header (identity.token_from_request reads it first): the application may want it.
_JWT_HEADER = "x-jid"


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


class RpcUnavailable(Exception):
    """The application could not answer: breaker open, overloaded past the deadline, timed
    out, unreachable.  *retry_in* is when it may again (seconds, 0 when unknown)."""

    def __init__(self, why: str, retry_in: float = 0.0) -> None:
        super().__init__(why)
        self.retry_in = retry_in


class RpcFailed(Exception):
    """The application answered, but not with a usable answer (401, 500, not JSON...)."""


class RpcConnection:
    """What the executor keeps per connection: its env, state and the application's view
    of its identity.  Thousands live at once: slots."""

    __slots__ = ("cstate", "headers", "identifiers", "known", "url")

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = headers
        #: Connection state the application set (``env.cstate``).
        self.cstate: dict[str, str] = {}
        #: The identifiers string the application gave (None: derive from the session's).
        self.identifiers: str | None = None
        #: The application has seen this connection (a disconnect call is owed).
        self.known = False


def _merge(state: dict[str, str], changes: Any) -> None:
    """Apply ``cstate``/``istate`` changes: an empty string deletes the key."""
    if not isinstance(changes, Mapping):
        return
    for key, value in changes.items():
        if not isinstance(key, str):
            continue
        if value == "" or value is None:
            state.pop(key, None)
        else:
            state[key] = value if isinstance(value, str) else json.dumps(value)


class RpcChannel(Channel):
    """A subscription served by the RPC application.  Its ``state`` is the channel state
    (``istate``), kept with resumable sessions like any channel's state."""

    # The application names a subscription's whisper and presence streams in its channel
    # state ($w, $p); what the in-process code of the session sets is kept beside it.
    __slots__ = ("_presence", "_whisper", "pending_presence")
    channel_name = "$rpc"

    def __init__(self, host: ChannelHost, identifier: str, params: dict[str, Any]) -> None:
        super().__init__(host, identifier, params)
        #: A subscribe answer's presence event, for once the client has its confirm.
        self.pending_presence: dict[str, Any] | None = None

    @property
    def whisper_stream(self) -> str | None:
        """The stream whispers of this subscription go to (the application's ``$w``)."""
        value = (self._state or {}).get("$w")
        return value if isinstance(value, str) and value else self._whisper

    @whisper_stream.setter
    def whisper_stream(self, value: str | None) -> None:
        self._whisper = value

    @property
    def presence_stream(self) -> str | None:
        """The stream this subscription's presence lives on (the application's ``$p``)."""
        value = (self._state or {}).get("$p")
        return value if isinstance(value, str) and value else self._presence

    @presence_stream.setter
    def presence_stream(self, value: str | None) -> None:
        self._presence = value


class RpcExecutor:
    """Runs the application's part over AnyCable HTTP RPC (see the module docstring).
    In-process channels (the built-ins, ``--channels``) still run here, through
    :class:`ChannelExecutor`."""

    def __init__(
        self,
        config: Config,
        local: ChannelExecutor,
        metrics: Metrics,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        assert config.rpc_host, "RpcExecutor needs --rpc-host"
        self.config = config
        self.local = local
        self.limiter = local.limiter
        self.metrics = metrics
        base = config.rpc_host.rstrip("/")
        self.urls = {name: f"{base}/{name}" for name in ("connect", "command", "disconnect")}
        self.headers_to_pass = tuple(h.strip().lower() for h in config.rpc_headers if h.strip())
        key = config.effective_rpc_secret
        self._auth = {"authorization": f"Bearer {key}"} if key else {}
        self.adaptive = AdaptiveLimit(
            config.rpc_concurrency,
            minimum=config.rpc_min_concurrency,
            maximum=config.rpc_max_concurrency,
        )
        self.slots = trio.CapacityLimiter(self.adaptive.value)
        self.breaker = CircuitBreaker(cooldown=config.rpc_breaker_cooldown)
        # One client, one pool: keep-alive connections up to the limit's ceiling (more would
        # only ever be idle), each request bounded by --rpc-timeout in every phase.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.rpc_timeout),
            limits=httpx.Limits(
                max_connections=config.rpc_max_concurrency,
                max_keepalive_connections=config.rpc_max_concurrency,
            ),
            transport=transport,
        )
        self._disconnects: deque[tuple[str, bytes]] = deque()
        self._wake = trio.Event()
        self._in_flight = 0
        self._disconnecting = 0
        m = metrics
        m.gauges["rpc_concurrency_limit"] = lambda: float(self.slots.total_tokens)
        m.gauges["rpc_in_flight"] = lambda: float(self._in_flight)
        m.gauges["rpc_queued"] = lambda: float(self.slots.statistics().tasks_waiting)
        m.gauges["rpc_breaker_state"] = lambda: float(self.breaker.state)
        m.gauges["rpc_pending_disconnects"] = lambda: float(len(self._disconnects))

    # -- background work -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the HTTP client and send the queued disconnect calls, paced."""
        rate = self.config.rpc_disconnect_rate
        async with self.client, trio.open_nursery() as nursery:
            task_status.started()
            try:
                while True:
                    while not self._disconnects:
                        self._wake = trio.Event()
                        await self._wake.wait()
                    sid, body = self._disconnects.popleft()
                    self._disconnecting += 1  # (counted from here: see flush)
                    nursery.start_soon(self._disconnect_call, sid, body)
                    if rate > 0:
                        await trio.sleep(1.0 / rate)
            finally:
                if self._disconnects:
                    log.warning(
                        "%d disconnect calls not made: the server stopped first",
                        len(self._disconnects),
                    )

    async def flush(self) -> None:
        """Wait until every queued disconnect call was made."""
        while self._disconnects or self._disconnecting:
            await trio.sleep(0.05)

    async def _disconnect_call(self, sid: str, body: bytes) -> None:
        try:
            await self._disconnect_call_once(sid, body)
        finally:
            self._disconnecting -= 1

    async def _disconnect_call_once(self, sid: str, body: bytes) -> None:
        try:
            answer = await self._call("disconnect", body, sid)
        except (RpcUnavailable, RpcFailed) as exc:
            log.info("sid %s..: disconnect call failed: %s", sid[:8], exc)
            return
        if answer.get("status") != SUCCESS:
            log.info("sid %s..: the application's disconnect said %s", sid[:8], _why(answer))

    # -- connections -----------------------------------------------------------------------

    def open(self, request: ConnectRequest, conn: Connection) -> RpcConnection:
        headers = request.headers
        scheme = "wss" if self.config.tls_cert else "ws"
        forwarded = headers.get("x-forwarded-proto", "")
        if forwarded in ("https", "wss"):
            scheme = "wss"
        target = request.target or request.path
        url = f"{scheme}://{headers.get('host', '')}{target}"
        passed = {name: headers[name] for name in self.headers_to_pass if name in headers}
        if _JWT_HEADER in headers:
            passed[_JWT_HEADER] = headers[_JWT_HEADER]
        if conn.ip:
            passed["REMOTE_ADDR"] = conn.ip
        return RpcConnection(url, passed)

    def resume(self, state: Any, saved: Any) -> Any:
        if isinstance(state, RpcConnection) and isinstance(saved, Mapping):
            _merge(state.cstate, saved.get("cstate"))
            identifiers = saved.get("identifiers")
            if isinstance(identifiers, str):
                state.identifiers = identifiers
            state.known = bool(saved.get("known"))
        return state

    def saved(self, state: Any) -> Any:
        if not isinstance(state, RpcConnection):
            return None
        out: dict[str, Any] = {"known": state.known}
        if state.cstate:
            out["cstate"] = state.cstate
        if state.identifiers is not None:
            out["identifiers"] = state.identifiers
        return out

    def _state(self, conn: ChannelHost) -> RpcConnection:
        state = cast(Connection, conn).app_state
        if not isinstance(state, RpcConnection):  # a session the executor did not open
            state = RpcConnection("", {})
            cast(Connection, conn).app_state = state
        return state

    def _env(self, state: RpcConnection, istate: Any = None) -> dict[str, Any]:
        env: dict[str, Any] = {"url": state.url, "headers": state.headers}
        if state.cstate:
            env["cstate"] = state.cstate
        if istate:
            env["istate"] = istate
        return env

    def _identifiers(self, state: RpcConnection, conn: ChannelHost) -> str:
        if state.identifiers is not None:
            return state.identifiers
        # Identified by a JWT (or restored from one): the application gets the token's.
        return _dumps(conn.identifiers).decode() if conn.identifiers else ""

    async def connect(self, request: ConnectRequest, conn: Connection) -> Connected | Refused:
        state = self._state(conn)
        body = _dumps({"env": self._env(state)})
        try:
            answer = await self._call("connect", body, conn.sid)
        except RpcUnavailable as exc:
            log.info("%r: connect not answered: %s", conn, exc)
            return self._come_back(exc.retry_in)
        except RpcFailed as exc:
            log.warning("%r: connect failed: %s", conn, exc)
            return self._come_back(0.0)
        _merge(state.cstate, (answer.get("env") or {}).get("cstate"))
        messages, farewell = self._read_transmissions(answer, conn)
        status = answer.get("status")
        if status == SUCCESS:
            raw = answer.get("identifiers")
            state.identifiers = raw if isinstance(raw, str) else ""
            state.known = True
            return Connected(_parse_identifiers(state.identifiers), messages)
        if status == FAILURE:
            reason, reconnect = DisconnectReason.UNAUTHORIZED, False
            if farewell is not None:
                reason, reconnect = _disconnect_fields(farewell, reason, reconnect)
            return Refused(reason, reconnect)
        log.warning("%r: the application's connect said %s", conn, _why(answer))
        return self._come_back(0.0)

    def _come_back(self, retry_in: float) -> Refused:
        """A connect the application could not answer: reconnect, after the advice (not
        ``unauthorized``: nothing is wrong with the client)."""
        after = reconnect_after_ms(retry_in, self.config.reconnect_advice)
        return Refused(
            DisconnectReason.SERVER_RESTART,
            reconnect=True,
            code=CloseCode.TRY_AGAIN_LATER,
            reconnect_after_ms=after,
        )

    async def disconnect(self, conn: Connection, channels: Sequence[Channel]) -> None:
        local = [c for c in channels if not isinstance(c, RpcChannel)]
        if local:
            await self.local.disconnect(conn, local)
        state = conn.app_state
        if not isinstance(state, RpcConnection):
            return
        remote = [c for c in channels if isinstance(c, RpcChannel)]
        if not state.known and not remote:
            # The application never heard of it (a JWT and signed streams only).
            self.metrics.rpc_disconnects_skipped_total += 1
            return
        istate = {c.identifier: _dumps(c._state).decode() for c in remote if c._state}
        body: dict[str, Any] = {
            "subscriptions": [c.identifier for c in reversed(remote)],
            "env": self._env(state, istate),
        }
        identifiers = self._identifiers(state, conn)
        if identifiers:
            body["identifiers"] = identifiers
        self._disconnects.append((conn.sid, _dumps(body)))
        self._wake.set()

    # -- subscriptions -------------------------------------------------------------------

    def channel(
        self, host: ChannelHost, identifier: str, name: str, params: dict[str, Any]
    ) -> Channel | None:
        local = self.local.channel(host, identifier, name, params)
        return local if local is not None else RpcChannel(host, identifier, params)

    async def subscribe(self, channel: Channel) -> bool:
        if not isinstance(channel, RpcChannel):
            return await self.local.subscribe(channel)
        answer = await self._command("subscribe", channel)
        return answer is not None and answer.get("status") == SUCCESS

    async def confirmed(self, channel: Channel) -> None:
        if isinstance(channel, RpcChannel):
            answer, channel.pending_presence = channel.pending_presence, None
            if answer is not None:
                await self._presence(answer, channel, cast(Connection, channel.host))

    async def _presence(
        self, answer: dict[str, Any], channel: RpcChannel, conn: Connection
    ) -> None:
        """An answer's ``presence`` event: join or leave the channel's presence stream (its
        ``$p``); one the server cannot act on is counted (``rpc_ignored_total``)."""
        event = answer.get("presence")
        if not isinstance(event, Mapping):
            return
        kind = event.get("type")
        if kind == "leave":
            await conn.leave_presence(channel)
            return
        stream, pid = channel.presence_stream, event.get("id")
        if kind != "join" or stream is None or not isinstance(pid, str) or not pid:
            self.metrics.inc_labeled("rpc_ignored_total", "presence")
            return
        info = event.get("info")
        if isinstance(info, str):
            with contextlib.suppress(ValueError):
                info = json.loads(info)  # a JSON string, as AnyCable sends it
        await conn.join_presence(channel, stream, pid, info)

    async def unsubscribe(self, channel: Channel) -> None:
        if not isinstance(channel, RpcChannel):
            await self.local.unsubscribe(channel)
            return
        await self._command("unsubscribe", channel)

    def perform_now(self, channel: Channel, action: str, data: dict[str, Any]) -> bool | Work:
        if not isinstance(channel, RpcChannel):
            return self.local.perform_now(channel, action, data)
        return False  # a request to make: the connection's task awaits it

    async def perform(self, channel: Channel, action: str, data: dict[str, Any]) -> None:
        if not isinstance(channel, RpcChannel):
            await self.local.perform(channel, action, data)
            return
        await self._command("message", channel, _dumps(data).decode())

    async def _command(
        self, command: str, channel: RpcChannel, data: str | None = None
    ) -> dict[str, Any] | None:
        """Send one command and apply its answer; None when there was none to apply."""
        conn = cast(Connection, channel.host)
        state = self._state(conn)
        body: dict[str, Any] = {
            "command": command,
            "identifier": channel.identifier,
            "env": self._env(state, channel._state),
        }
        identifiers = self._identifiers(state, conn)
        if identifiers:
            body["connection_identifiers"] = identifiers
        if data is not None:
            body["data"] = data
        state.known = True  # from here on the application may hold something of it
        try:
            answer = await self._call("command", _dumps(body), conn.sid)
        except (RpcUnavailable, RpcFailed) as exc:
            log.info("%r: %s for %s not answered: %s", conn, command, channel.identifier[:200], exc)
            return None
        if answer.get("status") == ERROR:
            log.info(
                "%r: %s for %s: the application said %s",
                conn,
                command,
                channel.identifier[:200],
                _why(answer),
            )
        self._apply(answer, channel, conn, state, command)
        if answer.get("presence") and conn.is_open:
            if command == "subscribe":
                # Joined once the client has its confirm (others hear of it after that).
                channel.pending_presence = answer
            elif command == "message":
                await self._presence(answer, channel, conn)
        return answer

    def _apply(
        self,
        answer: dict[str, Any],
        channel: RpcChannel,
        conn: Connection,
        state: RpcConnection,
        command: str,
    ) -> None:
        """Honour a command's answer, in anycable-go's order: streams, state, then the
        transmissions, then a disconnect."""
        if command != "unsubscribe":  # an unsubscribed channel's streams are gone already
            if answer.get("stop_streams"):
                channel.stop_all_streams()
            for stream in _strings(answer.get("stopped_streams")):
                channel.stop_stream_from(stream)
            for stream in _strings(answer.get("streams")):
                if is_stream_name(stream):
                    channel.stream_from(stream)
                else:
                    log.info("%r: unusable stream name %r from the application", conn, stream[:100])
        env = answer.get("env") or {}
        if isinstance(env, Mapping):
            _merge(state.cstate, env.get("cstate"))
            if env.get("istate"):
                _merge(channel.state, env.get("istate"))
        messages, farewell = self._read_transmissions(answer, conn)
        for message in messages:
            self.metrics.transmissions_total += 1
            conn.send(message)
        if farewell is not None:
            reason, reconnect = _disconnect_fields(farewell, DisconnectReason.REMOTE, True)
            conn.close(reason, reconnect=reconnect)
        elif answer.get("disconnect"):
            conn.close(None)

    def _read_transmissions(
        self, answer: dict[str, Any], conn: Connection
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The answer's transmissions to forward, and its ``disconnect`` message if any
        (the protocol messages the server sends itself are dropped)."""
        messages: list[dict[str, Any]] = []
        farewell: dict[str, Any] | None = None
        for raw in _strings(answer.get("transmissions")):
            try:
                message = json.loads(raw)
            except ValueError:
                log.info("%r: a transmission that is not JSON dropped: %r", conn, raw[:100])
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind in _PROTOCOL_TYPES:
                continue
            if kind == "disconnect":
                farewell = message
                continue
            if isinstance(message, dict):
                messages.append(message)
        return messages, farewell

    # -- one call ----------------------------------------------------------------------------

    async def _call(self, method: str, body: bytes, sid: str) -> dict[str, Any]:
        """POST *body* to the application's *method* and return its JSON answer.

        Bounded by ``--rpc-command-timeout`` in all (waiting for a slot, retries), each
        request by ``--rpc-timeout``.  Raises :class:`RpcUnavailable` when the application
        could not answer in time, :class:`RpcFailed` when it answered badly."""
        config = self.config
        deadline = trio.current_time() + config.rpc_command_timeout
        headers = {
            "content-type": "application/json",
            "x-anycable-meta-sid": sid,
            "x-anycable-meta-protov": "v1",
            **self._auth,
        }
        url = self.urls[method]
        attempt = 0
        while True:
            now = trio.current_time()
            if not self.breaker.allow(now):
                self.metrics.inc_labeled("rpc_refusals_total", method)
                raise RpcUnavailable("circuit breaker open", self.breaker.retry_in(now))
            with trio.move_on_at(deadline) as queue_scope:
                await self.slots.acquire()  # cancelled: not acquired (Trio guarantees it)
            if queue_scope.cancelled_caught:
                # The deadline passed in the queue: the application never saw it.
                self.breaker.cancel()
                self.metrics.inc_labeled("rpc_refusals_total", method)
                raise RpcUnavailable("no free slot before the deadline")
            retry_after: float | None = None
            try:
                self._in_flight += 1
                self.metrics.inc_labeled("rpc_calls_total", method)
                started = trio.current_time()
                with trio.move_on_at(min(deadline, started + config.rpc_timeout)) as scope:
                    try:
                        response = await self.client.post(url, content=body, headers=headers)
                    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                        # Never sent: safe to send again.
                        self._failed("transport")
                        if not self._may_retry(attempt, None, deadline):
                            raise RpcUnavailable(
                                f"cannot reach the application: {exc!r}",
                                self.breaker.retry_in(trio.current_time()),
                            ) from None
                        self.metrics.inc_labeled("rpc_retries_total", "transport")
                        response = None
                    except httpx.TransportError as exc:
                        # It may have reached the application: never sent again.
                        self._failed("transport")
                        raise RpcUnavailable(f"request failed: {exc!r}") from None
                if scope.cancelled_caught:
                    self._overloaded()
                    self._failed("timeout")
                    raise RpcUnavailable("timed out")
                now = trio.current_time()
                if response is not None:
                    status = response.status_code
                    if status == 200:
                        return self._answered(response, started, now)
                    if status not in (429, 503):
                        self._refused_status(status, response)
                    # Overloaded: the application says it did not do it, so it may be asked
                    # again, after what it asked for.
                    self._overloaded()
                    self.metrics.inc_labeled("rpc_errors_total", f"http_{status}")
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                    if not self._may_retry(attempt, retry_after, deadline):
                        self.breaker.record(False, now)
                        self._sync_breaker()
                        raise RpcUnavailable(f"overloaded ({status})", retry_after or 0.0)
                    # No verdict for the breaker (a half-open one frees its probe place).
                    self.breaker.cancel()
                    self.metrics.inc_labeled("rpc_retries_total", "overloaded")
            finally:
                self._in_flight -= 1
                self.slots.release()
            attempt += 1
            await trio.sleep(retry_delay(attempt, retry_after))

    def _may_retry(self, attempt: int, retry_after: float | None, deadline: float) -> bool:
        if attempt >= self.config.rpc_retries:
            return False
        # The jitter's upper end: a retry that cannot be answered in time is not made.
        wait = retry_delay(attempt + 1, retry_after) * 1.5
        return trio.current_time() + wait < deadline

    def _answered(self, response: httpx.Response, started: float, now: float) -> dict[str, Any]:
        latency = now - started
        self.metrics.observe("rpc_call_seconds", latency)
        self.breaker.record(True, now)
        queued = self.slots.statistics().tasks_waiting > 0
        before = self.adaptive.value
        if self.adaptive.succeeded(latency, now, queued=queued):
            self._sync_limit(before)
        try:
            answer = json.loads(response.content)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            self.metrics.inc_labeled("rpc_errors_total", "invalid_answer")
            raise RpcFailed("the answer is not a JSON object")
        return answer

    def _refused_status(self, status: int, response: httpx.Response) -> None:
        """An answer that is neither 200 nor an overload: not retried (AnyCable's rule)."""
        now = trio.current_time()
        # A 4xx is an answering application (with a configuration problem); 5xx is not.
        self.breaker.record(status < 500, now)
        self._sync_breaker()
        self.metrics.inc_labeled("rpc_errors_total", f"http_{status}")
        if status == 401:
            log.error("the RPC application refused our key (401): check --rpc-secret")
        raise RpcFailed(f"HTTP {status}: {response.text[:200]!r}")

    def _failed(self, reason: str) -> None:
        self.metrics.inc_labeled("rpc_errors_total", reason)
        self.breaker.record(False, trio.current_time())
        self._sync_breaker()

    def _overloaded(self) -> None:
        before = self.adaptive.value
        if self.adaptive.overloaded(trio.current_time()):
            self._sync_limit(before)

    def _sync_limit(self, before: int) -> None:
        value = self.adaptive.value
        if value == before:
            return
        if value < before:
            self.metrics.rpc_limit_decreases_total += 1
        else:
            self.metrics.rpc_limit_increases_total += 1
        # Lowering takes no slot back from a call in flight: new calls wait until fewer are.
        self.slots.total_tokens = value

    def _sync_breaker(self) -> None:
        if self.breaker.trips != self.metrics.rpc_breaker_trips_total:
            self.metrics.rpc_breaker_trips_total = self.breaker.trips
            log.warning(
                "the RPC application is failing: refusing calls for %g s (circuit breaker)",
                self.breaker.cooldown,
            )


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, str)]


def _parse_identifiers(raw: str) -> dict[str, Any]:
    """The session's identifiers from the application's string (a JSON object, usually)."""
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {"identifiers": raw}
    return value if isinstance(value, dict) else {"identifiers": value}


def _disconnect_fields(
    message: dict[str, Any], reason: DisconnectReason, reconnect: bool
) -> tuple[DisconnectReason, bool]:
    """Reason and reconnect of an application's ``disconnect`` message (defaults for what
    it leaves out or the server does not know)."""
    raw = message.get("reason")
    if raw in _REASONS:
        reason = DisconnectReason(raw)
    value = message.get("reconnect")
    return reason, value if isinstance(value, bool) else reconnect


def _why(answer: dict[str, Any]) -> str:
    status = answer.get("status", ERROR)
    message = answer.get("error_msg") or ""
    return f"status {status} {str(message)[:200]!r}"
