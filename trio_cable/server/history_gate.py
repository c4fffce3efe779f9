"""The history gate: what a session holds back while history is pending, sans I/O.

A client that asks for history (with ``subscribe``, with ``history``, or by being restored
and then asking) must get the stored messages first and each message once: live broadcasts
that arrive meanwhile may not overtake the history, and those the history already covered
must not be sent again.  While history is pending, everything the session would write
passes through the gate instead:

* broadcasts wait, with their stream position, until the gate is released; those at or
  below what history sent of their stream are then dropped;
* anything else (transmissions, confirmations) waits too, but goes out as soon as the
  history itself starts (:meth:`take_unicasts`), so a ``confirm_subscription`` precedes the
  history it asked for.

After a restore the gate also waits for the client to ask history for each restored
subscription (:attr:`awaiting`), however long that takes: on a busy machine the request can
come seconds after the welcome, and a timer would let live messages overtake the history.
What bounds the wait is memory: :meth:`hold` says when the held bytes pass the limit, and
the session then releases the gate (the client gets its messages live, and asks history as
usual for what it missed).

Invariant: every held frame is written exactly once, or dropped because history covered it;
:meth:`release` empties the gate, and the session discards the gate object afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["HistoryGate"]


class HistoryGate:
    """Frames held for one session while history is pending."""

    __slots__ = ("_bytes", "_held", "_sent", "awaiting", "limit")

    def __init__(self, awaiting: Iterable[str] = (), limit: int = 1 << 62) -> None:
        """*awaiting*: identifiers of restored subscriptions whose history the client is
        expected to ask; *limit*: the held bytes past which the gate must be released."""
        # (frame, stream, offset); stream and offset are None for anything not a broadcast.
        self._held: list[tuple[bytes, str | None, int | None]] = []
        self._bytes = 0
        self._sent: dict[str, int] = {}  # stream -> highest offset sent as history
        self.awaiting: set[str] = set(awaiting)
        self.limit = limit

    def __len__(self) -> int:
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        """The size of what is held."""
        return self._bytes

    def hold(self, frame: bytes, stream: str | None = None, offset: int | None = None) -> bool:
        """Keep *frame* back; *stream* and *offset* say it is that broadcast.  True when the
        held bytes are now over the limit: release the gate."""
        self._held.append((frame, stream, offset))
        self._bytes += len(frame)
        return self._bytes > self.limit

    def take_unicasts(self) -> list[bytes]:
        """Remove and return what is held that is not a broadcast, in order (history is
        starting: those go first)."""
        unicasts = [frame for frame, stream, _ in self._held if stream is None]
        if unicasts:
            self._held = [item for item in self._held if item[1] is not None]
            self._bytes -= sum(len(frame) for frame in unicasts)
        return unicasts

    def sent_as_history(self, stream: str, offset: int) -> None:
        """History delivered *stream*'s message at *offset*."""
        if offset > self._sent.get(stream, 0):
            self._sent[stream] = offset

    def answered(self, identifier: str) -> bool:
        """The history request of *identifier* was answered (confirmed or rejected); True
        when nothing more is awaited, i.e. the gate should be released now."""
        self.awaiting.discard(identifier)
        return not self.awaiting

    def release(self) -> list[bytes]:
        """Empty the gate: the held frames to write now, in order, minus the broadcasts that
        history already delivered."""
        held, self._held = self._held, []
        self._bytes = 0
        sent = self._sent
        return [
            frame
            for frame, stream, offset in held
            if stream is None or offset is None or offset > sent.get(stream, 0)
        ]
