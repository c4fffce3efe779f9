"""The embedded in-memory broker: nothing to install.

It keeps each stream's recent messages (for reliable streams) and resumable sessions in this
process.  Several :class:`~trio_cable.server.Server` nodes in one process may share one
instance, which then behaves like a tiny cluster (tests and benchmarks use that to move clients
from a draining node to a fresh one).  History and sessions do not survive the process: a
restart gives every stream a new epoch, so clients are told (``reject_history``) instead of
silently missing messages.
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
    Broadcast,
    HistoryEntry,
    HistoryUnavailable,
    LocalNodes,
)

# Sweep expired sessions and idle histories every this many writes, so memory stays bounded
# without a background task.
_SWEEP_EVERY = 1024


@dataclass
class _StreamHistory:
    epoch: str
    next_offset: int = 1
    entries: deque[HistoryEntry] = field(default_factory=deque)
    last_time: float = 0.0


class MemoryBroker(LocalNodes):
    """Broadcast fan-out, stream history and sessions inside this process.

    ``history_limit`` messages per stream are kept for ``history_ttl`` seconds.  ``clock``
    (unix seconds) can be replaced in tests.
    """

    def __init__(
        self,
        *,
        history_limit: int = 100,
        history_ttl: float = 300.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.history_limit = history_limit
        self.history_ttl = history_ttl
        self.clock = clock
        #: Changes whenever history is lost; a new broker is a new epoch.
        self.epoch = secrets.token_hex(4)
        self._histories: dict[str, _StreamHistory] = {}
        # Sessions are kept as JSON text, as Redis keeps them: what is taken is a snapshot of
        # what was saved (never a live object of the connection that saved it), and one
        # string per session is nothing for the cyclic GC to walk, where the dicts and lists
        # of 10,000 sessions were a fifth of the server's tracked objects.
        self._sessions: dict[str, tuple[float, str]] = {}
        self._writes = 0
        # Idle streams are forgotten (memory stays bounded however many stream names are
        # used); a stream that comes back after that gets a new epoch, so that positions
        # from its first life are refused instead of pointing into the new one.
        self._generation = 0

    # -- nodes ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Nothing to connect to: ready at once."""
        task_status.started()
        await trio.sleep_forever()

    # -- publishing ----------------------------------------------------------------------

    async def publish(self, stream: str, data: Any, exclude_socket: str | None = None) -> None:
        broadcast = self.store(stream, data, exclude_socket)
        for deliver in list(self._nodes):
            deliver(broadcast)

    def store(self, stream: str, data: Any, exclude_socket: str | None = None) -> Broadcast:
        """Append to the stream's history; return the broadcast with its position."""
        now = self.clock()
        history = self._histories.get(stream)
        if history is None:
            epoch = self.epoch if not self._generation else f"{self.epoch}-{self._generation}"
            history = self._histories[stream] = _StreamHistory(epoch)
        offset = history.next_offset
        history.next_offset += 1
        history.last_time = now
        if self.history_limit > 0:
            entries = history.entries
            entries.append(HistoryEntry(offset, now, data, history.epoch))
            while len(entries) > self.history_limit:
                entries.popleft()
            self._trim(history, now)
        self._count_write(now)
        return Broadcast(stream, data, history.epoch, offset, exclude_socket)

    async def publish_command(self, command: dict[str, Any]) -> None:
        for on_command in list(self._nodes.values()):
            on_command(command)

    # -- history -------------------------------------------------------------------------

    def _trim(self, history: _StreamHistory, now: float) -> None:
        entries = history.entries
        horizon = now - self.history_ttl
        while entries and entries[0].time < horizon:
            entries.popleft()

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
        now = self.clock()
        self._sessions[sid] = (now + ttl, json.dumps(data))
        self._count_write(now)

    async def take_session(self, sid: str) -> dict[str, Any] | None:
        item = self._sessions.pop(sid, None)
        if item is None:
            return None
        expires, text = item
        if expires <= self.clock():
            return None
        data = json.loads(text)
        return data if isinstance(data, dict) else None

    # -- housekeeping --------------------------------------------------------------------

    def _count_write(self, now: float) -> None:
        self._writes += 1
        if self._writes % _SWEEP_EVERY:
            return
        for sid in [s for s, (expires, _) in self._sessions.items() if expires <= now]:
            del self._sessions[sid]
        horizon = now - self.history_ttl
        idle = [s for s, h in self._histories.items() if h.last_time < horizon]
        for stream in idle:
            del self._histories[stream]
        if idle:
            self._generation += 1
