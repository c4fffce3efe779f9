"""Periodic work over every connection, spread out so that it never runs in one burst.

Pinging 18,000 connections in one go froze the event loop for 336-495 ms every 3 s (about
25 µs each): half a second of latency for every broadcast, command and pong of every client.
Here each ping group's interval is one *round*: the round's members are walked a slice at a
time, so that by any moment of the round the share of members pinged is the share of the
interval gone by.  Every connection is still pinged once per interval; no slice does more
than ``members x slice / interval`` of them.  Nothing here does I/O: :class:`PingRounds`
only says who is due, and the node pings them.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["PingRounds"]

S = TypeVar("S", bound=Hashable)


@dataclass(eq=False)
class _Round(Generic[S]):
    started: float
    members: list[S] = field(default_factory=list)
    done: int = 0  # members[:done] were handed out


class PingRounds(Generic[S]):
    """Which members of which ping group are due, round after round.

    A round is a snapshot of its group taken when the round starts (members that leave meanwhile
    are handed out anyway, for the caller to skip); members that join during a round are added
    to its end by :meth:`joined`, so that they, too, are pinged within one interval.
    """

    def __init__(self, slice_seconds: float) -> None:
        """*slice_seconds*: how often :meth:`due` is called (the rounds are cut to it)."""
        self.slice = slice_seconds
        self._rounds: dict[float, _Round[S]] = {}

    def joined(self, interval: float, member: S) -> None:
        """*member* joined the group of *interval* (after the node added it there)."""
        current = self._rounds.get(interval)
        if current is not None:
            current.members.append(member)

    def due(self, groups: Mapping[float, set[S]], now: float) -> Iterator[tuple[float, S]]:
        """The ``(interval, member)`` pairs due now; call it every :attr:`slice` seconds."""
        rounds = self._rounds
        for interval in [i for i in rounds if i not in groups]:
            del rounds[interval]  # the group emptied and was dropped
        for interval, group in groups.items():
            current = rounds.get(interval)
            if current is None or (
                current.done >= len(current.members) and now >= current.started + interval
            ):
                current = rounds[interval] = _Round(now, list(group))
            members = current.members
            # Everybody due by the end of this slice, in proportion to the round's progress.
            share = min(1.0, (now - current.started + self.slice) / interval)
            target = min(len(members), math.ceil(len(members) * share))
            for member in members[current.done : target]:
                yield interval, member
            current.done = max(current.done, target)
            if current.done >= len(members):
                # All handed out: let go of them (the departed among them too); members that
                # join before the next round are added here and handed out at once.
                current.members = []
                current.done = 0
