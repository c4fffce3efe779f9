"""The Redis broker: several nodes share broadcasts, stream history and sessions.

Built on coredis 6.9 (pinned: its Trio support comes through anyio, and the behaviours
below were verified against exactly that version).

Layout in Redis (``prefix`` defaults to ``trio_cable``):

``<prefix>:m:{<stream>}``  hash ``e`` (epoch), ``n`` (last offset), ``r`` (the replication
                         id of the primary that wrote it); lives ``max(history_ttl, 1 day)``
                         after the last publication, so offsets keep counting across quiet
                         periods like the in-memory broker's do.
``<prefix>:h:{<stream>}``  Redis Stream of the last messages: fields ``o`` (offset) and ``d``
                         (the data as JSON); ``XADD MAXLEN ~ history_limit`` plus
                         ``PEXPIRE history_ttl``.  The entry id's milliseconds are the
                         publication time (Redis' clock).
``<prefix>:s:<sid>``     a resumable session (JSON), ``SET PX ttl``, taken with ``GETDEL``.
``<prefix>:pubsub``      the one channel every node subscribes to: broadcasts (with their
                         stream position) and node commands, in publication order.
``<prefix>:ping:<node>`` per-node channel for heartbeats and read barriers.
``<prefix>:ps:<stream>`` presence: hash sid -> presence id (one record per session).
``<prefix>:ph:<stream>`` presence: hash presence id -> sessions holding it.
``<prefix>:pi:<stream>`` presence: hash presence id -> info JSON ("" for none).
``<prefix>:pexp``        presence: zset of lingering records (``<sid>\n<stream>``), scored by
                         the deadline (unix ms); every node sweeps it.
``<prefix>:workers:<group>``  hash of the metrics snapshots of one supervisor's workers
                         (``trio-cable serve --workers N``): a field per live worker, plus
                         ``retired`` (the counters of workers that left) and
                         ``gone:<worker>`` markers; expires when no worker writes any more.
``__anycable__``         publications of anycable-rails apps: a pub/sub channel (``redis``
                         adapter) or a Redis Stream read by the group ``bx`` (``redisx``).

The stream name is the keys' hash tag (``{...}``), so on a Redis Cluster the two keys the
publish script touches live in one slot.  The first ``{`` of both keys is the one before the
stream name and the text up to the next ``}`` is the same in both, so this holds whatever the
stream name contains.

Deployments (``redis_url``): a single server (``redis://``, ``rediss://``), a primary found
through Sentinel (``redis+sentinel://[:password@]host:port[,host:port...]/<service>[/<db>]``;
failover is followed: connections to the old primary are dropped and the new one is asked
of the sentinels), or a Cluster (``redis+cluster://host:port[,host:port...]``).  On a Cluster
the publish script runs on the stream's shard and its ``PUBLISH`` reaches every node over the
cluster bus, in order per shard, which is the order that matters (a stream's broadcasts come
from its shard); read-barrier markers therefore go out through the stream's shard too.
Sharded pub/sub (``SPUBLISH``) is not used: it would need a channel per shard and a
subscription per shard on every node, for no gain while every node receives every broadcast
anyway (the reason for the one channel below).

Failover and history: Redis replicates asynchronously, so a replica promoted to primary may
lack the last publications of the old one, whose offsets clients have already seen; counting
on from the replica's counter would give new messages offsets already used, and clients would
drop them as duplicates.  So each stream remembers the replication id of the primary that last
wrote it (``r``), and the first publication on a primary with another id starts a new epoch:
clients that resume with the old epoch get ``reject_history`` (and resubscribe knowing they
may have missed messages), never a silent gap.

Why one channel for every broadcast rather than a channel per stream: every node receives
every broadcast and the hub drops streams with no local subscriber.  That costs some
bandwidth per node, but a reconnect avalanche causes no ``SUBSCRIBE`` storm, there is no
window between "subscribed in Redis" and "subscribed in the hub", and a single connection
delivers all messages in the order Redis executed them.  ``subscribe``/``unsubscribe`` only
track which streams this node watches (for the read barrier below).

Publishing runs one Lua script: create the stream's epoch when it has none (history lost:
a restart without persistence, expiry, eviction), count the offset up, append to the
history, publish.  Redis runs scripts one at a time, so every node sees each stream's
offsets in order.  The script is shielded from cancellation (a cancelled write may still
be applied) and never retried (an append is not idempotent); it is bounded by a timeout.

Read barrier: a history read can see messages whose pub/sub copy has not reached this node
yet; the connection would then get them twice (as history, then live).  When a read returns
offsets this node has not delivered yet, the broker publishes a marker to its own ping
channel and waits (bounded) until the marker comes back: pub/sub keeps order, so every
earlier broadcast has been delivered by then and the connection's de-duplication applies.

Transient broadcasts (whispers, presence events) go over the same channel as ``T`` messages
with no position.  Presence changes run one script each, which publishes the ``join`` or
``leave`` event itself when the change makes one (an id new to the stream, its last session
gone): every node sees the same de-duplicated events in the order Redis applied them.

anycable-rails publications come in one of two ways (``broadcast_adapter``, AnyCable's
names; the channel or stream is ``anycable_channel``, ``__anycable__`` by default):

- ``redis``: ``PUBLISH __anycable__ <publication>``.  Every node receives every message and
  delivers it to its local clients without a stream position, and none stores it (storing
  it would store it once per node): no history, no resume of what was missed.
- ``redisx``: ``XADD __anycable__ * payload <publication>`` (AnyCable's Redis Streams
  broadcaster).  The nodes read the stream in one consumer group (``redisx_group``, ``bx``),
  so exactly one node takes each entry; it publishes the publication through this broker
  (history, offsets, every node), then acknowledges and deletes the entry.  The group is
  created with the stream if neither exists yet (``XGROUP CREATE ... $ MKSTREAM``: what was
  added before the first node ever ran is not replayed, as in AnyCable), and again if the
  stream is deleted later.  An entry a node took but never acknowledged (it died) is claimed
  by another node after ``redisx_claim_idle`` seconds: at least once, never lost.  Entries
  are published in stream order by each node; two nodes taking consecutive entries of one
  stream may publish them in either order (their offsets say which).

Node commands (remote disconnect) in either reach every node.

Faults: Redis unreachable at start raises :class:`RedisUnavailable` (a
:class:`~trio_cable.config.ConfigError`).  Lost while running: the node keeps serving its
local connections, broadcasts made meanwhile reach this node's clients only (without
position), the pub/sub link reconnects with jittered exponential backoff and resubscribes;
a heartbeat through Redis detects links that died silently.  Counters are in
:attr:`RedisBroker.stats`.

coredis 6.9 behaviours handled here (see tests/test_redis_broker.py, which reproduces them):

- A connection released to the pool while unusable (cancelled blocking command, Redis
  restart while a command was in flight) is dropped without giving its slot back; after
  ``max_connections`` of them every command waits for a slot forever.  :class:`_Pool`
  gives the slot back, and a pool timeout is always set.
- The pub/sub helper reconnects and resubscribes by itself by default, silently losing
  what was published meanwhile (and ``async for`` over it may stop silently): the broker
  runs it with ``NoRetryPolicy``, reads with ``get_message(timeout=...)`` and does its own
  reconnecting (so it knows, logs and counts every gap), plus the heartbeat.
- No timeouts by default: connect, stream (reply) and pool timeouts are always set.
- The default retry policy re-sends a command after a timeout, which could apply an append
  twice: the client uses ``NoRetryPolicy``; only idempotent reads are retried, by the
  broker, once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import random
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import coredis
import trio
from coredis.connection import TCPLocation
from coredis.exceptions import (
    NoScriptError,
    StreamConsumerGroupError,
    StreamDuplicateConsumerGroupError,
)
from coredis.pool import ConnectionPool, SentinelConnectionPool
from coredis.retry import NoRetryPolicy

from trio_cable.broker import (
    Broadcast,
    HistoryEntry,
    HistoryUnavailable,
    LocalNodes,
    encode_session,
)
from trio_cable.config import ConfigError
from trio_cable.protocol import cable

log = logging.getLogger("trio_cable.broker.redis")


class _CoredisLogFilter(logging.Filter):
    """One clear line per Redis event: the broker logs every loss, reconnect and failure
    itself, so coredis' own records about the same events (``Connection closed
    unexpectedly!`` at INFO, once per connection) only show when this module's logger is at
    DEBUG, demoted to DEBUG.  coredis logs them with ``exc_info=True`` from a ``finally``
    where no exception is being handled, which the logging module prints as a second line,
    ``NoneType: None``: such empty exception info is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is not None and record.exc_info[0] is None:
            record.exc_info = None
            record.exc_text = None
        if record.levelno < logging.ERROR:
            if not log.isEnabledFor(logging.DEBUG):
                return False
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


_coredis_log = logging.getLogger("coredis")
if not any(isinstance(f, _CoredisLogFilter) for f in _coredis_log.filters):
    _coredis_log.addFilter(_CoredisLogFilter())

#: Channel (``redis``) or stream (``redisx``) anycable-rails publishes to.
ANYCABLE_CHANNEL = "__anycable__"
#: The ways publications arrive (see the module docstring).
ADAPTERS = ("redis", "redisx")
_REDISX_BATCH = 100  # entries read at once
_META_MIN_TTL = 86400.0  # offsets survive at least a day without publications
_BACKOFF_MAX = 5.0

# KEYS: history, meta.  ARGV: candidate epoch, history limit, history ttl ms, meta ttl ms,
# channel, header JSON ([stream, exclude]), data JSON.  Returns {epoch, offset}.
# A stream last written by another primary (a failover: see the module docstring) starts a
# new epoch, as one with no epoch at all does; a stream without ``r`` (written before this
# field existed) just takes the current id.
_PUBLISH = """
local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
local meta = redis.call('HMGET', KEYS[2], 'e', 'r')
local epoch = meta[1]
if not epoch or (meta[2] and meta[2] ~= replid) then
  epoch = ARGV[1]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 'n', 0, 'r', replid)
elseif not meta[2] then
  redis.call('HSET', KEYS[2], 'r', replid)
end
local offset = redis.call('HINCRBY', KEYS[2], 'n', 1)
redis.call('PEXPIRE', KEYS[2], ARGV[4])
local limit = tonumber(ARGV[2])
if limit > 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', limit, '*', 'o', offset, 'd', ARGV[7])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local nl = '\\n'
redis.call('PUBLISH', ARGV[5], 'B' .. epoch .. nl .. offset .. nl .. ARGV[6] .. nl .. ARGV[7])
return {epoch, offset}
"""

# KEYS: meta (it routes the marker through the stream's shard on a Cluster).  ARGV: channel,
# marker.
_MARKER = """
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

# Presence (see the module docstring).  The leave of one record: the event when its id had
# no other session.
_PRESENCE_LEAVE_FN = """
local function leave(pkey, sid, stream, channel)
  local skey, hkey, ikey = pkey .. 'ps:' .. stream, pkey .. 'ph:' .. stream, pkey .. 'pi:' .. stream
  local pid = redis.call('HGET', skey, sid)
  if not pid then return 0 end
  redis.call('HDEL', skey, sid)
  redis.call('ZREM', pkey .. 'pexp', sid .. '\\n' .. stream)
  if redis.call('HINCRBY', hkey, pid, -1) > 0 then return 0 end
  redis.call('HDEL', hkey, pid)
  redis.call('HDEL', ikey, pid)
  local header = cjson.encode({stream, cjson.null, 'presence'})
  redis.call('PUBLISH', channel,
    'T' .. header .. '\\n' .. '{"type":"leave","id":' .. cjson.encode(pid) .. '}')
  return 1
end
"""

# A batch of presence changes, in order (see _presence_writer).  ARGV: key prefix (with its
# colon), channel, then 5 per change: kind, sid, stream, a, b.  Kinds: "j" join (a: presence
# id, b: info JSON or ""), "l" leave, "g" linger (a: deadline, unix ms; only a record that
# exists lingers).  Every change is idempotent, so a batch whose outcome is unknown (a
# timeout) is safely sent again: a repeated join or leave finds nothing to change and
# publishes nothing.
_PRESENCE_BATCH = (
    _PRESENCE_LEAVE_FN
    + """
local function join(pkey, sid, stream, channel, pid, info)
  local skey, hkey, ikey = pkey .. 'ps:' .. stream, pkey .. 'ph:' .. stream, pkey .. 'pi:' .. stream
  redis.call('ZREM', pkey .. 'pexp', sid .. '\\n' .. stream)
  local old = redis.call('HGET', skey, sid)
  if old == pid then
    redis.call('HSET', ikey, pid, info)
    return
  end
  if old then leave(pkey, sid, stream, channel) end
  redis.call('HSET', skey, sid, pid)
  redis.call('HSET', ikey, pid, info)
  if redis.call('HINCRBY', hkey, pid, 1) > 1 then return end
  local event
  if info == '' then
    event = '{"type":"join","id":' .. cjson.encode(pid) .. '}'
  else
    event = '{"type":"join","info":' .. info .. ',"id":' .. cjson.encode(pid) .. '}'
  end
  local header = cjson.encode({stream, cjson.null, 'presence'})
  redis.call('PUBLISH', channel, 'T' .. header .. '\\n' .. event)
end

local pkey, channel = ARGV[1], ARGV[2]
for i = 3, #ARGV, 5 do
  local kind, sid, stream = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if kind == 'j' then
    join(pkey, sid, stream, channel, ARGV[i + 3], ARGV[i + 4])
  elseif kind == 'l' then
    leave(pkey, sid, stream, channel)
  elseif redis.call('HEXISTS', pkey .. 'ps:' .. stream, sid) == 1 then
    redis.call('ZADD', pkey .. 'pexp', ARGV[i + 3], sid .. '\\n' .. stream)
  end
end
return 0
"""
)
# Changes sent in one batch at most, and kept waiting at most (beyond: dropped, counted).
_PRESENCE_BATCH_MAX = 500
_PRESENCE_QUEUE_MAX = 200_000

# ARGV: key prefix, channel, now (unix ms), limit.  Returns the records removed.
_PRESENCE_SWEEP = (
    _PRESENCE_LEAVE_FN
    + """
local due = redis.call('ZRANGEBYSCORE', ARGV[1] .. 'pexp', '-inf', ARGV[3], 'LIMIT', 0, ARGV[4])
for _, member in ipairs(due) do
  local cut = string.find(member, '\\n', 1, true)
  redis.call('ZREM', ARGV[1] .. 'pexp', member)
  if cut then
    leave(ARGV[1], string.sub(member, 1, cut - 1), string.sub(member, cut + 1), ARGV[2])
  end
end
return #due
"""
)

# How often every node sweeps the lingering presence records (seconds).
_PRESENCE_SWEEP_INTERVAL = 0.2

# KEYS: history, meta.  ARGV: history limit.  Returns {epoch|nil, last|nil, secs, usecs,
# entries newest first}: one consistent snapshot.
_HISTORY = """
local meta = redis.call('HMGET', KEYS[2], 'e', 'n')
local now = redis.call('TIME')
local entries = {}
if tonumber(ARGV[1]) > 0 then
  entries = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', ARGV[1])
end
return {meta[1], meta[2], now[1], now[2], entries}
"""


# KEYS: the group's hash.  ARGV: member, snapshot JSON, ttl ms.  Refuses (0) a member that
# was retired (a worker that stalled past the staleness limit must not be counted twice).
_PUT_SNAPSHOT = """
if redis.call('HEXISTS', KEYS[1], 'gone:' .. ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: the group's hash.  ARGV: member, the snapshot expected ('' = any).  Moves the
# member's counters into ``retired`` and marks it gone, in one step (two workers may notice
# the same stale member at once: only one adds it).
_RETIRE_SNAPSHOT = """
local text = redis.call('HGET', KEYS[1], ARGV[1])
if not text or (ARGV[2] ~= '' and text ~= ARGV[2]) then return 0 end
local counters = cjson.decode(text)['counters']
local raw = redis.call('HGET', KEYS[1], 'retired')
local total = raw and cjson.decode(raw) or {}
for key, value in pairs(counters) do total[key] = (total[key] or 0) + value end
redis.call('HSET', KEYS[1], 'retired', cjson.encode(total), 'gone:' .. ARGV[1], '1')
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


class RedisUnavailable(ConfigError):
    """Redis cannot be reached (at start) or is not usable (too old, wrong URL)."""


class _ReleaseFix:
    """coredis' pool release, minus the slot leak: an unusable connection gives its slot
    back (a mixin for the plain and the Sentinel pools)."""

    _available_connections: Any

    def release(self, connection: Any) -> None:
        usable = connection.usable
        super().release(connection)  # type: ignore[misc]
        if not usable:
            # coredis 6.9 drops it without returning the slot (its queue holds a ``None``
            # placeholder per slot that may open a new connection).
            with contextlib.suppress(Exception):
                self._available_connections.append_nowait(None)


class _Pool(_ReleaseFix, ConnectionPool[Any]):
    """The plain pool, with the release fix."""


class _SentinelPool(_ReleaseFix, SentinelConnectionPool):
    """The pool of a Sentinel-managed primary, with the release fix."""


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """Where the broker's Redis is, parsed from ``redis_url``: one server, a primary behind
    Sentinel, or a Cluster."""

    kind: str  # "single", "sentinel" or "cluster"
    url: str  # as given (single: passed to coredis as is)
    hosts: tuple[tuple[str, int], ...] = ()  # sentinels, or cluster startup nodes
    service: str = ""  # the Sentinel service (primary) name
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        """Parse *url*; ``ValueError`` with a message naming what is wrong."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme in ("redis", "rediss", "unix"):
            return cls("single", url)
        if scheme not in ("redis+sentinel", "redis+cluster"):
            raise ValueError(
                f"unknown scheme {parts.scheme!r} (redis://, rediss://, unix://, "
                "redis+sentinel://, redis+cluster://)"
            )
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        hosts = []
        for item in hostlist.split(","):
            host, _, port = item.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"{item.strip()!r} is not host:port")
            hosts.append((host.strip("[]"), int(port)))
        query = dict(parse_qsl(parts.query))
        user, secret = unquote(username) or None, unquote(password) or None
        if scheme == "redis+cluster":
            return cls("cluster", url, tuple(hosts), username=user, password=secret)
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("a Sentinel URL names its service: redis+sentinel://host:port/name")
        db = path[1] if len(path) > 1 else "0"
        if not db.isdigit():
            raise ValueError(f"database {db!r} is not a number")
        return cls(
            "sentinel", url, tuple(hosts), service=unquote(path[0]), db=int(db),
            username=user, password=secret, sentinel_password=query.get("sentinel_password"),
        )  # fmt: skip


class _LinkLost(Exception):
    """The pub/sub link stopped delivering (error, or heartbeat not seen in time)."""


def redact_url(url: str) -> str:
    """*url* without its password, for messages (any scheme, several hosts too)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hosts}"))


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    """The exceptions inside (nested) exception groups; *exc* itself otherwise."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


@contextlib.contextmanager
def _quiet_teardown() -> Iterator[None]:
    """When cancelled, let only the cancellation out: coredis 6.9's pub/sub teardown
    raises ``ClosedResourceError`` (it unsubscribes on a connection already closed)."""
    try:
        yield
    except BaseExceptionGroup as group:
        cancelled, rest = group.split(trio.Cancelled)
        if cancelled is None or rest is None:
            raise
        log.debug("ignoring coredis teardown errors while cancelled: %s", _describe(rest))
        raise cancelled from None


def _describe(exc: BaseException) -> str:
    return "; ".join(f"{type(e).__name__}: {e}" for e in _leaves(exc)) or type(exc).__name__


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RedisBroker(LocalNodes):
    """Broadcasts, history and sessions shared through Redis by any number of nodes.

    ``history_limit`` messages per stream are kept for ``history_ttl`` seconds.  Every
    Redis operation is bounded by ``command_timeout`` (connecting by ``connect_timeout``);
    ``heartbeat`` seconds between liveness checks of the pub/sub link.
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        history_limit: int = 100,
        history_ttl: float = 300.0,
        session_max_size: int = 64 << 10,
        prefix: str = "trio_cable",
        connect_timeout: float = 2.0,
        command_timeout: float = 2.0,
        heartbeat: float = 1.0,
        max_connections: int = 32,
        barrier_timeout: float = 1.0,
        broadcast_adapter: str = "redis",
        anycable_channel: str = ANYCABLE_CHANNEL,
        redisx_group: str = "bx",
        redisx_block: float = 1.0,
        redisx_claim_idle: float = 10.0,
    ) -> None:
        if broadcast_adapter not in ADAPTERS:
            raise ValueError(f"broadcast_adapter {broadcast_adapter!r}: one of {ADAPTERS}")
        super().__init__()
        self.url = url
        try:
            #: The deployment :attr:`url` names (one server, Sentinel, Cluster).
            self.target = RedisTarget.parse(url)
        except ValueError as exc:
            raise RedisUnavailable(f"broker redis: bad URL {redact_url(url)}: {exc}") from None
        self.history_limit = history_limit
        self.history_ttl = history_ttl
        self.session_max_size = session_max_size
        self.prefix = prefix
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.heartbeat = heartbeat
        self.max_connections = max_connections
        self.barrier_timeout = barrier_timeout
        self.broadcast_adapter = broadcast_adapter
        self.anycable_channel = anycable_channel
        self.redisx_group = redisx_group
        #: How long one ``XREADGROUP`` blocks (seconds): how soon a stop or a claim is seen.
        self.redisx_block = redisx_block
        #: An entry taken this long ago (seconds) and not acknowledged is another node's to
        #: take: its taker died or lost Redis.
        self.redisx_claim_idle = redisx_claim_idle
        self.node_id = secrets.token_hex(6)
        self.channel = f"{prefix}:pubsub"
        self.ping_channel = f"{prefix}:ping:{self.node_id}"
        #: True while the pub/sub link is up (this node receives other nodes' broadcasts).
        self.connected = False
        #: Counters an operator would watch (until they move to the node's metrics).
        self.stats: dict[str, int] = dict.fromkeys(
            (
                "redis_disconnects",
                "redis_reconnects",
                "publish_failures",
                "publish_unknown",
                "local_fallback_broadcasts",
                "anycable_publications",
                "anycable_invalid",
                "redisx_entries",
                "redisx_claimed",
                "redisx_failures",
                "stream_gaps",
                "barrier_timeouts",
                "presence_retries",
                "presence_dropped",
            ),
            0,
        )
        self._client: coredis.Redis[bytes] | None = None
        self._running = False
        self._ready = trio.Event()
        self._scripts: dict[str, str] = {}  # script text -> sha1
        self._delivered: dict[str, tuple[str, int]] = {}  # watched stream -> (epoch, offset)
        self._marker_sent = 0
        # Markers back from pub/sub.  A set, not the highest seen: on a Cluster each marker
        # goes through its stream's shard, and shards' messages arrive in any order.
        self._markers_seen: set[int] = set()
        self._marker_event = trio.Event()
        self._last_seen = 0.0
        self._lost_at = 0.0
        self._pubsub_started = False
        # Presence changes waiting for the writer, and how many were queued / applied.
        self._presence_queue: list[list[str]] = []
        self._presence_queued = 0
        self._presence_written = 0
        self._presence_wakeup = trio.Event()
        self._presence_flushed = trio.Event()

    # -- keys ----------------------------------------------------------------------------

    def history_key(self, stream: str) -> str:
        """The Redis Stream holding *stream*'s history."""
        return f"{self.prefix}:h:{{{stream}}}"

    def meta_key(self, stream: str) -> str:
        """The hash holding *stream*'s epoch and last offset."""
        return f"{self.prefix}:m:{{{stream}}}"

    def session_key(self, sid: str) -> str:
        """The key of session *sid*."""
        return f"{self.prefix}:s:{sid}"

    # -- running -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _connect(self, blocking: float = 0.0) -> AsyncIterator[Any]:
        """A command client for :attr:`url`'s deployment, open while the block runs; its
        every reply comes within ``command_timeout`` (plus *blocking* seconds, for a client
        that sends blocking reads).

        Every client has the broker's timeouts and no retries (see the module docstring);
        the Sentinel one follows failovers (its pool asks the sentinels where the primary is
        whenever it connects), the Cluster one follows slot moves."""
        target = self.target
        connect, stream = self.connect_timeout, self.command_timeout + blocking
        if target.kind == "sentinel":
            sentinel: coredis.Sentinel[bytes] = coredis.Sentinel(
                [TCPLocation(host, port) for host, port in target.hosts],
                sentinel_kwargs={
                    "connect_timeout": connect,
                    "stream_timeout": stream,
                    "password": target.sentinel_password,
                },
                username=target.username,
                password=target.password,
                db=target.db,
                connect_timeout=connect,
                stream_timeout=stream,
            )
            client = sentinel.primary_for(
                target.service,
                connection_pool_class=_SentinelPool,
                max_connections=self.max_connections,
                timeout=self.command_timeout,  # waiting for a pool slot
            )
            async with sentinel, client:
                yield client
        elif target.kind == "cluster":
            cluster: coredis.RedisCluster[bytes] = coredis.RedisCluster(
                startup_nodes=[TCPLocation(host, port) for host, port in target.hosts],
                username=target.username,
                password=target.password,
                max_connections=self.max_connections,
                pool_timeout=self.command_timeout,
                retry_policy=NoRetryPolicy(),
                verify_version=False,
                connect_timeout=connect,
                stream_timeout=stream,
                decode_responses=False,
            )
            async with cluster:
                yield cluster
        else:
            pool = _Pool.from_url(
                self.url,
                timeout=self.command_timeout,  # waiting for a pool slot
                max_connections=self.max_connections,
                connect_timeout=connect,
                stream_timeout=stream,
            )
            single: coredis.Redis[bytes] = coredis.Redis(
                connection_pool=pool, retry_policy=NoRetryPolicy(), verify_version=False
            )
            async with single:
                yield single

    @property
    def client(self) -> coredis.Redis[bytes]:
        """The command client (only while :meth:`run` runs)."""
        if self._client is None:
            raise ConnectionError("the Redis broker is not running")
        return self._client

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect (or raise :class:`RedisUnavailable`), subscribe, and serve until cancelled:
        read pub/sub, send heartbeats, reconnect after losses.  When several nodes share
        this broker, the first ``run`` does the work and must outlive the others."""
        if self._running:
            await self._ready.wait()
            task_status.started()
            await trio.sleep_forever()
        self._running = True
        started = False
        where = redact_url(self.url)
        try:
            with _quiet_teardown():
                async with self._connect() as client:
                    self._client = client
                    await self._check_server(client, where)
                    try:
                        async with trio.open_nursery() as nursery:
                            await nursery.start(self._pubsub_loop)
                            nursery.start_soon(self._heartbeat_loop)
                            nursery.start_soon(self._presence_sweep_loop)
                            nursery.start_soon(self._presence_writer)
                            if self.broadcast_adapter == "redisx":
                                nursery.start_soon(self._redisx_loop)
                            self._ready.set()
                            started = True
                            log.info("redis broker connected to %s (node %s)", where, self.node_id)
                            task_status.started()
                    finally:
                        if started:
                            await self._flush_presence()
        except RedisUnavailable:
            raise
        except BaseException as exc:
            leaves = list(_leaves(exc))
            if started or any(isinstance(e, trio.Cancelled) for e in leaves):
                raise
            unavailable = [e for e in leaves if isinstance(e, RedisUnavailable)]
            if unavailable:
                raise unavailable[0] from None
            raise RedisUnavailable(
                f"broker redis: cannot connect to {where}: {_describe(exc)}"
            ) from None
        finally:
            self._client = None
            self._running = False
            self.connected = False
            self._ready = trio.Event()
            self._pubsub_started = False

    async def _check_server(self, client: coredis.Redis[bytes], where: str) -> None:
        try:
            with trio.fail_after(self.connect_timeout + self.command_timeout):
                info = await client.info("server")
        except BaseException as exc:
            if any(isinstance(e, trio.Cancelled) for e in _leaves(exc)):
                raise
            raise RedisUnavailable(
                f"broker redis: cannot connect to {where}: {_describe(exc)}"
            ) from None
        version = str(info.get("redis_version", "0"))
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts < (6, 2):
            raise RedisUnavailable(f"broker redis: {where} runs Redis {version}; 6.2+ is needed")

    async def _pubsub_loop(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Keep one pub/sub link up, reconnecting with jittered exponential backoff; the
        first connection must succeed (else :class:`RedisUnavailable`)."""
        first = True
        delay = 0.1
        while True:
            try:
                await self._pubsub_session(task_status if first else None)
            except BaseException as exc:
                if any(isinstance(e, trio.Cancelled) for e in _leaves(exc)):
                    raise
                if not self._pubsub_started:
                    raise RedisUnavailable(
                        f"broker redis: cannot subscribe on {redact_url(self.url)}: "
                        f"{_describe(exc)}"
                    ) from None
                if self.connected:
                    self.connected = False
                    self._lost_at = time.monotonic()
                    self.stats["redis_disconnects"] += 1
                    self._wake_barriers()
                    delay = 0.1
                    log.warning(
                        "redis link lost (%s): serving local connections only, reconnecting",
                        _describe(exc),
                    )
                else:
                    log.debug("redis reconnect failed: %s", _describe(exc))
            first = False
            await trio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _pubsub_session(self, task_status: trio.TaskStatus[None] | None) -> None:
        """One pub/sub connection: subscribe, read until the link fails."""
        with _quiet_teardown():
            async with self._connect() as client:
                channels = [self.channel, self.ping_channel]
                if self.broadcast_adapter == "redis":
                    channels.append(self.anycable_channel)
                pubsub = client.pubsub(
                    channels=channels,
                    retry_policy=NoRetryPolicy(),
                    ignore_subscribe_messages=True,
                    subscription_timeout=self.connect_timeout + self.command_timeout,
                    max_idle_seconds=max(1.0, self.heartbeat),
                )
                async with pubsub:
                    was_lost = not self.connected and task_status is None
                    self.connected = True
                    self._last_seen = trio.current_time()
                    if task_status is not None:
                        self._pubsub_started = True
                        task_status.started()
                    elif was_lost:
                        self.stats["redis_reconnects"] += 1
                        log.warning(
                            "redis link back after %.1f s: resubscribed (broadcasts published "
                            "meanwhile did not reach this node)",
                            time.monotonic() - self._lost_at,
                        )
                        self._wake_barriers()
                    liveness = 3 * self.heartbeat + self.command_timeout
                    while True:
                        message = await pubsub.get_message(timeout=self.heartbeat)
                        now = trio.current_time()
                        if message is None:
                            if now - self._last_seen > liveness:
                                raise _LinkLost(f"no heartbeat for {now - self._last_seen:.1f} s")
                            continue
                        self._last_seen = now
                        if message.get("type") not in ("message", "pmessage"):
                            continue
                        self._dispatch(_text(message["channel"]), message["data"])

    async def _heartbeat_loop(self) -> None:
        """Publish to our own ping channel so that a silently dead link is noticed."""
        while True:
            await trio.sleep(self.heartbeat)
            if self._client is None:
                continue
            with contextlib.suppress(Exception), trio.move_on_after(self.command_timeout):
                await self._client.publish(self.ping_channel, b"H")

    # -- receiving -----------------------------------------------------------------------

    def _dispatch(self, channel: str, data: Any) -> None:
        raw = data if isinstance(data, bytes) else str(data).encode()
        try:
            if channel == self.channel:
                self._on_internal(raw)
            elif channel == self.ping_channel:
                if raw[:1] == b"M":
                    if len(self._markers_seen) > 10_000:
                        self._markers_seen.clear()  # only waiters' markers matter, briefly
                    self._markers_seen.add(int(raw[1:]))
                    self._wake_barriers()
            elif channel == self.anycable_channel:
                self._on_anycable(raw)
        except Exception:
            # A bad message must cost that message, never the link.
            log.exception("bad message on %s: %r", channel, raw[:200])

    def _on_internal(self, raw: bytes) -> None:
        kind = raw[:1]
        if kind == b"B":
            epoch_b, offset_b, header_b, data_b = raw[1:].split(b"\n", 3)
            stream, exclude = json.loads(header_b)
            epoch, offset = epoch_b.decode(), int(offset_b)
            if stream in self.streams:
                last = self._delivered.get(stream)
                if last is not None and last[0] == epoch and offset > last[1] + 1:
                    self.stats["stream_gaps"] += 1
                    log.warning(
                        "stream %r: offsets %d..%d never arrived over pub/sub",
                        stream[:200],
                        last[1] + 1,
                        offset - 1,
                    )
                self._delivered[stream] = (epoch, offset)
            self._deliver(Broadcast(stream, json.loads(data_b), epoch, offset, exclude))
        elif kind == b"T":
            header_b, data_b = raw[1:].split(b"\n", 1)
            stream, exclude, what = json.loads(header_b)
            self._deliver(Broadcast(stream, data_b.decode(), None, None, exclude, what))
        elif kind == b"C":
            command = json.loads(raw[1:])
            for on_command in list(self._nodes.values()):
                on_command(command)
        else:
            log.info("ignoring unknown broker message %r", raw[:50])

    def _on_anycable(self, raw: bytes) -> None:
        try:
            items = cable.parse_publications(raw)
        except cable.InvalidCommand as exc:
            self.stats["anycable_invalid"] += 1
            log.warning("bad publication on %s: %s", self.anycable_channel, exc.reason)
            return
        self.stats["anycable_publications"] += len(items)
        for item in items:
            if isinstance(item, cable.RemoteCommand):
                command = item.to_dict()
                for on_command in list(self._nodes.values()):
                    on_command(command)
            else:
                self._deliver(Broadcast(item.stream, item.data, None, None, item.exclude_socket))

    # -- redisx: publications from a Redis stream, one node each ------------------------

    async def _redisx_loop(self) -> None:
        """Consume the publications stream in the nodes' group until cancelled; after a
        failure (Redis gone, a bad reply) start again with jittered exponential backoff."""
        delay = 0.1
        while True:
            started = trio.current_time()
            try:
                await self._redisx_session()
            except BaseException as exc:
                if any(isinstance(e, trio.Cancelled) for e in _leaves(exc)):
                    await self._redisx_leave()
                    raise
                self.stats["redisx_failures"] += 1
                log.warning("redisx: reading %r failed (%s); retrying",
                            self.anycable_channel, _describe(exc))  # fmt: skip
            if trio.current_time() - started > _BACKOFF_MAX:
                delay = 0.1  # it had been working: this is a new outage
            await trio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _redisx_session(self) -> None:
        # A client of its own: its reads block for redisx_block, which the command client's
        # reply timeout would not allow.
        key, group, consumer = self.anycable_channel, self.redisx_group, self.node_id
        claim_ms = max(1, int(self.redisx_claim_idle * 1000))
        with _quiet_teardown():
            async with self._connect(blocking=self.redisx_block) as client:
                await self._redisx_group(client)
                last_claim = -math.inf
                while True:
                    try:
                        if trio.current_time() - last_claim >= self.redisx_claim_idle / 2:
                            # Entries another node took and never acknowledged.
                            last_claim = trio.current_time()
                            claimed = await client.xautoclaim(
                                key, group, consumer, claim_ms, "0-0", count=_REDISX_BATCH
                            )
                            entries = tuple(claimed[1])
                            if entries:
                                self.stats["redisx_claimed"] += len(entries)
                                log.info("redisx: claimed %d entries of a node gone quiet",
                                         len(entries))  # fmt: skip
                                await self._redisx_take(client, entries)
                        reply = await client.xreadgroup(
                            group, consumer, {key: ">"}, count=_REDISX_BATCH,
                            block=max(1, int(self.redisx_block * 1000)),
                        )  # fmt: skip
                    except StreamConsumerGroupError:
                        # NOGROUP: the stream (and its group) was deleted since.
                        await self._redisx_group(client)
                        continue
                    for entries in (reply or {}).values():
                        await self._redisx_take(client, entries)

    async def _redisx_leave(self) -> None:
        """Stopping: remove this node's consumer from the group unless it holds entries it
        never acknowledged (those stay for another node to claim).  Best effort."""
        client = self._client
        if client is None:
            return
        key, group = self.anycable_channel, self.redisx_group
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(self.command_timeout),
            contextlib.suppress(Exception),
        ):
            held = await client.xpending(key, group, "-", "+", 1, consumer=self.node_id)
            if not held:
                await client.xgroup_delconsumer(key, group, self.node_id)

    async def _redisx_group(self, client: coredis.Redis[bytes]) -> None:
        """Create the consumer group, and the stream with it, unless it exists."""
        try:
            await client.xgroup_create(self.anycable_channel, self.redisx_group, "$", mkstream=True)
            log.info("redisx: created consumer group %r of stream %r",
                     self.redisx_group, self.anycable_channel)  # fmt: skip
        except StreamDuplicateConsumerGroupError:
            pass  # another node (or an earlier run) made it

    async def _redisx_take(self, client: coredis.Redis[bytes], entries: Any) -> None:
        """Publish each entry's publications through the broker (history, every node),
        then acknowledge and delete it.  An entry without a valid ``payload`` is counted,
        logged and acknowledged: it would fail the same way on every node, forever."""
        key, group = self.anycable_channel, self.redisx_group
        for entry in entries:
            fields = {_text(k): v for k, v in (entry.field_values or {}).items()}
            payload = fields.get("payload")
            self.stats["redisx_entries"] += 1
            try:
                if payload is None:
                    raise cable.InvalidCommand("no payload field")
                items = cable.parse_publications(
                    payload if isinstance(payload, bytes) else str(payload).encode()
                )
            except cable.InvalidCommand as exc:
                self.stats["anycable_invalid"] += 1
                log.warning("bad publication in stream %s (entry %s): %s",
                            key, _text(entry.identifier), exc.reason)  # fmt: skip
                items = []
            self.stats["anycable_publications"] += len(items)
            for item in items:
                if isinstance(item, cable.RemoteCommand):
                    await self.publish_command(item.to_dict())
                else:
                    await self.publish(item.stream, item.data, item.exclude_socket)
            await client.xack(key, group, [entry.identifier])
            await client.xdel(key, [entry.identifier])

    def _deliver(self, broadcast: Broadcast) -> None:
        for deliver in list(self._nodes):
            try:
                deliver(broadcast)
            except Exception:
                log.exception("delivering a broadcast on %r failed", broadcast.stream[:200])

    # -- nodes ---------------------------------------------------------------------------

    def unsubscribe(self, stream: str) -> None:
        """A node here stopped watching *stream* (pub/sub carries every stream anyway)."""
        super().unsubscribe(stream)
        if stream not in self.streams:
            self._delivered.pop(stream, None)

    # -- commands ------------------------------------------------------------------------

    async def _script(self, script: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA, or EVAL when Redis does not know the script (NOSCRIPT: nothing ran)."""
        client = self.client
        sha = self._scripts.get(script)
        if sha is not None:
            try:
                return await client.evalsha(sha, keys, args)
            except NoScriptError:
                pass  # Redis restarted: its script cache is empty
        result = await client.eval(script, keys, args)
        if sha is None:
            self._scripts[script] = hashlib.sha1(script.encode()).hexdigest()
        return result

    async def publish(self, stream: str, data: Any, exclude_socket: str | None = None) -> None:
        """Append to *stream*'s history and publish to every node, in one script.

        Shielded from cancellation and never retried.  When Redis cannot be reached and our
        own pub/sub link is down too, the broadcast goes to this node's clients only
        (without a position) so that local service continues."""
        data_json = json.dumps(data)
        header = json.dumps([stream, exclude_socket])
        ttl_ms = max(1, int(self.history_ttl * 1000))
        meta_ms = max(ttl_ms, int(_META_MIN_TTL * 1000))
        args: list[Any] = [
            secrets.token_hex(4),
            self.history_limit,
            ttl_ms,
            meta_ms,
            self.channel,
            header,
            data_json,
        ]
        keys = [self.history_key(stream), self.meta_key(stream)]
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self.command_timeout + self.connect_timeout):
                    await self._script(_PUBLISH, keys, args)
                return
            except Exception as exc:
                failure = exc
        if self.connected:
            # It may have been applied (a reply lost, a timeout): then pub/sub delivers it.
            # Retrying could append it twice.
            self.stats["publish_unknown"] += 1
            log.warning(
                "publish to %r: outcome unknown (%s); not retried", stream[:200], _describe(failure)
            )
            return
        self.stats["publish_failures"] += 1
        self.stats["local_fallback_broadcasts"] += 1
        log.warning(
            "publish to %r failed (%s): delivered to this node's clients only",
            stream[:200],
            _describe(failure),
        )
        self._deliver(Broadcast(stream, data, None, None, exclude_socket))

    async def publish_transient(
        self,
        stream: str,
        data: Any,
        *,
        exclude_socket: str | None = None,
        kind: str | None = None,
    ) -> None:
        """Publish to every node without storing (whispers); this node alone when Redis
        is unreachable."""
        header = json.dumps([stream, exclude_socket, kind]).encode()
        if await self._publish_or_fall_back(b"T" + header + b"\n" + str(data).encode(), "whisper"):
            log.warning("whisper failed: delivered to this node's clients only")
            self._deliver(Broadcast(stream, data, None, None, exclude_socket, kind))

    async def _publish_or_fall_back(self, payload: bytes, what: str) -> bool:
        """PUBLISH *payload* on the broker channel, shielded and not retried; True when it
        failed while our own link is down too (the caller applies it on this node only)."""
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self.command_timeout + self.connect_timeout):
                    await self.client.publish(self.channel, payload)
                return False
            except Exception as exc:
                failure = exc
        if self.connected:
            log.warning("%s: outcome unknown (%s); not retried", what, _describe(failure))
            return False
        log.warning("%s failed (%s)", what, _describe(failure))
        return True

    # -- presence ------------------------------------------------------------------------

    @property
    def _presence_prefix(self) -> str:
        return f"{self.prefix}:"

    async def _presence_script(self, script: str, args: list[Any]) -> Any:
        # Shielded: a cancelled script may still run, and the writer must know what it sent.
        with (
            trio.CancelScope(shield=True),
            trio.fail_after(self.command_timeout + self.connect_timeout),
        ):
            return await self._script(script, [], args)

    def _queue_presence(self, *change: Any) -> None:
        """Queue a presence change for the writer: sessions do not wait for Redis (a burst
        of thousands would otherwise hold as many pool slots), and one script applies a
        batch of them in order."""
        if len(self._presence_queue) >= _PRESENCE_QUEUE_MAX or self.target.kind == "cluster":
            # (A Cluster cannot run the batch: it spans streams, whose keys live on other
            # shards.  Presence there is not supported yet: said once, counted.)
            if self.target.kind == "cluster" and not self.stats["presence_dropped"]:
                log.warning("presence is not supported on a Redis Cluster: changes dropped")
            self.stats["presence_dropped"] += 1
            return
        self._presence_queue.append([str(part) for part in change])
        self._presence_queued += 1
        self._presence_wakeup.set()

    async def presence_join(self, stream: str, sid: str, pid: str, info: Any) -> None:
        self._queue_presence("j", sid, stream, pid, "" if info is None else json.dumps(info))

    async def presence_leave(self, stream: str, sid: str) -> None:
        self._queue_presence("l", sid, stream, "", "")

    async def presence_linger(self, stream: str, sid: str, ttl: float) -> None:
        self._queue_presence("g", sid, stream, int((time.time() + ttl) * 1000), "")

    async def _presence_writer(self) -> None:
        """Apply the queued presence changes, a batch per script, in order; a batch that
        failed is sent again (every change is idempotent) after a pause."""
        queue = self._presence_queue
        pause = 0.05
        while True:
            if not queue:
                await self._presence_wakeup.wait()
                self._presence_wakeup = trio.Event()
                continue
            try:
                await self._apply_presence()
            except Exception as exc:
                self.stats["presence_retries"] += 1
                log.warning("presence: changes not applied (%s): sent again", _describe(exc))
                await trio.sleep(pause)
                pause = min(pause * 2, _BACKOFF_MAX)
                continue
            pause = 0.05

    async def _apply_presence(self) -> None:
        """Apply the first batch of the queue (and take it off), or raise."""
        queue = self._presence_queue
        batch = queue[:_PRESENCE_BATCH_MAX]
        args: list[Any] = [self._presence_prefix, self.channel]
        for change in batch:
            args.extend(change)
        await self._presence_script(_PRESENCE_BATCH, args)
        del queue[: len(batch)]
        self._presence_written += len(batch)
        self._presence_flushed.set()
        self._presence_flushed = trio.Event()

    async def _flush_presence(self) -> None:
        """The node stops: apply what is still queued (the leaves and lingers of the
        sessions its drain closed), bounded and shielded.  What is lost here stays present
        in Redis until the stream's presence keys are dropped, so it is logged."""
        queue = self._presence_queue
        with trio.CancelScope(shield=True), trio.move_on_after(self.command_timeout * 2):
            while queue:
                try:
                    await self._apply_presence()
                except Exception as exc:
                    log.warning("presence: could not apply changes at stop: %s", _describe(exc))
                    break
        if queue:
            self.stats["presence_dropped"] += len(queue)
            log.warning("presence: %d changes not applied before the broker stopped", len(queue))
            queue.clear()

    async def _presence_caught_up(self) -> None:
        """Wait (bounded) until the changes queued so far are applied: this node reads its
        own writes."""
        target = self._presence_queued
        with trio.move_on_after(self.command_timeout + self.connect_timeout):
            while self._presence_written < target:
                await self._presence_flushed.wait()

    async def presence_info(self, stream: str) -> tuple[int, list[dict[str, Any]]]:
        await self._presence_caught_up()
        prefix = self._presence_prefix
        with trio.fail_after(self.command_timeout + self.connect_timeout):
            infos = await self.client.hgetall(f"{prefix}pi:{stream}")
        records: list[dict[str, Any]] = []
        for pid_b, info_b in infos.items():
            pid = _text(pid_b)
            info = _text(info_b)
            records.append({"id": pid} if not info else {"info": json.loads(info), "id": pid})
        return len(records), records

    async def _presence_sweep_loop(self) -> None:
        """End the lingers that are due (every node sweeps; the script makes it safe)."""
        while True:
            await trio.sleep(_PRESENCE_SWEEP_INTERVAL)
            if self._client is None:
                continue
            try:
                await self._presence_script(
                    _PRESENCE_SWEEP,
                    [self._presence_prefix, self.channel, int(time.time() * 1000), 1000],
                )
            except Exception as exc:
                log.debug("presence sweep failed: %s", _describe(exc))

    async def publish_command(self, command: dict[str, Any]) -> None:
        """Send a node command (remote disconnect) to every node; this node alone when
        Redis is unreachable."""
        if await self._publish_or_fall_back(b"C" + json.dumps(command).encode(), "node command"):
            log.warning("node command applied on this node only")
            for on_command in list(self._nodes.values()):
                on_command(command)

    # -- history -------------------------------------------------------------------------

    async def _read(self, stream: str) -> tuple[str | None, int, float, list[HistoryEntry]]:
        """(epoch, last offset, Redis time now, kept entries oldest first) of *stream*."""
        keys = [self.history_key(stream), self.meta_key(stream)]
        result: Any = None
        for attempt in (1, 2):  # a read is idempotent: one retry
            try:
                with trio.fail_after(self.command_timeout + self.connect_timeout):
                    result = await self._script(_HISTORY, keys, [self.history_limit])
                break
            except Exception:
                if attempt == 2:
                    raise
        epoch_raw, last_raw, secs, usecs, raw_entries = result
        epoch = _text(epoch_raw) if epoch_raw is not None else None
        last = int(last_raw) if last_raw is not None else 0
        now = int(secs) + int(usecs) / 1e6
        horizon = now - self.history_ttl
        entries: list[HistoryEntry] = []
        for entry_id, fields in reversed(raw_entries or []):
            if isinstance(fields, dict):
                values = {_text(k): v for k, v in fields.items()}
            else:
                values = {_text(k): v for k, v in zip(fields[::2], fields[1::2], strict=True)}
            stamp = int(_text(entry_id).split("-", 1)[0]) / 1000
            offset = int(values["o"])
            if stamp < horizon or offset <= last - self.history_limit:
                continue  # older than the TTL, or beyond the limit (MAXLEN ~ keeps more)
            entries.append(HistoryEntry(offset, stamp, json.loads(values["d"]), epoch or ""))
        return epoch, last, now, entries

    async def history_since_offset(
        self, stream: str, epoch: str, offset: int
    ) -> list[HistoryEntry]:
        """Entries after *offset* of *epoch*: all of them or :class:`HistoryUnavailable`."""
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise HistoryUnavailable(f"offset {offset!r} is not a position")
        current, last, _now, entries = await self._read(stream)
        if current is None:
            raise HistoryUnavailable(f"stream has no history (epoch {epoch!r} is gone)")
        if epoch != current:
            raise HistoryUnavailable(f"epoch {epoch!r} is gone (now {current!r})")
        if offset > last:
            raise HistoryUnavailable(f"offset {offset} is ahead of the stream ({last})")
        if offset == last:
            return []
        if not entries or entries[0].offset > offset + 1:
            raise HistoryUnavailable(f"offset {offset} is out of the history window")
        found = [entry for entry in entries if entry.offset > offset]
        await self._barrier(stream, current, found)
        return found

    async def history_since_time(self, stream: str, since: float) -> list[HistoryEntry]:
        """Entries published at or after unix time *since* that are still kept."""
        current, _last, _now, entries = await self._read(stream)
        found = [entry for entry in entries if entry.time >= since]
        if current is not None:
            await self._barrier(stream, current, found)
        return found

    async def _barrier(self, stream: str, epoch: str, found: list[HistoryEntry]) -> None:
        """Wait until pub/sub has delivered every entry of *found* to this node (bounded),
        so that a connection never gets a message both as history and live."""
        if not found or not self.connected or stream not in self.streams:
            return
        delivered = self._delivered.get(stream)
        if delivered is not None and delivered[0] == epoch and delivered[1] >= found[-1].offset:
            return
        self._marker_sent += 1
        token = self._marker_sent
        try:
            with trio.fail_after(self.barrier_timeout):
                await self._script(
                    _MARKER, [self.meta_key(stream)], [self.ping_channel, b"M%d" % token]
                )
                while token not in self._markers_seen and self.connected:
                    await self._marker_event.wait()
                self._markers_seen.discard(token)
        except (trio.TooSlowError, Exception) as exc:
            self.stats["barrier_timeouts"] += 1
            log.info("read barrier on %r gave up: %s", stream[:200], _describe(exc))

    def _wake_barriers(self) -> None:
        self._marker_event.set()
        self._marker_event = trio.Event()

    # -- sessions ------------------------------------------------------------------------

    async def save_session(self, sid: str, data: dict[str, Any], ttl: float) -> None:
        """``SET`` the session with a TTL (idempotent).  The total is Redis' to bound
        (``maxmemory`` with a ``volatile-*`` policy: every session key has a TTL)."""
        text = encode_session(data, self.session_max_size)
        with trio.fail_after(self.command_timeout + self.connect_timeout):
            await self.client.set(self.session_key(sid), text, px=max(1, int(ttl * 1000)))

    async def take_session(self, sid: str) -> dict[str, Any] | None:
        """``GETDEL``: a session restores at most once, on whichever node."""
        with trio.fail_after(self.command_timeout + self.connect_timeout):
            raw = await self.client.getdel(self.session_key(sid))
        if raw is None:
            return None
        data = json.loads(raw)
        return data if isinstance(data, dict) else None

    # -- the workers of one supervisor (trio_cable.server.cluster) ---------------------

    def workers_key(self, group: str) -> str:
        """The hash holding the metrics snapshots of supervisor *group*'s workers."""
        return f"{self.prefix}:workers:{group}"

    async def put_worker_snapshot(self, group: str, member: str, text: str, ttl: float) -> bool:
        """Store worker *member*'s snapshot (JSON with a ``counters`` object); False when
        *member* was retired meanwhile (see :meth:`retire_worker_snapshot`)."""
        args = [member, text, max(1, int(ttl * 1000))]
        with trio.fail_after(self.command_timeout + self.connect_timeout):
            stored = await self._script(_PUT_SNAPSHOT, [self.workers_key(group)], args)
        return bool(stored)

    async def worker_snapshots(self, group: str) -> dict[str, str]:
        """Every field of *group*'s hash: member -> snapshot, ``retired``, ``gone:*``."""
        with trio.fail_after(self.command_timeout + self.connect_timeout):
            raw = await self.client.hgetall(self.workers_key(group))
        return {_text(k): _text(v) for k, v in raw.items()}

    async def retire_worker_snapshot(
        self, group: str, member: str, expected: str | None = None
    ) -> bool:
        """Add *member*'s counters to the group's ``retired`` total and forget it (only if
        its snapshot is still *expected*, when given); True when this call did it."""
        args = [member, expected or ""]
        with trio.fail_after(self.command_timeout + self.connect_timeout):
            done = await self._script(_RETIRE_SNAPSHOT, [self.workers_key(group)], args)
        return bool(done)

    # -- for tests and tools ------------------------------------------------------------

    async def stream_position(self, stream: str) -> tuple[str | None, int]:
        """(epoch, last offset) of *stream*; epoch ``None`` when it has none."""
        epoch, last, _now, _entries = await self._read(stream)
        return epoch, last
