"""The embedded in-memory broker: nothing to install.

It keeps each stream's recent messages (for reliable streams) and resumable sessions in this
process.  Several :class:`~trio_cable.server.Server` nodes in one process may share one
instance, which then behaves like a tiny cluster (tests and benchmarks use that to move clients
from a draining node to a fresh one).  History and sessions do not survive the process: a
restart gives every stream a new epoch, so clients are told (``reject_history``) instead of
silently missing messages.

Memory is bounded however clients and publishers behave: a session is at most
``session_max_size`` bytes and all of them at most ``sessions_max_memory`` (the oldest saved
go first); a stream's history at most ``history_limit`` messages and ``history_max_size``
bytes, all streams' at most ``history_max_memory`` (the least recently published go first,
and come back with a new epoch).  Expired sessions and idle streams are swept on time.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from trio_cable.broker import (
    PRESENCE,
    Broadcast,
    HistoryEntry,
    HistoryUnavailable,
    LocalNodes,
    encode_session,
)
from trio_cable.broker.presence import PresenceState

# How often the sweep of expired sessions and idle streams may run (seconds).
_SWEEP_INTERVAL = 1.0
# How often lingering presence records are looked at (seconds): a linger ends this late.
_PRESENCE_SWEEP_INTERVAL = 0.1
# What a stream's bookkeeping costs beyond its messages (the dict entry, the deque, the
# epoch string): counted so that a flood of distinct stream names is bounded too.
_STREAM_OVERHEAD = 512
# What one stored message costs beyond its data (the entry object, the deque slot).
_ENTRY_OVERHEAD = 96


@dataclass
class _StreamHistory:
    epoch: str
    next_offset: int = 1
    entries: deque[HistoryEntry] = field(default_factory=deque)
    last_time: float = 0.0
    size: int = _STREAM_OVERHEAD  # bytes counted against history_max_memory


def _entry_size(data: Any) -> int:
    return _ENTRY_OVERHEAD + (len(data) if isinstance(data, (str, bytes)) else 64)


class MemoryBroker(LocalNodes):
    """Broadcast fan-out, stream history and sessions inside this process.

    ``clock`` (unix seconds) can be replaced in tests.  See the module docstring for the
    bounds; ``stats`` counts what they evicted.
    """

    def __init__(
        self,
        *,
        history_limit: int = 100,
        history_ttl: float = 300.0,
        history_max_size: int = 1 << 20,
        history_max_memory: int = 256 << 20,
        session_max_size: int = 64 << 10,
        sessions_max_memory: int = 64 << 20,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.history_limit = history_limit
        self.history_ttl = history_ttl
        self.history_max_size = history_max_size
        self.history_max_memory = history_max_memory
        self.session_max_size = session_max_size
        self.sessions_max_memory = sessions_max_memory
        self.clock = clock
        #: Changes whenever history is lost; a new broker is a new epoch.
        self.epoch = secrets.token_hex(4)
        # Least recently published first (a publish moves its stream to the end), so both
        # the idle sweep and the memory bound start at the front.
        self._histories: dict[str, _StreamHistory] = {}
        self._history_bytes = 0
        # Sessions are kept as JSON text, as Redis keeps them: what is taken is a snapshot of
        # what was saved (never a live object of the connection that saved it), and one
        # string per session is nothing for the cyclic GC to walk.  Oldest saved first.
        self._sessions: dict[str, tuple[float, str]] = {}
        self._session_bytes = 0
        self._next_sweep = 0.0
        # Forgotten streams (idle or evicted) come back with a new epoch, so that positions
        # from their first life are refused instead of pointing into the new one.
        self._generation = 0
        #: Presence of every stream (sans I/O: see broker/presence.py).
        self.presence = PresenceState()
        #: What the bounds evicted (exported as ``broker_*_total`` metrics).
        self.stats: dict[str, int] = {
            "sessions_evicted": 0,
            "history_streams_evicted": 0,
        }

    # -- nodes ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to connect to: ready at once; then sweep on time."""
        task_status.started()
        next_sweep = 0.0
        while True:
            await trio.sleep(_PRESENCE_SWEEP_INTERVAL)
            now = self.clock()
            for stream, event in self.presence.expire(now):
                self._deliver_presence(stream, event)
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + _SWEEP_INTERVAL

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, stream: str, data: Any, exclude_socket: str | None = None) -> None:
        broadcast = self.store(stream, data, exclude_socket)
        waits = [wait for deliver in list(self._nodes) if (wait := deliver(broadcast))]
        for wait in waits:
            await wait()  # a big fan-out, written in slices: the publisher is paced by it

    def store(self, stream: str, data: Any, exclude_socket: str | None = None) -> Broadcast:
        """Append to the stream's history; return the broadcast with its position."""
        now = self.clock()
        self._maybe_sweep(now)
        histories = self._histories
        history = histories.pop(stream, None)
        if history is None:
            epoch = self.epoch if not self._generation else f"{self.epoch}-{self._generation}"
            history = _StreamHistory(epoch)
            self._history_bytes += history.size
        histories[stream] = history  # now the most recently published
        offset = history.next_offset
        history.next_offset += 1
        history.last_time = now
        if self.history_limit > 0:
            entries = history.entries
            size = _entry_size(data)
            entries.append(HistoryEntry(offset, now, data, history.epoch))
            history.size += size
            self._history_bytes += size
            while entries and (
                len(entries) > self.history_limit or history.size > self.history_max_size
            ):
                self._drop_oldest(history)
            self._trim(history, now)
            self._bound_histories(stream)
        return Broadcast(stream, data, history.epoch, offset, exclude_socket)

    async def publish_command(self, command: dict[str, Any]) -> None:
        for on_command in list(self._nodes.values()):
            on_command(command)

    async def publish_transient(
        self,
        stream: str,
        data: Any,
        *,
        exclude_socket: str | None = None,
        kind: str | None = None,
    ) -> None:
        broadcast = Broadcast(stream, data, None, None, exclude_socket, kind)
        waits = [wait for deliver in list(self._nodes) if (wait := deliver(broadcast))]
        for wait in waits:
            await wait()

    # -- presence ------------------------------------------------------------------------

    def _deliver_presence(self, stream: str, event: dict[str, Any] | None) -> None:
        if event is not None:
            broadcast = Broadcast(stream, json.dumps(event), kind=PRESENCE)
            for deliver in list(self._nodes):
                deliver(broadcast)  # (presence events are few: no pacing by fan-outs)

    async def presence_join(self, stream: str, sid: str, pid: str, info: Any) -> None:
        self._deliver_presence(stream, self.presence.join(stream, sid, pid, info))

    async def presence_leave(self, stream: str, sid: str) -> None:
        self._deliver_presence(stream, self.presence.leave(stream, sid))

    async def presence_linger(self, stream: str, sid: str, ttl: float) -> None:
        self.presence.linger(stream, sid, self.clock() + ttl)

    async def presence_info(self, stream: str) -> tuple[int, list[dict[str, Any]]]:
        return self.presence.info(stream)

    # -- history -------------------------------------------------------------------------

    def _drop_oldest(self, history: _StreamHistory) -> None:
        size = _entry_size(history.entries.popleft().data)
        history.size -= size
        self._history_bytes -= size

    def _trim(self, history: _StreamHistory, now: float) -> None:
        entries = history.entries
        horizon = now - self.history_ttl
        while entries and entries[0].time < horizon:
            self._drop_oldest(history)

    def _forget_stream(self, stream: str) -> None:
        history = self._histories.pop(stream)
        self._history_bytes -= history.size
        self._generation += 1

    def _bound_histories(self, keep: str) -> None:
        """Evict the least recently published streams while over history_max_memory."""
        while self._history_bytes > self.history_max_memory and len(self._histories) > 1:
            oldest = next(iter(self._histories))
            if oldest == keep:
                break
            self._forget_stream(oldest)
            self.stats["history_streams_evicted"] += 1

    async def history_since_offset(
        self, stream: str, epoch: str, offset: int
    ) -> list[HistoryEntry]:
        history = self._histories.get(stream)
        current = history.epoch if history is not None else self.epoch
        if epoch != current:
            raise HistoryUnavailable(f"epoch {epoch!r} is gone (now {current!r})")
        last = history.next_offset - 1 if history else 0
        if offset > last:
            raise HistoryUnavailable(f"offset {offset} is ahead of the stream ({last})")
        if offset == last:
            return []
        assert history is not None
        self._trim(history, self.clock())
        entries = history.entries
        # Complete or nothing: the message right after the client's offset must still be here.
        if not entries or entries[0].offset > offset + 1:
            raise HistoryUnavailable(f"offset {offset} is out of the history window")
        return [entry for entry in entries if entry.offset > offset]

    async def history_since_time(self, stream: str, since: float) -> list[HistoryEntry]:
        history = self._histories.get(stream)
        if history is None:
            return []
        self._trim(history, self.clock())
        return [entry for entry in history.entries if entry.time >= since]

    # -- sessions ------------------------------------------------------------------------

    async def save_session(self, sid: str, data: dict[str, Any], ttl: float) -> None:
        text = encode_session(data, self.session_max_size)
        now = self.clock()
        self._maybe_sweep(now)
        sessions = self._sessions
        old = sessions.pop(sid, None)
        if old is not None:
            self._session_bytes -= len(old[1])
        sessions[sid] = (now + ttl, text)  # now the newest
        self._session_bytes += len(text)
        while self._session_bytes > self.sessions_max_memory and len(sessions) > 1:
            self._drop_session(next(iter(sessions)))  # the oldest saved
            self.stats["sessions_evicted"] += 1

    def _drop_session(self, sid: str) -> tuple[float, str] | None:
        item = self._sessions.pop(sid, None)
        if item is not None:
            self._session_bytes -= len(item[1])
        return item

    async def take_session(self, sid: str) -> dict[str, Any] | None:
        item = self._drop_session(sid)
        if item is None:
            return None
        expires, text = item
        if expires <= self.clock():
            return None
        data = json.loads(text)
        return data if isinstance(data, dict) else None

    @property
    def sessions_memory(self) -> int:
        """Bytes of stored sessions (their JSON text)."""
        return self._session_bytes

    @property
    def history_memory(self) -> int:
        """Bytes counted for stored history and stream bookkeeping."""
        return self._history_bytes

    # -- housekeeping --------------------------------------------------------------------

    def _maybe_sweep(self, now: float) -> None:
        if now >= self._next_sweep:
            self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget expired sessions and idle streams.  Both are kept oldest first, so the
        sweep stops at the first live one: its cost is what it removes."""
        self._next_sweep = now + _SWEEP_INTERVAL
        sessions = self._sessions
        while sessions:
            sid, (expires, _) = next(iter(sessions.items()))
            if expires > now:
                break  # (sessions saved with a longer ttl wait for their turn; take checks)
            self._drop_session(sid)
        horizon = now - self.history_ttl
        histories = self._histories
        while histories:
            stream, history = next(iter(histories.items()))
            if history.last_time >= horizon:
                break
            self._forget_stream(stream)
