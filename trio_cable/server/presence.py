"""Presence events under load: coalesced per stream and window, sans I/O.

A quiet stream's presence event goes out at once.  It opens a window (``window`` seconds,
0.1 by default) during which the stream's further events are held; when the window ends they
go out as their net difference per presence id, and the next window opens if any were held.
So a burst (a node draining, a restart, a classroom arriving) costs each member at most the
ids that really changed, once per window, and an id that left and came back within one
window costs nothing:

============================  ===========================================
held in one window, per id    sent when it ends
============================  ===========================================
join ... leave                nothing (absent before and after)
leave ... join                the last ``join`` (its info may have changed)
join ... join                 the last ``join``
leave ... leave               one ``leave``
============================  ===========================================

The net difference goes out as individual ``join``/``leave`` events, not as one batched
message: ``@anycable/core``'s presence state (``channel.presence``) applies only ``join`` and
``leave`` messages (and ``info`` before its first state), so a batch would silently leave
its members list stale.  The events of one window are fanned out back to back, so the hub
writes them to each member with one ``send``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from trio_cable.protocol.cable import BroadcastEncoder, presence_info

__all__ = ["DEFAULT_WINDOW", "InfoAnswers", "PresenceCoalescer"]

#: Seconds a stream's presence events are held after one went out.
DEFAULT_WINDOW = 0.1


@dataclass(slots=True)
class _Window:
    until: float
    # presence id -> (type of its first held event, its last held event)
    held: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)


class PresenceCoalescer:
    """Per stream windows of presence events (see the module docstring)."""

    def __init__(self, window: float = DEFAULT_WINDOW) -> None:
        self.window = window
        self._windows: dict[str, _Window] = {}
        #: Events that were held and then cancelled or merged (not sent).
        self.coalesced = 0

    def offer(self, stream: str, event: dict[str, Any], now: float) -> bool:
        """True: send *event* now; False: it is held until :meth:`due` returns it (or what
        it nets out to)."""
        if self.window <= 0:
            return True
        window = self._windows.get(stream)
        if window is None or (window.until <= now and not window.held):
            self._windows[stream] = _Window(now + self.window)
            return True
        pid = str(event.get("id"))
        earlier = window.held.get(pid)
        if earlier is None:
            window.held[pid] = (str(event.get("type")), event)
        else:
            self.coalesced += 1
            window.held[pid] = (earlier[0], event)
        return False

    @property
    def next_deadline(self) -> float | None:
        """When the earliest window ends (None: no window is open)."""
        if not self._windows:
            return None
        return min(window.until for window in self._windows.values())

    def due(self, now: float) -> list[tuple[str, list[dict[str, Any]]]]:
        """The net events of every window that ended by *now*, per stream; a window that
        held events is followed by another (the burst may go on)."""
        out: list[tuple[str, list[dict[str, Any]]]] = []
        for stream, window in list(self._windows.items()):
            if window.until > now:
                continue
            if not window.held:
                del self._windows[stream]
                continue
            events = []
            for first, last in window.held.values():
                if first == "join" and last.get("type") == "leave":
                    self.coalesced += 1  # came and went: nobody needs to know
                    continue
                events.append(last)
            self._windows[stream] = _Window(now + self.window)
            if events:
                out.append((stream, events))
        return out


class InfoAnswers:
    """The encoded ``info`` answer of each stream, built once per change of its presence.

    A broker that keeps its records (the memory broker) returns the same list object until
    the set changes; while it does, every ``presence`` command of that stream is answered
    with the bytes encoded the first time (per codec and identifier): at 10,000 members that
    is a copy of a few hundred kilobytes instead of encoding 10,000 records."""

    #: Streams remembered at most (an answer is kept for the streams asked most recently).
    LIMIT = 1024

    def __init__(self) -> None:
        self._answers: dict[
            tuple[str, bool], tuple[list[dict[str, Any]], int, BroadcastEncoder]
        ] = {}

    def encoder(
        self, stream: str, total: int, records: list[dict[str, Any]], with_records: bool
    ) -> BroadcastEncoder:
        """The answer for ``(total, records)`` of *stream*, encoded once while unchanged."""
        key = (stream, with_records)
        answers = self._answers
        kept = answers.pop(key, None)
        if kept is None or kept[0] is not records or kept[1] != total:
            message = presence_info(total, records if with_records else None)
            kept = (records, total, BroadcastEncoder(message, decode=False, kind="presence"))
        answers[key] = kept  # now the most recently asked
        if len(answers) > self.LIMIT:
            del answers[next(iter(answers))]
        return kept[2]
