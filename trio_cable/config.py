"""Server settings, from defaults, an optional TOML file, ``TRIO_CABLE_*`` variables and flags.

Every setting is declared once, in :data:`SETTINGS`; the command line (``cli.py``), the
environment-variable names and the README's table are all derived from that list, so they
cannot drift apart.  Precedence, lowest first: defaults, TOML file, environment, flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import hmac
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ENV_PREFIX = "TRIO_CABLE_"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names the setting.

    ``setting`` is the :class:`Config` field that is wrong (None when the error is not about
    one field) and ``detail`` what is wrong with it, so that :func:`load_config` can name the
    place the value came from (``--port``, ``TRIO_CABLE_PORT`` or ``cable.toml: port``).
    """

    def __init__(self, message: str, *, setting: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.setting = setting
        self.detail = detail or message


def _bad(setting: str, detail: str) -> ConfigError:
    """A :class:`ConfigError` about *setting*, worded ``"<setting>: <detail>"``."""
    return ConfigError(f"{setting}: {detail}", setting=setting, detail=detail)


#: The ways anycable-rails publications reach the nodes through Redis (``broadcast_adapter``).
BROADCAST_ADAPTERS = ("redis", "redisx")

#: HMAC-SHA256 keys shorter than this are weaker than the hash (RFC 7518 3.2; PyJWT warns).
MIN_SECRET_BYTES = 32


@dataclass
class Config:
    """All settings of one trio_cable server.  See :data:`SETTINGS` for what each one means."""

    host: str = "127.0.0.1"
    port: int = 8080
    path: list[str] = field(default_factory=lambda: ["/cable"])
    secret: str | None = None
    streams_secret: str | None = None
    jwt_secret: str | None = None
    jwt_param: str = "jid"
    enforce_jwt: bool = False
    public_streams: bool = False
    streams_whisper: bool = False
    presence_ttl: float = 15.0
    presence_window: float = 0.1
    broadcast_key: str | None = None
    allowed_origins: list[str] = field(default_factory=list)
    ping_interval: float = 3.0
    max_message_size: int = 1024 * 1024
    channels: str | None = None
    benchmark_channel: bool = False
    broker: str = "memory"
    # Worker processes on one port (SO_REUSEPORT) under a supervisor; "auto" is one per core.
    workers: int = 1
    redis_url: str = "redis://localhost:6379/0"
    # How anycable-rails publications come in through Redis (AnyCable's names and defaults).
    broadcast_adapter: str = "redis"
    redis_channel: str = "__anycable__"
    redisx_group: str = "bx"
    log_level: str = "info"
    handshake_timeout: float = 10.0
    close_timeout: float = 3.0
    max_send_queue: int = 4 * 1024 * 1024
    callback_concurrency: int = 64
    echo_path: str | None = None
    # Fallback transports (SSE, long polling): paths (empty: off) and the long poll's timers.
    sse_path: str | None = "/events"
    poll_path: str | None = "/lp"
    poll_interval: float = 15.0
    poll_keepalive_timeout: float = 10.0
    # Avalanche safety (slow drain, advice, admission, per-connection limits, resume, history).
    drain_period: float = 10.0
    drain_rate: float = 0.0
    shutdown_timeout: float = 30.0
    reconnect_advice: float = 5.0
    max_connections: int = 0
    handshake_rate: float = 1000.0
    # Sockets waiting for their HTTP request cost memory, not CPU: the cap is the default
    # handshake_rate x handshake_timeout (512 refused slow-network clients at 1,000/s).
    max_pending_handshakes: int = 10_000
    adaptive_admission: bool = True
    lag_target: float = 0.1
    max_subscriptions: int = 100
    command_rate: float = 100.0
    pong_timeout: float = 0.0
    sessions_ttl: float = 300.0
    history_limit: int = 100
    history_ttl: float = 300.0
    # Hardening.
    tls_cert: str | None = None
    tls_key: str | None = None
    max_connections_per_address: int = 0
    # Memory bounds: what clients and publishers can make the server keep.
    session_max_size: int = 64 * 1024
    sessions_max_memory: int = 64 * 1024 * 1024
    history_max_size: int = 1024 * 1024
    history_max_memory: int = 256 * 1024 * 1024
    message_timeout: float = 30.0
    partial_messages_max_memory: int = 64 * 1024 * 1024
    # permessage-deflate (RFC 7692), off until asked for.
    compression: bool = False
    compression_threshold: int = 1024
    compression_level: int = 1
    # Rebalancing across nodes (off by default).
    rebalance: bool = False
    rebalance_tolerance: float = 0.15
    rebalance_rate: float = 20.0
    # The live dashboard at /_dashboard (off by default).
    dashboard: bool = False
    dashboard_key: str | None = None
    # AnyCable HTTP RPC: the application answers connect, commands and disconnect over HTTP.
    rpc_host: str | None = None
    rpc_secret: str | None = None
    rpc_headers: list[str] = field(default_factory=lambda: ["cookie"])
    rpc_concurrency: int = 28
    rpc_min_concurrency: int = 1
    rpc_max_concurrency: int = 128
    rpc_timeout: float = 3.0
    rpc_command_timeout: float = 10.0
    rpc_retries: int = 3
    rpc_disconnect_rate: float = 100.0
    rpc_breaker_cooldown: float = 5.0

    def __repr__(self) -> str:
        # Secrets never reach a log line, even when a whole Config is logged.
        parts = []
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if setting.secret and value:
                value = "***"
            parts.append(f"{setting.name}={value!r}")
        return f"Config({', '.join(parts)})"

    # Derived secrets: the specific secret wins, the shared --secret is the fallback.
    @property
    def effective_streams_secret(self) -> str | None:
        """Secret for signed stream names: ``streams_secret``, else ``secret``."""
        return self.streams_secret or self.secret

    @property
    def effective_jwt_secret(self) -> str | None:
        """Secret for JWT identification: ``jwt_secret``, else ``secret``."""
        return self.jwt_secret or self.secret

    @property
    def effective_dashboard_key(self) -> str | None:
        """Key for the dashboard's data: ``dashboard_key``, else the broadcast key."""
        return self.dashboard_key or self.effective_broadcast_key

    @property
    def effective_broadcast_key(self) -> str | None:
        """Bearer key for ``POST /_broadcast``: ``broadcast_key``, else ``secret``."""
        return self.broadcast_key or self.secret

    @property
    def effective_rpc_secret(self) -> str | None:
        """Bearer key for RPC calls: ``rpc_secret``, else derived from ``secret`` as
        anycable-go derives it (``hex(HMAC-SHA256(secret, "rpc-cable"))``)."""
        if self.rpc_secret:
            return self.rpc_secret
        if self.secret:
            return hmac.new(self.secret.encode(), b"rpc-cable", hashlib.sha256).hexdigest()
        return None

    def validate(self) -> Config:
        """Check every setting's range and the settings' consistency; return self so it chains.

        Raises :class:`ConfigError` naming the setting.  Floats must be finite everywhere
        (``nan`` compares false with every bound, so it would slip through the range checks).
        """
        for setting in SETTINGS:
            value = getattr(self, setting.name)
            if setting.kind == "float" and not math.isfinite(value):
                raise _bad(setting.name, f"must be a finite number, not {value!r}")
        if not 0 <= self.port <= 65535:
            raise _bad("port", f"{self.port} is not a TCP port (0-65535)")
        for p in self.path:
            if not p.startswith("/"):
                raise _bad("path", f"{p!r} must start with '/'")
        for name in ("echo_path", "sse_path", "poll_path"):
            value = getattr(self, name)
            if value and not value.startswith("/"):
                raise _bad(name, f"{value!r} must start with '/'")
        endpoints = [p for p in (*self.path, self.echo_path, self.sse_path, self.poll_path) if p]
        if len(set(endpoints)) != len(endpoints):
            raise _bad("path", f"endpoint paths must differ: {', '.join(endpoints)}")
        for name, low, meaning in _LOWER_BOUNDS:
            value = getattr(self, name)
            if not (value > low if meaning == ">" else value >= low):
                raise _bad(name, f"must be {meaning} {low:g}, not {value:g}")
        if self.compression_level > 9:
            raise _bad("compression_level", f"must be <= 9, not {self.compression_level}")
        if self.broker not in ("memory", "redis"):
            raise _bad("broker", f"unknown broker {self.broker!r} (known: memory, redis)")
        if self.workers > 1 and self.broker != "redis":
            raise _bad(
                "workers",
                f"{self.workers} workers need --broker redis (workers share broadcasts, "
                f"history and sessions through it; broker is {self.broker!r})",
            )
        if self.broadcast_adapter not in BROADCAST_ADAPTERS:
            known = ", ".join(BROADCAST_ADAPTERS)
            raise _bad(
                "broadcast_adapter", f"unknown adapter {self.broadcast_adapter!r} (known: {known})"
            )
        if self.broadcast_adapter == "redisx" and self.broker != "redis":
            raise _bad("broadcast_adapter", "redisx reads a Redis stream: it needs --broker redis")
        if not self.redis_channel or not self.redisx_group:
            raise _bad("redis_channel" if not self.redis_channel else "redisx_group",
                       "must not be empty")  # fmt: skip
        if self.enforce_jwt and not self.effective_jwt_secret:
            raise _bad("enforce_jwt", "needs a JWT secret: jwt_secret (or secret)")
        if not self.drain_rate and self.drain_period > self.shutdown_timeout:
            raise _bad(
                "drain_period",
                f"{self.drain_period:g} s must not exceed shutdown_timeout "
                f"({self.shutdown_timeout:g} s): the drain would be cut short",
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise _bad(given, f"needs {missing} too (the two go together)")
        if self.rpc_host is not None and not self.rpc_host.startswith(("http://", "https://")):
            raise _bad("rpc_host", f"{self.rpc_host!r} must be an http:// or https:// URL")
        if self.rpc_min_concurrency > self.rpc_concurrency:
            raise _bad(
                "rpc_min_concurrency",
                f"{self.rpc_min_concurrency} is above rpc_concurrency ({self.rpc_concurrency})",
            )
        if self.rpc_max_concurrency < self.rpc_concurrency:
            raise _bad(
                "rpc_max_concurrency",
                f"{self.rpc_max_concurrency} is below rpc_concurrency ({self.rpc_concurrency})",
            )
        if self.rpc_command_timeout < self.rpc_timeout:
            raise _bad(
                "rpc_command_timeout",
                f"{self.rpc_command_timeout:g} s is shorter than one call (rpc_timeout "
                f"{self.rpc_timeout:g} s)",
            )
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise _bad(
                "log_level",
                f"unknown level {self.log_level!r} (debug, info, warning, error, critical)",
            )
        return self

    def short_secrets(self) -> list[str]:
        """Names of the configured HMAC secrets (``secret``, ``streams_secret``,
        ``jwt_secret``) shorter than :data:`MIN_SECRET_BYTES` bytes: keys a brute force can
        reach, for a start-up warning."""
        return [
            name
            for name in ("secret", "streams_secret", "jwt_secret")
            if (value := getattr(self, name)) and len(value.encode()) < MIN_SECRET_BYTES
        ]


@dataclass(frozen=True)
class Setting:
    """Documentation and parsing rules of one :class:`Config` field."""

    name: str
    help: str
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def kind(self) -> str:
        """One of ``str``, ``int``, ``float``, ``bool``, ``list``, ``optstr``."""
        return _KINDS[self.name]

    @property
    def default(self) -> Any:
        return getattr(Config(), self.name)


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "address to listen on"),
    Setting("port", "TCP port to listen on (0 picks a free one)"),
    Setting("path", "WebSocket endpoint path(s), comma separated"),
    Setting("secret", "shared secret: fallback for streams, JWT and broadcast key", secret=True),
    Setting("streams_secret", "secret for signed stream names", secret=True),
    Setting("jwt_secret", "secret for JWT identification (HS256/384/512)", secret=True),
    Setting("jwt_param", "query parameter that carries the JWT"),
    Setting("enforce_jwt", "refuse connections without a valid JWT"),
    Setting("public_streams", "allow $pubsub subscriptions to unsigned stream_name"),
    Setting("streams_whisper", "let subscribers of signed streams whisper (public ones may)"),
    Setting("presence_ttl", "seconds a disconnected session stays present (0: leaves at once)"),
    Setting("presence_window", "seconds a stream's presence events are coalesced (0: off)"),
    Setting("broadcast_key", "bearer key required by POST /_broadcast", secret=True),
    Setting("allowed_origins", "allowed Origin hosts, comma separated, '*' prefix wildcard"),
    Setting("ping_interval", "seconds between pings (a client may ask ?pi=N)"),
    Setting("max_message_size", "largest client message in bytes (close 1009 beyond)"),
    Setting("channels", "module:attribute naming the application's channels"),
    Setting("benchmark_channel", "enable the built-in BenchmarkChannel"),
    Setting("broker", "broker for broadcasts, history and sessions: memory or redis"),
    Setting("workers", "worker processes on one port, 'auto': one per core (> 1 needs redis)"),
    Setting("redis_url", "Redis server for --broker redis", secret=True),
    Setting(
        "broadcast_adapter",
        "how anycable-rails publications arrive (--broker redis): redis (PUBLISH to "
        "--redis-channel; every node delivers, no history) or redisx (XADD to the stream "
        "--redis-channel; one node takes each and publishes it with history)",
    ),
    Setting("redis_channel", "pub/sub channel (redis) or stream (redisx) of publications"),
    Setting("redisx_group", "redisx: the consumer group the nodes share"),
    Setting("log_level", "debug, info, warning, error"),
    Setting("handshake_timeout", "seconds a client has to finish its HTTP request"),
    Setting("close_timeout", "seconds to wait for the client's close frame"),
    Setting("max_send_queue", "bytes queued for a slow client before too_slow"),
    Setting("callback_concurrency", "application callbacks running at once, server-wide"),
    Setting("echo_path", "path of a raw WebSocket echo endpoint (testing only)"),
    Setting("sse_path", "Server-Sent Events endpoint path (empty: off)"),
    Setting("poll_path", "long-polling endpoint path (empty: off)"),
    Setting("poll_interval", "seconds a long poll waits for messages before answering empty"),
    Setting("poll_keepalive_timeout", "seconds a long-polling session lives without a poll"),
    Setting("drain_period", "seconds over which a drain spreads its disconnects (0: at once)"),
    Setting("drain_rate", "most disconnects per second during a drain (0: no cap)"),
    Setting("shutdown_timeout", "longest a drain may take before the rest are cut"),
    Setting("reconnect_advice", "window (s) over which reconnect/Retry-After advice is jittered"),
    Setting("max_connections", "open connections at most (0: from the open-file limit)"),
    Setting("handshake_rate", "new WebSocket connections per second (0: unlimited)"),
    Setting("max_pending_handshakes", "connections allowed in their HTTP handshake at once"),
    Setting("adaptive_admission", "shrink handshake rate and callback concurrency under lag"),
    Setting("lag_target", "event-loop lag (s) above which adaptive admission backs off"),
    Setting("max_subscriptions", "subscriptions per connection (0: unlimited)"),
    Setting("command_rate", "commands per second per connection, burst 2x (0: unlimited)"),
    Setting("pong_timeout", "seconds to wait for a pong on ext protocols (0: off)"),
    Setting("sessions_ttl", "seconds a disconnected session stays resumable"),
    Setting("history_limit", "messages kept per stream (0: no history)"),
    Setting("history_ttl", "seconds a stream's messages are kept"),
    Setting("tls_cert", "PEM certificate chain: serve wss:// and https://"),
    Setting("tls_key", "PEM private key for --tls-cert"),
    Setting("max_connections_per_address", "open connections per client IP (0: no cap)"),
    Setting("session_max_size", "largest resumable session in bytes (larger ones are not kept)"),
    Setting("sessions_max_memory", "memory broker: bytes of sessions kept (oldest evicted)"),
    Setting("history_max_size", "bytes of history kept per stream (oldest messages dropped)"),
    Setting("history_max_memory", "memory broker: bytes of history kept (idlest streams evicted)"),
    Setting("message_timeout", "seconds a message may take from its first byte to its last"),
    Setting(
        "partial_messages_max_memory", "bytes all unfinished client messages may hold together"
    ),
    Setting("compression", "negotiate permessage-deflate with clients that offer it"),
    Setting("compression_threshold", "messages shorter than this many bytes go uncompressed"),
    Setting("compression_level", "zlib level 1 (fastest) .. 9 (smallest)"),
    Setting("rebalance", "hand connections over the cluster mean on to other nodes"),
    Setting("rebalance_tolerance", "share over the mean before a node hands on (0.15: 15 pct)"),
    Setting("rebalance_rate", "most rebalancing disconnects per second per node"),
    Setting("dashboard", "serve the live dashboard at /_dashboard"),
    Setting(
        "dashboard_key", "key the dashboard asks for (default: the broadcast key)", secret=True
    ),
    Setting("rpc_host", "AnyCable HTTP RPC application, http(s)://host/base (off: in-process)"),
    Setting("rpc_secret", "bearer key for RPC calls (default: derived from secret)", secret=True),
    Setting("rpc_headers", "request headers passed to the RPC application, comma separated"),
    Setting("rpc_concurrency", "RPC calls in flight at first (the adaptive limit starts here)"),
    Setting(
        "rpc_min_concurrency",
        "RPC calls in flight the adaptive limit never goes below "
        "(= rpc_concurrency = rpc_max_concurrency: a fixed limit)",
    ),
    Setting("rpc_max_concurrency", "RPC calls in flight at most (the adaptive limit's ceiling)"),
    Setting("rpc_timeout", "seconds one RPC request may take"),
    Setting("rpc_command_timeout", "seconds a command may wait for its RPC answer, all retries"),
    Setting("rpc_retries", "retries of an RPC call never applied (transport error, 429, 503)"),
    Setting("rpc_disconnect_rate", "disconnect RPC calls per second at most (0: no cap)"),
    Setting("rpc_breaker_cooldown", "seconds a tripped RPC circuit breaker refuses before a probe"),
)

_KINDS: dict[str, str] = {}
for _f in dataclasses.fields(Config):
    _t = str(_f.type)
    if _t.startswith("list"):
        _KINDS[_f.name] = "list"
    elif "None" in _t:
        _KINDS[_f.name] = "optstr"
    else:
        _KINDS[_f.name] = _t
assert set(_KINDS) == {s.name for s in SETTINGS}, "every Config field needs a Setting"

#: (setting, bound, ">" or ">="): the range of every numeric setting with a lower bound.
#: Zero is allowed where the README gives it a meaning ("0: off", "0: unlimited", "0: at once").
_LOWER_BOUNDS: tuple[tuple[str, float, str], ...] = (
    ("ping_interval", 0, ">"),
    ("max_message_size", 125, ">="),
    ("handshake_timeout", 0, ">"),
    ("close_timeout", 0, ">="),
    ("max_send_queue", 1, ">="),
    ("callback_concurrency", 1, ">="),
    ("workers", 1, ">="),
    ("drain_period", 0, ">="),
    ("drain_rate", 0, ">="),
    ("shutdown_timeout", 0, ">="),
    ("reconnect_advice", 0, ">="),
    ("poll_interval", 0, ">"),
    ("poll_keepalive_timeout", 0, ">"),
    ("max_connections", 0, ">="),
    ("handshake_rate", 0, ">="),
    ("max_pending_handshakes", 1, ">="),
    ("lag_target", 0, ">"),
    ("max_subscriptions", 0, ">="),
    ("command_rate", 0, ">="),
    ("pong_timeout", 0, ">="),
    ("sessions_ttl", 0, ">="),
    ("presence_ttl", 0, ">="),
    ("presence_window", 0, ">="),
    ("history_limit", 0, ">="),
    ("history_ttl", 0, ">="),
    ("max_connections_per_address", 0, ">="),
    ("session_max_size", 1024, ">="),
    ("sessions_max_memory", 1024, ">="),
    ("history_max_size", 1024, ">="),
    ("history_max_memory", 1024, ">="),
    ("message_timeout", 0, ">"),
    ("partial_messages_max_memory", 1024, ">="),
    ("compression_threshold", 0, ">="),
    ("compression_level", 1, ">="),
    ("rebalance_tolerance", 0, ">"),
    ("rebalance_rate", 0, ">"),
    ("rpc_concurrency", 1, ">="),
    ("rpc_min_concurrency", 1, ">="),
    ("rpc_max_concurrency", 1, ">="),
    ("rpc_timeout", 0, ">"),
    ("rpc_command_timeout", 0, ">"),
    ("rpc_retries", 0, ">="),
    ("rpc_disconnect_rate", 0, ">="),
    ("rpc_breaker_cooldown", 0, ">"),
)
assert {name for name, _, _ in _LOWER_BOUNDS} == {
    s.name for s in SETTINGS if s.kind in ("int", "float") and s.name != "port"
}, "every numeric setting needs a range"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


#: Settings that also accept the word ``auto``: what it stands for.
_AUTO: dict[str, Callable[[], Any]] = {"workers": lambda: os.cpu_count() or 1}


def parse_value(setting: Setting, raw: Any, source: str | None = None) -> Any:
    """Turn a raw value (a string from the environment or a flag, or a TOML value) into the
    field's type; raise :class:`ConfigError` naming *source* (where the value came from,
    e.g. ``--port``; default: the setting's name) when that is impossible."""
    auto = _AUTO.get(setting.name)
    if auto is not None and isinstance(raw, str) and raw.strip().lower() == "auto":
        return auto()
    try:
        return _parse(setting.kind, raw)
    except ValueError as exc:
        raise ConfigError(
            f"{source or setting.name}: {exc}", setting=setting.name, detail=str(exc)
        ) from None


def _parse(kind: str, raw: Any) -> Any:
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{raw!r} is not a boolean (1/true/yes/on or 0/false/no/off)")
    if kind == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ValueError(f"{raw!r} is not an integer")
    if kind == "float":
        value: float
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise ValueError(f"{raw!r} is not a number") from None
        else:
            raise ValueError(f"{raw!r} is not a number")
        if not math.isfinite(value):
            raise ValueError(f"{raw!r} is not a finite number")
        return value
    if kind == "list":
        if isinstance(raw, str):
            return [part.strip() for part in raw.split(",") if part.strip()]
        if isinstance(raw, Sequence) and all(isinstance(part, str) for part in raw):
            return list(raw)
        raise ValueError(f"{raw!r} is not a list of strings")
    if isinstance(raw, (dict, list, tuple)):
        raise ValueError(f"{raw!r} is not a string")
    if kind == "optstr":
        return None if raw is None or raw == "" else str(raw)
    return str(raw)


def load_config(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    toml_path: str | None = None,
) -> Config:
    """Build a :class:`Config`: defaults, then the TOML file, then ``TRIO_CABLE_*`` variables
    of *environ* (default ``os.environ``), then *flags* (setting name -> raw value; ``None``
    means "not given").  A :class:`ConfigError` names where the bad value came from:
    ``--port``, ``TRIO_CABLE_PORT`` or ``cable.toml: port``."""
    return load_config_and_sources(flags, environ, toml_path)[0]


def load_config_and_sources(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    toml_path: str | None = None,
) -> tuple[Config, dict[str, str]]:
    """:func:`load_config`, and where each setting that is not a default came from (setting
    name -> ``--flag``, ``TRIO_CABLE_NAME`` or ``file: key``), for messages."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    by_name = {s.name: s for s in SETTINGS}
    if toml_path:
        for key, raw in _read_toml(toml_path).items():
            name = key.replace("-", "_")
            if name not in by_name:
                raise ConfigError(f"{toml_path}: unknown setting {key!r}{_did_you_mean(name)}")
            sources[name] = f"{toml_path}: {key}"
            values[name] = parse_value(by_name[name], raw, sources[name])
    for setting in SETTINGS:
        if setting.env in environ:
            sources[setting.name] = setting.env
            values[setting.name] = parse_value(setting, environ[setting.env], setting.env)
    for name, raw in (flags or {}).items():
        if raw is not None:
            sources[name] = by_name[name].flag
            values[name] = parse_value(by_name[name], raw, sources[name])
    try:
        config = Config(**values).validate()
    except ConfigError as exc:
        if exc.setting in sources:
            raise ConfigError(
                f"{sources[exc.setting]}: {exc.detail}", setting=exc.setting, detail=exc.detail
            ) from None
        raise
    return config, sources


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            table = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    inner = table.get("trio_cable", table)
    if not isinstance(inner, dict):
        raise ConfigError(f"{path}: trio_cable must be a table")
    return inner


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, [s.name for s in SETTINGS], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
