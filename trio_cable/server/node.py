"""The server node: listener and admission, HTTP routing, tickers, drain and broadcasting.

Embedding::

    async with trio.open_nursery() as nursery:
        server = await nursery.start(Server(Config(port=0), app).serve)
        await server.broadcast("chat_1", {"text": "hi"})
        ...
        await server.drain()                 # optional: slow-drain the clients first
        nursery.cancel_scope.cancel()        # stops the server
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import math
import resource
import secrets
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import h11
import trio

from trio_cable.broker import PRESENCE, Broadcast, Broker
from trio_cable.broker.factory import create_broker
from trio_cable.channels import BUILTIN_CHANNELS, BenchmarkChannel, CableApp, Channel
from trio_cable.config import Config, ConfigError
from trio_cable.identity import JWTIdentifier
from trio_cable.metrics import Metrics, prometheus_text
from trio_cable.protocol import cable
from trio_cable.protocol.cable import JSON, MSGPACK, InvalidCommand, Subprotocol
from trio_cable.protocol.codes import CloseCode, DisconnectReason
from trio_cable.protocol.deflate import DeflateParams, DeflateSettings
from trio_cable.protocol.frames import SPEEDUPS, SPEEDUPS_STATUS
from trio_cable.protocol.handshake import (
    Refusal,
    Request,
    negotiate,
    origin_allowed,
    request_from_h11,
)
from trio_cable.server import dashboard
from trio_cable.server.admission import (
    AdaptiveLimits,
    TokenBucket,
    reconnect_after_ms,
    retry_after,
)
from trio_cable.server.drain import Drainer
from trio_cable.server.echo import EchoSession
from trio_cable.server.executor import ChannelExecutor, Executor
from trio_cable.server.gc_control import GcControl
from trio_cable.server.housekeeping import PingRounds
from trio_cable.server.http import (
    MAX_HEAD_BYTES,
    BadRequest,
    Response,
    bearer_ok,
    read_body,
    read_request,
    send_response,
)
from trio_cable.server.hub import Hub
from trio_cable.server.presence import InfoAnswers, PresenceCoalescer
from trio_cable.server.reactor import Reactor, reactor_available
from trio_cable.server.rebalance import Rebalancer
from trio_cable.server.rpc_executor import RpcExecutor
from trio_cable.server.session import Session
from trio_cable.server.sockio import close_socket, send_all, tls_handshake
from trio_cable.server.transport import WireFormat
from trio_cable.server.transports.longpoll import (
    POLL_ID_HEADER,
    LongPollContext,
    LongPollTransport,
    poll_format,
)
from trio_cable.server.transports.sse import (
    BadQuery,
    SSEContext,
    SSETransport,
    last_event_id,
    refusal_event,
    sse_format,
    subscribe_command,
)
from trio_cable.server.transports.websocket import (
    WebSocketContext,
    WebSocketTransport,
)

if TYPE_CHECKING:
    from trio_cable.server.cluster import WorkerGroup

log = logging.getLogger("trio_cable")

_ACCEPT_BATCH = 64
# Housekeeping runs in slices of this many seconds (see _housekeeper), saving at most this
# many changed sessions a slice.
_SLICE = 0.02
_SAVES_PER_SLICE = 64
#: Publications one ``POST /_broadcast`` may carry (AnyCable's broadcasters batch far fewer).
MAX_PUBLICATIONS = 1000
_LAG_PROBE = 0.05  # seconds between event-loop lag probes
# Half-open detection: probe after 60 s of silence, every 10 s, give up after 3 misses (about
# 90 s); and give up on data nobody acknowledges for 60 s.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
USER_TIMEOUT_MS = 60_000
_speedups_notice_given = False


#: The presence endpoint's path prefix (the stream follows, URL-encoded).
PRESENCE_PATH = "/api/presence/"


@dataclass(frozen=True, slots=True)
class Accepted:
    """A WebSocket handshake to answer with 101 (no subprotocol: the raw echo endpoint)."""

    request: Request
    subprotocol: Subprotocol | None
    headers: list[tuple[str, str]]
    deflate: DeflateParams | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """Publications a ``POST /_broadcast`` brought, to make once its request was read."""

    items: list[cable.Publication | cable.RemoteCommand]


@dataclass(frozen=True, slots=True)
class EventStream:
    """An SSE request to answer with an event stream: the commands it stands for (a GET's
    subscribe, a POST's JSON lines)."""

    request: Request
    commands: list[bytes]
    raw: bool
    headers: list[tuple[str, str]]
    mark_confirm: bool


@dataclass(frozen=True, slots=True)
class Poll:
    """A long poll whose request was read: its commands, and its session (None: a new one)."""

    request: Request
    commands: list[bytes]
    transport: LongPollTransport | None
    headers: list[tuple[str, str]]


_EVENT_STREAM = "text/event-stream; charset=utf-8"
_JSON_LINES = "application/x-ndjson"
_TRUE = ("1", "true", "t", "y", "yes")


def new_sid() -> str:
    """A session id: 128 random bits, URL-safe."""
    return secrets.token_urlsafe(16)


def _raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def _since(query: dict[str, str]) -> float:
    """``?since=`` of ``/metrics/samples``: a :func:`time.monotonic` time (0: everything)."""
    try:
        value = float(query.get("since", "0"))
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


class Server:
    """A trio_cable server node.  Start it with ``await nursery.start(server.serve)``."""

    #: What this server supports beyond plain Action Cable (clients and tests may check).
    features: frozenset[str] = frozenset(
        {"resume", "history", "drain", "reconnect_advice", "sse", "long_poll"}
    )

    def __init__(
        self,
        config: Config | None = None,
        app: CableApp | None = None,
        *,
        broker: Broker | None = None,
        listen_socket: socket.socket | None = None,
        label: str = "trio_cable",
    ) -> None:
        """*listen_socket*, when given, is an already bound and listening socket to serve on
        (a supervisor's, or one handed over by a node being replaced).  *label* names the
        node in its log (``trio_cable worker 1``)."""
        self.config = config = (config or Config()).validate()
        self.app = app or CableApp()
        self.metrics = Metrics()
        self.broker: Broker = broker or create_broker(config)
        self.hub = Hub(
            self.metrics, on_first=self.broker.subscribe, on_last=self.broker.unsubscribe
        )
        #: Every open connection: Action Cable sessions, and raw echo connections.
        self.connections: set[Session | EchoSession] = set()
        self.callback_limiter = trio.CapacityLimiter(config.callback_concurrency)
        jwt_secret = config.effective_jwt_secret
        self.jwt: JWTIdentifier | None = JWTIdentifier(jwt_secret) if jwt_secret else None
        channels: dict[str, type[Channel]] = {c.name(): c for c in BUILTIN_CHANNELS}
        if config.benchmark_channel:
            channels[BenchmarkChannel.name()] = BenchmarkChannel
        channels.update(self.app.channels)
        local = ChannelExecutor(self.app, channels, self.callback_limiter, self.metrics)
        #: The in-process channels (also under an RPC executor: built-ins, --channels).
        self.channel_executor = local
        self.executor: Executor = local
        if config.rpc_host:
            # The application answers over HTTP; in-process channels still run here.
            self.executor = RpcExecutor(config, local, self.metrics)
        # Welcomed sessions by ping interval: the ticker pings, checks pongs, saves sessions.
        self._ping_groups: dict[float, set[Session]] = {}
        self._sessions: dict[str, Session] = {}  # sid -> open session
        self._ping_rounds: PingRounds[Session] = PingRounds(_SLICE)
        self._dirty: set[Session] = set()  # sessions changed since they were last saved
        self._listen_socket: socket.socket | None = None
        self._port: int | None = None
        if listen_socket is not None:
            listen_socket.setblocking(False)
            self._listen_socket = listen_socket
            self._port = int(listen_socket.getsockname()[1])
        self.label = label
        self._accepting = True
        self._serving = False
        #: The workers this node is one of (``serve --workers N``): /health and /metrics
        #: answer for all of them.  None for a node on its own.
        self.group: WorkerGroup | None = None
        self.started_at = time.time()
        # Admission control.
        self.handshake_bucket = TokenBucket(config.handshake_rate, config.handshake_rate)
        self.adaptive = AdaptiveLimits(
            self.handshake_bucket,
            self.callback_limiter,
            max_rate=config.handshake_rate,
            max_callbacks=config.callback_concurrency,
            lag_target=config.lag_target,
        )
        self.max_connections = config.max_connections
        self.pending_handshakes = 0
        self.connections_by_address: dict[str, int] = {}
        self.tls_context = _tls_context(config)
        self.drainer = Drainer(config, self.metrics, self.connections)
        #: With ``--rebalance``: this node's share of the cluster's connections kept fair.
        self.rebalancer: Rebalancer | None = (
            Rebalancer(
                secrets.token_hex(6),
                tolerance=config.rebalance_tolerance,
                rate=config.rebalance_rate,
                reconnect_advice=config.reconnect_advice,
                metrics=self.metrics,
                connections=self.connections,
                draining=lambda: self.draining,
                publish=self.broker.publish_command,
            )
            if config.rebalance
            else None
        )
        self.reactor: Reactor | None = Reactor() if reactor_available() else None
        self._websocket = WebSocketContext.create(
            self.metrics,
            self.reactor,
            max_message_size=config.max_message_size,
            max_send_queue=config.max_send_queue,
            close_timeout=config.close_timeout,
            message_timeout=config.message_timeout,
            max_partial_memory=config.partial_messages_max_memory,
        )
        self._sse = SSEContext(self.metrics, config.max_send_queue, config.close_timeout)
        self._polls = LongPollContext(
            self.metrics,
            config.max_send_queue,
            config.close_timeout,
            config.poll_interval,
            config.poll_keepalive_timeout,
        )
        #: What permessage-deflate offers are answered with (None: compression is off).
        self._deflate: DeflateSettings | None = (
            DeflateSettings(config.compression_level, config.compression_threshold)
            if config.compression
            else None
        )
        m = self.metrics
        m.gauges["connections"] = lambda: float(len(self.connections))
        m.gauges["sse_connections"] = lambda: float(
            sum(1 for c in self.connections if isinstance(c, Session) and not c.format.commands)
        )
        m.gauges["long_poll_sessions"] = lambda: float(len(self._polls.sessions))
        m.gauges["streams"] = lambda: float(len(self.hub))
        m.gauges["draining"] = lambda: float(self.draining)
        m.gauges["pending_handshakes"] = lambda: float(self.pending_handshakes)
        m.gauges["handshake_rate_limit"] = lambda: float(self.handshake_bucket.rate)
        m.gauges["callback_concurrency_limit"] = lambda: float(self.callback_limiter.total_tokens)
        broker_stats = getattr(self.broker, "stats", None)
        if isinstance(broker_stats, dict):
            # e.g. the Redis broker's disconnects, reconnects, publish failures ...
            for key in broker_stats:
                m.external_counters[f"broker_{key}_total"] = partial(_read_stat, broker_stats, key)
        m.gauges["send_queue_bytes"] = lambda: float(sum(c.queued_bytes for c in self.connections))
        m.gauges["partial_message_bytes"] = lambda: float(self._websocket.partial.bytes)
        m.gauges["gc_frozen_objects"] = lambda: float(gc.get_freeze_count())
        m.gauges["pending_fanouts"] = lambda: float(self.hub.pending_fanouts)
        self.gc_control = GcControl(m)
        # Presence events of a stream are coalesced per window (server/presence.py).
        self.presence_coalescer = PresenceCoalescer(config.presence_window)
        self._presence_wakeup = trio.Event()
        #: Encoded presence info answers (server/presence.py), for the sessions.
        self.presence_answers = InfoAnswers()

    # -- addresses -----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (useful with ``port=0``)."""
        if self._port is None:
            raise RuntimeError("server is not listening yet")
        return self._port

    @property
    def url(self) -> str:
        """``ws://host:port/path`` (``wss://`` with TLS) of the first endpoint."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        scheme = "wss" if self.tls_context else "ws"
        return f"{scheme}://{host}:{self.port}{self.config.path[0]}"

    @property
    def ping_intervals(self) -> list[float]:
        """The ping intervals in use by welcomed connections (``?pi=`` makes more than one)."""
        return sorted(self._ping_groups)

    @property
    def draining(self) -> bool:
        """True from the start of a drain: no new connections, ``/health`` is 503."""
        return self.drainer.started

    # -- running -------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen and serve until cancelled; ``task_status.started(self)`` once listening."""
        global _speedups_notice_given
        if not SPEEDUPS and not _speedups_notice_given:
            _speedups_notice_given = True
            log.warning("running the pure-Python frame kernels: speedups %s", SPEEDUPS_STATUS)
        sock = self.bind()
        if not self.max_connections:
            # Leave room for the listener, logs, broker connections and HTTP requests.
            self.max_connections = max(16, _raise_open_file_limit() - 128)
        self.gc_control.install()
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.broker.run)
                await nursery.start(self.executor.run)
                if self.reactor is not None:
                    nursery.start_soon(self.reactor.run)
                self.broker.bind(self._deliver, self._on_command)
                nursery.start_soon(self.hub.run_flusher)
                nursery.start_soon(self._presence_flusher)
                nursery.start_soon(self.hub.run_fanout)
                nursery.start_soon(self._housekeeper)
                nursery.start_soon(self._lag_monitor)
                if self.rebalancer is not None:
                    nursery.start_soon(self.rebalancer.run)
                log.info("%s listening on %s", self.label, self.url)
                task_status.started(self)
                await self._accept_loop(sock, nursery)
                # Not accepting any more (stop_accepting): serve the connections we have.
                await trio.sleep_forever()
        finally:
            self.gc_control.uninstall()
            self.broker.unbind(self._deliver)
            close_socket(sock)

    def bind(self) -> socket.socket:
        """Open the listening socket now (``serve`` does it otherwise), so that an address
        already in use is reported as a plain ``OSError`` before any task starts."""
        if self._listen_socket is not None:
            return self._listen_socket
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        try:
            sock = socket.create_server(
                (cfg.host, cfg.port), family=family, backlog=4096, reuse_port=False
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen on {cfg.host}:{cfg.port}: {exc.strerror}"
            ) from exc
        sock.setblocking(False)
        self._listen_socket = sock
        self._port = int(sock.getsockname()[1])
        return sock

    def stop_accepting(self) -> None:
        """Close the listening socket: no new connections reach this node (the existing ones
        are served on).  For handing the port to a replacement node; a drain alone keeps
        answering new clients with 503 and advice instead.

        The connections the kernel already queued for this socket are accepted first (a
        closed listener resets them): with ``SO_REUSEPORT`` the other sockets of the port
        take the new ones from then on."""
        sock = self._listen_socket
        self._accepting = False
        if sock is not None and sock.fileno() != -1:
            # Wakes the accept loop, which takes the queue and closes the socket; when the
            # node is not serving, closing is all there is to do.
            trio.lowlevel.notify_closing(sock)
            if not self._serving:
                sock.close()

    async def _accept_loop(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        self._serving = True
        try:
            await self._accept_until_stopped(listener, nursery)
        finally:
            self._serving = False
        # stop_accepting(): what the kernel queued, then the socket goes.
        with contextlib.suppress(OSError):
            while listener.fileno() != -1:
                sock, addr = listener.accept()
                sock.setblocking(False)
                _tune_socket(sock)
                nursery.start_soon(self._handle_socket, sock, addr, nursery)
        close_socket(listener)

    async def _accept_until_stopped(self, listener: socket.socket, nursery: trio.Nursery) -> None:
        while self._accepting:
            try:
                await trio.lowlevel.wait_readable(listener)
            except trio.ClosedResourceError:
                return  # stop_accepting()
            for _ in range(_ACCEPT_BATCH):
                if listener.fileno() == -1:
                    return
                try:
                    sock, addr = listener.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in (errno.EBADF, errno.EINVAL):
                        return  # the listening socket was closed or shut down
                    # EMFILE and friends: back off instead of spinning on a readable socket.
                    log.error("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    break
                sock.setblocking(False)
                _tune_socket(sock)
                if self.pending_handshakes >= self.config.max_pending_handshakes:
                    # Fast refusal, not an unbounded queue: answer without reading.
                    nursery.start_soon(self._refuse_early, sock, "pending_handshakes")
                    continue
                nursery.start_soon(self._handle_socket, sock, addr, nursery)

    async def _refuse_early(self, sock: socket.socket, reason: str) -> None:
        try:
            if self.tls_context is None:  # under TLS there is no cheap way to answer
                with trio.move_on_after(self.config.close_timeout):
                    await send_response(sock, None, self._overloaded(reason))
            else:
                self._overloaded(reason)
        finally:
            close_socket(sock)

    def _overloaded(self, reason: str, base: float = 0.0) -> Response:
        """503 with jittered Retry-After advice; counted by reason."""
        self.metrics.handshakes_failed_total += 1
        self.metrics.inc_labeled("handshakes_refused_total", reason)
        seconds = retry_after(base, self.config.reconnect_advice)
        message = "server is draining" if reason == "draining" else f"server busy ({reason})"
        return Response.text(503, message, [("retry-after", str(seconds))])

    def _admission(self, ip: str) -> tuple[str, float] | None:
        """Admission control for a new connection (any transport): None to admit, else why
        not and the least time before trying again makes sense."""
        if self.draining:
            return "draining", 0.0
        if len(self.connections) >= self.max_connections:
            return "max_connections", 0.0
        per_address = self.config.max_connections_per_address
        if per_address and self.connections_by_address.get(ip, 0) >= per_address:
            return "per_address", 0.0
        now = trio.current_time()
        if not self.handshake_bucket.take(now):
            return "handshake_rate", self.handshake_bucket.wait_time(now)
        return None

    def _admit(self, request: Request, ip: str) -> Response | None:
        """Admission control for a WebSocket handshake: None to admit, else the refusal."""
        refusal = self._admission(ip)
        return None if refusal is None else self._overloaded(*refusal)

    async def _handle_socket(self, sock: socket.socket, addr: Any, nursery: trio.Nursery) -> None:
        """Read one HTTP request and route it: a WebSocket, an HTTP endpoint, or an error.

        Every step is bounded in time: the TLS handshake, the request head and any body
        together get ``handshake_timeout``, and each answer ``close_timeout`` (a client that
        stops reading must not keep a pending-handshake slot).  An accepted WebSocket
        continues in a task of its own, so that nothing the handshake needed (h11 state,
        this frame) stays alive for the connection's lifetime."""
        remote = _format_addr(addr)
        ip = str(addr[0]) if isinstance(addr, tuple) else remote
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        cfg = self.config
        handed_off = False
        self.pending_handshakes += 1
        pending = True
        # A TLS socket speaks HTTP only once its handshake is done: before, there is no way
        # to answer (and trying would wait for the client to go on with TLS).
        speaks_http = self.tls_context is None
        outcome: Response | Accepted | Publish | EventStream | Poll | None = None
        try:
            with trio.move_on_after(cfg.handshake_timeout) as scope:
                if self.tls_context is not None:
                    try:
                        sock = self.tls_context.wrap_socket(
                            sock, server_side=True, do_handshake_on_connect=False
                        )
                        await tls_handshake(sock)
                    except (ssl.SSLError, OSError) as exc:
                        self.metrics.handshakes_failed_total += 1
                        log.info("%s: TLS handshake failed: %s", remote, exc)
                        return
                    speaks_http = True
                try:
                    event = await read_request(sock, conn)
                except BadRequest as exc:
                    self.metrics.handshakes_failed_total += 1
                    outcome = Response.text(exc.status, exc.message)
                else:
                    if event is None:
                        return  # the client hung up
                    outcome = await self._route(sock, conn, request_from_h11(event, remote), ip)
            if scope.cancelled_caught:
                self.metrics.handshakes_failed_total += 1
                log.info("%s: handshake timeout", remote)
                if not speaks_http:
                    return
                outcome = Response.text(408, "request timeout")
            if isinstance(outcome, Publish):
                # The client's part is done: publishing is ours, not bounded by its deadline.
                await self._publish(outcome.items)
                outcome = Response(201)
            if isinstance(outcome, Poll):
                # Read: what is left is the session's (a long poll may wait poll_interval).
                self.pending_handshakes -= 1
                pending = False
                outcome = await self._serve_poll(outcome, nursery, ip, remote)
            if isinstance(outcome, Response):
                with trio.move_on_after(cfg.close_timeout):
                    await send_response(sock, conn, outcome)
                return
            if outcome is None:
                return
            budget = TokenBucket(cfg.command_rate, 2 * cfg.command_rate, trio.current_time())
            if isinstance(outcome, EventStream):
                stream = SSETransport(
                    self._sse,
                    sock,
                    outcome.commands,
                    outcome.headers,
                    remote=remote,
                    mark_confirm=outcome.mark_confirm,
                )
                session = Session(
                    self,
                    stream,
                    sse_format(outcome.raw),
                    outcome.request,
                    new_sid(),
                    budget,
                    subprotocol="sse",
                    ip=ip,
                )
                self.metrics.sse_connections_total += 1
                handed_off = True
                self.pending_handshakes -= 1
                pending = False
                nursery.start_soon(stream.run, session)
                return
            response = h11.InformationalResponse(status_code=101, headers=outcome.headers)
            with trio.move_on_after(cfg.close_timeout) as answer_scope:
                await send_all(sock, conn.send(response) or b"")
            if answer_scope.cancelled_caught:
                self.metrics.handshakes_failed_total += 1
                log.info("%s: the client does not read its 101", remote)
                return
            trailing, _closed = conn.trailing_data
            deflate = outcome.deflate
            transport = WebSocketTransport(
                self._websocket,
                sock,
                budget,
                bytes(trailing),
                remote=remote,
                compression=deflate is not None,
            )
            receiver: Session | EchoSession
            subprotocol = outcome.subprotocol
            websocket = self._websocket
            if subprotocol is None:  # only the echo endpoint goes without one
                receiver = EchoSession(
                    self,
                    transport,
                    websocket.wire_format(JSON, False, deflate).frame,
                    websocket.wire_format(MSGPACK, False, deflate).frame,
                    ip=ip,
                )
            else:
                receiver = Session(
                    self,
                    transport,
                    websocket.wire_format(subprotocol.codec, subprotocol.extended, deflate),
                    outcome.request,
                    new_sid(),
                    budget,
                    subprotocol=subprotocol.name,
                    ip=ip,
                )
            handed_off = True
            self.pending_handshakes -= 1
            pending = False
            nursery.start_soon(transport.run, receiver)
        except OSError as exc:
            log.debug("%s: socket error: %s", remote, exc)
        except Exception:
            # A bug must cost one connection, never the server.
            log.exception("%s: unexpected error", remote)
        finally:
            if pending:
                self.pending_handshakes -= 1
            if not handed_off:
                close_socket(sock)

    async def _route(
        self, sock: socket.socket, conn: h11.Connection, request: Request, ip: str
    ) -> Response | Accepted | Publish | EventStream | Poll:
        """The answer to *request*: a WebSocket accepted, an event stream to open, a poll to
        serve, publications to make, or an HTTP response (an endpoint's, a refusal).  Runs
        within the handshake deadline (an endpoint may read a body); what it leads to runs
        after it."""
        cfg = self.config
        if cfg.sse_path and request.path == cfg.sse_path:
            return await self._sse_request(sock, conn, request, ip)
        if cfg.poll_path and request.path == cfg.poll_path:
            return await self._poll_request(sock, conn, request, ip)
        if request.path not in cfg.path and not (cfg.echo_path and request.path == cfg.echo_path):
            return await self._http(sock, conn, request)
        echo = request.path == cfg.echo_path
        outcome = negotiate(
            request,
            allowed_origins=cfg.allowed_origins,
            require_subprotocol=not echo,
            # Not while shedding load: a compressing client's history replay and
            # transmissions are deflated for it alone, CPU a late loop does not have.
            compression=None if self.adaptive.shedding else self._deflate,
        )
        if isinstance(outcome, Refusal):
            self.metrics.handshakes_failed_total += 1
            self.metrics.inc_labeled("handshakes_refused_total", f"http_{outcome.status}")
            log.info(
                "%s: WebSocket refused (%d %s)", request.remote, outcome.status, outcome.message
            )
            return Response.text(outcome.status, outcome.message, outcome.headers)
        refusal = self._admit(request, ip)
        if refusal is not None:
            return refusal
        return Accepted(
            request, None if echo else outcome.subprotocol, outcome.headers, outcome.deflate
        )

    # -- SSE and long polling -------------------------------------------------------------

    def _cors(self, request: Request) -> list[tuple[str, str]] | None:
        """CORS headers for a browser's request from another origin (SSE, long polling);
        None when its origin is not allowed."""
        origin = request.headers.get("origin")
        if origin is None:
            return []
        if not origin_allowed(origin, self.config.allowed_origins):
            return None
        return [
            ("access-control-allow-origin", origin),
            ("access-control-allow-credentials", "true"),
            ("access-control-expose-headers", POLL_ID_HEADER),
            ("vary", "origin"),
        ]

    def _preflight(self, request: Request, cors: list[tuple[str, str]]) -> Response:
        asked = request.headers.get("access-control-request-headers", "")
        return Response(
            204,
            headers=[
                *cors,
                ("access-control-allow-methods", "GET, POST, OPTIONS"),
                ("access-control-allow-headers", asked[:1000]),
                ("access-control-max-age", "600"),
            ],
        )

    def _cross_origin(self, request: Request) -> tuple[list[tuple[str, str]], Response | None]:
        """(CORS headers, None) for an allowed origin; a refusal (403) or the preflight's
        answer (OPTIONS) in place of None when that is all there is to say."""
        cors = self._cors(request)
        if cors is None:
            self.metrics.handshakes_failed_total += 1
            return [], Response.text(403, "origin not allowed")
        if request.method == "OPTIONS":
            return cors, self._preflight(request, cors)
        return cors, None

    async def _command_lines(
        self, sock: socket.socket, conn: h11.Connection, cors: list[tuple[str, str]]
    ) -> list[bytes] | Response:
        """A POST body's commands, one JSON document per line (blank lines skipped), or the
        answer to a body that cannot be read (too big, cut short)."""
        try:
            body = await read_body(sock, conn, self.config.max_message_size)
        except BadRequest as exc:
            return Response.text(exc.status, exc.message, cors)
        return [line for line in body.split(b"\n") if line.strip()]

    async def _sse_request(
        self, sock: socket.socket, conn: h11.Connection, request: Request, ip: str
    ) -> Response | EventStream:
        cors, answer = self._cross_origin(request)
        if answer is not None:
            return answer
        if request.method == "POST":
            # anycable-go's other form: the commands (subscribes) as JSON lines in the body,
            # for clients that can send a body (fetch, curl), not EventSource.
            commands = await self._command_lines(sock, conn, cors)
            if isinstance(commands, Response):
                return commands
            if not commands:
                return Response.text(400, "POST the commands as JSON lines", cors)
        elif request.method == "GET":
            try:
                commands = [subscribe_command(request, self.config.jwt_param)]
            except BadQuery as exc:
                self.metrics.handshakes_failed_total += 1
                return Response.text(400, str(exc), cors)
        else:
            return Response.text(405, "use GET or POST", [("allow", "GET, POST"), *cors])
        refusal = self._admission(ip)
        if refusal is not None:
            # 200 and a retry: EventSource gives up for good on a 503, and comes back after
            # the advice when a stream ends.
            reason, base = refusal
            self.metrics.handshakes_failed_total += 1
            self.metrics.inc_labeled("handshakes_refused_total", reason)
            after = max(1000, reconnect_after_ms(base, self.config.reconnect_advice))
            why = DisconnectReason.SERVER_RESTART if reason == "draining" else "server_busy"
            return Response(200, refusal_event(str(why), after), _EVENT_STREAM, cors)
        raw = request.method == "GET" and request.query.get("raw", "").lower() in _TRUE
        fresh = request.method == "GET" and not last_event_id(request)
        return EventStream(request, commands, raw, cors, fresh)

    async def _poll_request(
        self, sock: socket.socket, conn: h11.Connection, request: Request, ip: str
    ) -> Response | Poll:
        cors, answer = self._cross_origin(request)
        if answer is not None:
            return answer
        if request.method != "POST":
            return Response.text(405, "use POST", [("allow", "POST"), *cors])
        commands = await self._command_lines(sock, conn, cors)
        if isinstance(commands, Response):
            return commands
        poll_id = request.headers.get(POLL_ID_HEADER)
        if poll_id:
            transport = self._polls.sessions.get(poll_id)
            if transport is None or transport.state == "closed":
                # Timed out, or ended and its last messages taken: the client starts over
                # (resuming with ?sid=).
                self.metrics.long_poll_stale_requests_total += 1
                notice = cable.disconnect("session_expired", True)
                return Response(401, json.dumps(notice).encode() + b"\n", _JSON_LINES, cors)
            return Poll(request, commands, transport, cors)
        refusal = self._admission(ip)
        if refusal is not None:
            response = self._overloaded(*refusal)
            response.headers.extend(cors)
            return response
        return Poll(request, commands, None, cors)

    async def _serve_poll(
        self, poll: Poll, nursery: trio.Nursery, ip: str, remote: str
    ) -> Response:
        """Serve a poll, opening its session first when it is a new one."""
        status = 200
        transport = poll.transport
        if transport is None:
            transport = LongPollTransport(self._polls, secrets.token_urlsafe(18), remote=remote)
            cfg = self.config
            session = Session(
                self,
                transport,
                poll_format(),
                poll.request,
                new_sid(),
                TokenBucket(cfg.command_rate, 2 * cfg.command_rate, trio.current_time()),
                subprotocol="long-poll",
                ip=ip,
            )
            self.metrics.long_poll_sessions_total += 1
            await nursery.start(transport.run, session)
            if not transport.open:
                status = 401  # refused (the body says why)
        self.metrics.long_poll_requests_total += 1
        lines = await transport.poll(poll.commands)
        headers = [(POLL_ID_HEADER, transport.poll_id), ("cache-control", "no-store")]
        return Response(status, b"".join(lines), _JSON_LINES, [*headers, *poll.headers])

    async def _publish(self, items: list[cable.Publication | cable.RemoteCommand]) -> None:
        """Publish what ``POST /_broadcast`` brought, in order, letting other tasks run
        between publications (one request's fan-outs must not hold the loop)."""
        for item in items:
            if isinstance(item, cable.RemoteCommand):
                await self.broker.publish_command(item.to_dict())
            else:
                await self.broker.publish(item.stream, item.data, item.exclude_socket)
            await trio.lowlevel.checkpoint()

    async def _http(
        self, sock: socket.socket, conn: h11.Connection, request: Request
    ) -> Response | Publish:
        path, method = request.path, request.method
        if path == "/health":
            if method not in ("GET", "HEAD"):
                return Response.text(405, "use GET", [("allow", "GET")])
            doc = self.health() if self.group is None else await self.group.health()
            return Response.json(503 if self.draining else 200, doc)
        if path == "/metrics":
            if method not in ("GET", "HEAD"):
                return Response.text(405, "use GET", [("allow", "GET")])
            if self.group is None:
                text = prometheus_text(self.metrics)
            else:
                text = await self.group.metrics_text()
            return Response(200, text, "text/plain; version=0.0.4")
        if path == "/metrics/samples":
            # Raw recent loop-lag and GC-pause samples (the histograms' buckets are too coarse
            # for a benchmark's p99 and max); ?since=<time.monotonic()> cuts a window.
            if method not in ("GET", "HEAD"):
                return Response.text(405, "use GET", [("allow", "GET")])
            return Response.json(200, self.metrics.recent(_since(request.query)))
        if path == "/_dashboard" or path.startswith("/_dashboard/"):
            return await self._dashboard(request)
        if path == "/_broadcast":
            if method != "POST":
                return Response.text(405, "use POST", [("allow", "POST")])
            authorization = request.headers.get("authorization")
            if not bearer_ok(authorization, self.config.effective_broadcast_key):
                return Response.text(
                    401, "missing or wrong broadcast key", [("www-authenticate", "Bearer")]
                )
            try:
                body = await read_body(sock, conn, max(self.config.max_message_size, 1 << 20))
            except BadRequest as exc:
                return Response.text(exc.status, exc.message)
            try:
                items = cable.parse_publications(body)
            except InvalidCommand as exc:
                return Response.text(400, f"bad publication: {exc.reason}")
            if len(items) > MAX_PUBLICATIONS:
                return Response.text(
                    413, f"{len(items)} publications in one request (at most {MAX_PUBLICATIONS})"
                )
            return Publish(items)
        if path.startswith(PRESENCE_PATH):
            return await self._presence_endpoint(request)
        if request.is_websocket_upgrade:
            return Response.text(404, f"no WebSocket endpoint at {path[:200]}")
        return Response.text(404, f"not found: {path[:200]}")

    async def _presence_endpoint(self, request: Request) -> Response:
        """``GET /api/presence/<stream>`` (the stream URL-encoded), behind the broadcast
        key: the stream's presence as :meth:`presence` returns it."""
        if request.method not in ("GET", "HEAD"):
            return Response.text(405, "use GET", [("allow", "GET")])
        if not bearer_ok(request.headers.get("authorization"), self.config.effective_broadcast_key):
            return Response.text(
                401, "missing or wrong broadcast key", [("www-authenticate", "Bearer")]
            )
        stream = urllib.parse.unquote(request.path[len(PRESENCE_PATH) :])
        if not cable.is_stream_name(stream):
            return Response.text(400, "no stream name")
        try:
            info = await self.presence(stream, records=request.query.get("records") != "false")
        except Exception:
            log.exception("presence of %r failed", stream[:200])
            return Response.json(503, cable.presence_info(0, error=True))
        return Response.json(200, info)

    # -- what sessions ask of their node (session.SessionNode) ----------------------------

    def attach(self, client: Session | EchoSession) -> None:
        """Count an open connection (its transport is ready)."""
        self.connections.add(client)
        if isinstance(client, Session):
            self._sessions[client.sid] = client
        self.metrics.connections_total += 1
        by_address = self.connections_by_address
        by_address[client.ip] = by_address.get(client.ip, 0) + 1

    def detach(self, client: Session | EchoSession) -> None:
        """Forget a connection that has ended."""
        if client not in self.connections:
            return
        self.connections.discard(client)
        self.metrics.disconnects_total += 1
        by_address = self.connections_by_address
        left = by_address.get(client.ip, 1) - 1
        if left > 0:
            by_address[client.ip] = left
        else:
            by_address.pop(client.ip, None)
        if isinstance(client, Session):
            self._sessions.pop(client.sid, None)
            self._dirty.discard(client)  # it saves itself on its way out
            group = self._ping_groups.get(client.ping_interval)
            if group is not None:
                group.discard(client)
                if not group:
                    del self._ping_groups[client.ping_interval]

    def lookup_channel(self, name: str) -> type[Channel] | None:
        """The channel class clients reach with ``"channel": name``."""
        return self.channel_executor.lookup(name)

    def start_pinging(self, session: Session) -> None:
        """Add a welcomed *session* to the shared ping ticker (honouring ``?pi=<seconds>``,
        rounded to whole seconds: every distinct interval is a group the ticker walks, so
        clients must not be able to make more than a few hundred)."""
        interval = self.config.ping_interval
        requested = session.request.query.get("pi") if session.request is not None else None
        if requested:
            try:
                value = float(requested)
            except ValueError:
                value = math.nan
            if 1 <= value <= 300:
                interval = float(round(value))
        session.ping_interval = interval
        session.last_pong = trio.current_time()
        self._ping_groups.setdefault(interval, set()).add(session)
        self._ping_rounds.joined(interval, session)
        if session.extended:
            # A first ping right after the welcome tells the client the server's clock: a
            # client that loses the connection before the ticker's first ping, with nothing
            # received yet on some stream, still has a ``since`` to ask that stream's history
            # with.  Without it, messages published while it was away were lost for good.
            fmt = session.format
            session.send_ping(fmt.frame(fmt.codec.encode(cable.ping(int(time.time())))))

    async def _housekeeper(self) -> None:
        """Pings, pong deadlines, session saves and message timeouts, a slice at a time.

        Every _SLICE seconds: the members of each ping group due by then (see
        housekeeping.PingRounds: each is pinged once per interval, and no slice does more than
        its share of a round), at most _SAVES_PER_SLICE changed sessions saved, and once a
        second the unfinished messages checked.  Connections with nothing due cost nothing."""
        rounds = self._ping_rounds
        pong_timeout = self.config.pong_timeout
        frames: dict[WireFormat, bytes] = {}  # this second's ping, per format
        frames_second = -1
        message = cable.ping(0)
        next_partial_check = 0.0
        while True:
            await trio.sleep(_SLICE)
            self.gc_control.tick()
            now = trio.current_time()
            if now >= next_partial_check:
                next_partial_check = now + 1.0
                for transport in self._websocket.partial.expired(now):
                    transport.message_timeout()
            second = int(time.time())
            if second != frames_second:
                frames_second = second
                frames.clear()
                message = cable.ping(second)
            for interval, session in rounds.due(self._ping_groups, now):
                if not session.is_open:
                    continue
                if (
                    pong_timeout
                    and session.extended
                    and session.format.commands
                    and now - session.last_pong > interval + pong_timeout
                ):
                    session.close(DisconnectReason.NO_PONG, reconnect=True)
                    continue
                fmt = session.format
                frame = frames.get(fmt)
                if frame is None:
                    frame = frames[fmt] = fmt.frame(fmt.codec.encode(message))
                session.send_ping(frame)
            dirty = self._dirty
            for _ in range(min(len(dirty), _SAVES_PER_SLICE)):
                await dirty.pop().save_session()

    async def _lag_monitor(self) -> None:
        # How late does a short timer fire?  That is how long every ready task waits for the
        # CPU; it drives adaptive admission and the loop-lag histogram.
        window_start = trio.current_time()
        worst = 0.0
        while True:
            before = trio.current_time()
            await trio.sleep(_LAG_PROBE)
            now = trio.current_time()
            lag = max(0.0, now - before - _LAG_PROBE)
            self.metrics.observe("loop_lag_seconds", lag)
            worst = max(worst, lag)
            if now - window_start >= 1.0:
                if self.config.adaptive_admission:
                    before_decreases = self.adaptive.decreases
                    self.adaptive.observe(worst, now)
                    if self.adaptive.decreases != before_decreases:
                        self.metrics.admission_decreases_total += 1
                        log.warning(
                            "event loop lag %.0f ms > %.0f ms: admitting %.0f handshakes/s, "
                            "%d callbacks at once",
                            worst * 1000,
                            self.config.lag_target * 1000,
                            self.handshake_bucket.rate,
                            self.callback_limiter.total_tokens,
                        )
                window_start, worst = now, 0.0

    def session_changed(self, session: Session) -> None:
        """*session* changed (subscribed, unsubscribed): the housekeeper saves it soon."""
        self._dirty.add(session)

    async def take_over(self, sid: str) -> None:
        """See :meth:`SessionNode.take_over`: every node ends its connection of *sid*."""
        await self.broker.publish_command({"command": "session_taken", "sid": sid})

    # -- broadcasts from the broker ------------------------------------------------------

    def _deliver(self, broadcast: Broadcast) -> Any:
        """Every broadcast reaching this node: presence events pass the coalescer."""
        if broadcast.kind != PRESENCE:
            return self.hub.deliver(broadcast)
        try:
            event = json.loads(broadcast.data)
        except (TypeError, ValueError):
            log.info("ignoring a malformed presence event on %r", broadcast.stream[:200])
            return None
        if not isinstance(event, dict):
            return None
        if not self.hub.subscribers(broadcast.stream):
            return None  # nobody here to tell
        coalescer = self.presence_coalescer
        if coalescer.offer(broadcast.stream, event, trio.current_time()):
            self.metrics.presence_events_total += 1
            return self.hub.deliver(broadcast)
        self._presence_wakeup.set()
        return None

    async def _presence_flusher(self) -> None:
        """Send the net presence events of each window as it ends."""
        coalescer = self.presence_coalescer
        metrics = self.metrics
        while True:
            deadline = coalescer.next_deadline
            if deadline is None:
                await self._presence_wakeup.wait()
                self._presence_wakeup = trio.Event()
                continue
            await trio.sleep_until(deadline)
            for stream, events in coalescer.due(trio.current_time()):
                for event in events:
                    metrics.presence_events_total += 1
                    self.hub.deliver(Broadcast(stream, json.dumps(event), kind=PRESENCE))
            metrics.presence_events_coalesced_total = coalescer.coalesced

    def _on_command(self, command: dict[str, Any]) -> None:
        """A node command from the broker (any node may have sent it)."""
        name = command.get("command")
        if name == "disconnect":
            self.disconnect_local(
                command.get("identifiers") or {}, reconnect=bool(command.get("reconnect"))
            )
        elif name == "load":
            if self.rebalancer is not None:
                self.rebalancer.on_load(command)
        elif name == "session_taken":
            session = self._sessions.get(str(command.get("sid")))
            if session is not None and session.is_open:
                # Restored by another connection: this one is stale (or the sid leaked).
                log.info("%r: its session was restored by another connection", session)
                session.close(DisconnectReason.REMOTE, reconnect=False)
        else:
            log.info("ignoring unknown node command %r", str(command.get("command"))[:100])

    # -- public API ----------------------------------------------------------------------

    async def broadcast(self, stream: str, data: Any, *, exclude_socket: str | None = None) -> None:
        """Broadcast *data* (any JSON value) to every subscriber of *stream*, on every node.
        Raises ``ValueError`` for a stream name no broker can carry (a lone surrogate)."""
        if not cable.is_stream_name(stream):
            raise ValueError(f"not a usable stream name: {stream[:100]!r}")
        await self.broker.publish(stream, json.dumps(data), exclude_socket)

    async def presence(self, stream: str, *, records: bool = True) -> dict[str, Any]:
        """The presence of *stream*, on every node: ``{"type": "info", "total": n,
        "records": [{"info": ..., "id": ...}, ...]}`` (no ``records`` when there are none,
        or with ``records=False``)."""
        total, found = await self.broker.presence_info(stream)
        return cable.presence_info(total, found if records else None)

    async def remote_disconnect(
        self, identifiers: dict[str, Any], *, reconnect: bool = False
    ) -> None:
        """Disconnect every connection (on every node) whose identifiers equal *identifiers*,
        with ``reason: "remote"``."""
        await self.broker.publish_command(
            {"command": "disconnect", "identifiers": identifiers, "reconnect": reconnect}
        )

    def disconnect_local(self, identifiers: dict[str, Any], *, reconnect: bool = False) -> int:
        """Disconnect this node's connections identified by *identifiers*; return how many."""
        if not identifiers:
            return 0
        count = 0
        for conn in list(self.connections):
            if conn.identifiers == identifiers and conn.is_open:
                conn.close(DisconnectReason.REMOTE, reconnect=reconnect, code=CloseCode.NORMAL)
                count += 1
        self.metrics.remote_disconnects_total += count
        return count

    async def drain(self, period: float | None = None) -> None:
        """Slow-drain: refuse new connections (503 + Retry-After, ``/health`` 503), then
        disconnect clients with ``server_restart`` and reconnect advice, spread over *period*
        seconds (default ``--drain-period``); return when all are gone or
        ``--shutdown-timeout`` has passed (the rest are cut)."""
        started = trio.current_time()
        await self.drainer.drain(period)
        # What the executor still owes the application (RPC disconnect calls, paced), within
        # what is left of the shutdown timeout.
        left = self.config.shutdown_timeout - (trio.current_time() - started)
        with trio.move_on_after(max(0.0, left)):
            await self.executor.flush()

    def drain_now(self) -> None:
        """Make a drain in progress disconnect everybody at once (a second signal)."""
        self.drainer.hurry()

    async def _dashboard(self, request: Request) -> Response:
        """``/_dashboard``: the page and its files for anyone (they hold no data), the data
        only with the key; all of it 404 unless ``--dashboard``.  Under ``--workers`` the data
        is the whole server's, with each worker's beside it."""
        if not self.config.dashboard:
            return Response.text(404, "not found")
        if request.method not in ("GET", "HEAD"):
            return Response.text(405, "use GET", [("allow", "GET")])
        subpath = request.path.removeprefix("/_dashboard")
        if subpath == "/data":
            key = self.config.effective_dashboard_key
            if not key or not bearer_ok(request.headers.get("authorization"), key):
                return Response.text(
                    401, "missing or wrong dashboard key", [("www-authenticate", "Bearer")]
                )
            if self.group is None:
                return Response.json(200, self.dashboard_data())
            return Response.json(200, await self.group.dashboard())
        found = dashboard.asset(subpath)
        if found is None:
            return Response.text(404, "not found")
        body, content_type = found
        return Response(200, body, content_type)

    def dashboard_data(self) -> dict[str, Any]:
        """This node's figures for the dashboard (see :func:`dashboard.snapshot`)."""
        broker = self.broker
        connected = getattr(broker, "connected", None)
        return dashboard.snapshot(
            self.metrics,
            node=self.label,
            draining=self.draining,
            broker_kind=type(broker).__name__,
            broker_connected=connected if isinstance(connected, bool) else None,
        )

    def health(self) -> dict[str, Any]:
        """The ``/health`` document."""
        return {
            "status": "draining" if self.draining else "ok",
            "connections": len(self.connections),
            "streams": len(self.hub),
            "uptime": round(time.time() - self.started_at, 3),
            "speedups": SPEEDUPS,
        }


def _read_stat(stats: dict[str, Any], key: str) -> float:
    return float(stats.get(key, 0))


def _tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, or None without ``--tls-cert``."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert/tls_key: cannot load: {exc}") from None
    context.set_alpn_protocols(["http/1.1"])
    return context


def _tune_socket(sock: socket.socket) -> None:
    """Per-connection TCP options: no Nagle delay for small frames, and keepalive plus a user
    timeout so that half-open connections (a client that vanished without a FIN) are found
    and closed by the kernel instead of holding their memory for ever."""
    with contextlib.suppress(OSError, AttributeError):  # not every platform has each one
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


def _format_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    return str(addr)
