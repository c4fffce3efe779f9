"""Presence sets, sans I/O: who is present on each stream, de-duplicated by presence id.

One record per (stream, session): the presence id the session joined as, and its info.  The
same id may be held by several sessions (one user, several tabs or devices); the set tells
the others only when an id is new to the stream (``join``) and when its last session goes
(``leave``).  A disconnected session does not leave at once: it *lingers* until a deadline
(the presence TTL), so a client that reconnects meanwhile, as a new session, holds its id
again before the old record expires, and nobody hears of it.

The in-memory broker keeps one :class:`PresenceState`; the Redis broker keeps the same
structure in Redis (``trio_cable/broker/redis.py``).  Events are returned, never sent: the
caller delivers them.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from trio_cable.protocol.cable import presence_join, presence_leave

__all__ = ["PresenceSet", "PresenceState"]


@dataclass(slots=True)
class PresenceSet:
    """The presence of one stream."""

    #: sid -> (presence id, info); an info of None means none was given.
    sessions: dict[str, tuple[str, Any]] = field(default_factory=dict)
    #: presence id -> sessions holding it.
    holders: dict[str, int] = field(default_factory=dict)
    #: presence id -> its latest info.
    infos: dict[str, Any] = field(default_factory=dict)
    # The records of an info answer, built once per change: asking is then cheap however
    # many members there are (a client asks on every (re)subscribe).
    _records: list[dict[str, Any]] | None = None

    def records(self) -> list[dict[str, Any]]:
        """``[{"info": ..., "id": ...}, ...]`` in join order (``info`` left out when None)."""
        if self._records is None:
            self._records = [
                {"id": pid} if info is None else {"info": info, "id": pid}
                for pid, info in self.infos.items()
            ]
        return self._records


class PresenceState:
    """Every stream's :class:`PresenceSet`, and the lingering records' deadlines."""

    def __init__(self) -> None:
        self.streams: dict[str, PresenceSet] = {}
        # (stream, sid) -> deadline of a lingering record; the heap orders them (entries
        # whose record joined again or left are skipped when they come up).
        self._lingering: dict[tuple[str, str], float] = {}
        self._deadlines: list[tuple[float, str, str]] = []

    def join(self, stream: str, sid: str, pid: str, info: Any = None) -> dict[str, Any] | None:
        """Session *sid* is present on *stream* as *pid*; the ``join`` event when *pid* is
        new to the stream.  A session that joined already (as this id: the caller refuses
        another) updates its info; a lingering one is live again."""
        self._lingering.pop((stream, sid), None)
        pset = self.streams.get(stream)
        if pset is None:
            pset = self.streams[stream] = PresenceSet()
        old = pset.sessions.get(sid)
        pset.sessions[sid] = (pid, info)
        pset._records = None
        if old is not None and old[0] == pid:
            pset.infos[pid] = info
            return None
        if old is not None:
            self._release(stream, pset, old[0])
        count = pset.holders.get(pid, 0)
        pset.holders[pid] = count + 1
        pset.infos[pid] = info
        return presence_join(pid, info) if count == 0 else None

    def leave(self, stream: str, sid: str) -> dict[str, Any] | None:
        """Session *sid* left *stream*'s presence; the ``leave`` event when it held its id
        last."""
        self._lingering.pop((stream, sid), None)
        pset = self.streams.get(stream)
        if pset is None:
            return None
        record = pset.sessions.pop(sid, None)
        if record is None:
            return None
        pset._records = None
        return self._release(stream, pset, record[0])

    def _release(self, stream: str, pset: PresenceSet, pid: str) -> dict[str, Any] | None:
        count = pset.holders.get(pid, 0) - 1
        if count > 0:
            pset.holders[pid] = count
            return None
        pset.holders.pop(pid, None)
        pset.infos.pop(pid, None)
        if not pset.sessions:
            del self.streams[stream]
        return presence_leave(pid)

    def linger(self, stream: str, sid: str, deadline: float) -> None:
        """Session *sid* disconnected: its record stays until *deadline* (unless it joins or
        leaves before), then :meth:`expire` removes it."""
        pset = self.streams.get(stream)
        if pset is None or sid not in pset.sessions:
            return
        self._lingering[(stream, sid)] = deadline
        heapq.heappush(self._deadlines, (deadline, stream, sid))

    def expire(self, now: float, limit: int = 1000) -> list[tuple[str, dict[str, Any]]]:
        """Remove up to *limit* records whose linger ended by *now*: ``(stream, leave event)``
        for each id that had no other session."""
        events: list[tuple[str, dict[str, Any]]] = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now and limit > 0:
            deadline, stream, sid = heapq.heappop(deadlines)
            if self._lingering.get((stream, sid)) != deadline:
                continue  # joined again, left, or lingering with a later deadline
            limit -= 1
            event = self.leave(stream, sid)
            if event is not None:
                events.append((stream, event))
        return events

    def info(self, stream: str) -> tuple[int, list[dict[str, Any]]]:
        """``(total, records)`` of *stream* (the records list is shared: do not change it)."""
        pset = self.streams.get(stream)
        if pset is None:
            return 0, []
        return len(pset.holders), pset.records()

    @property
    def lingering(self) -> int:
        """Records waiting for their linger to end."""
        return len(self._lingering)
