"""Housekeeping rounds, sans I/O: pings spread over their interval, never in one burst."""

from __future__ import annotations

import math
from collections import Counter

from trio_cable.server.housekeeping import PingRounds

SLICE = 0.02


def run(rounds: PingRounds[int], groups: dict[float, set[int]], start: float, seconds: float):
    """Call due() every slice from *start* for *seconds*; the (time, interval, member) list."""
    out = []
    steps = round(seconds / SLICE)
    for step in range(steps):
        now = start + step * SLICE
        out += [(now, interval, member) for interval, member in rounds.due(groups, now)]
    return out


def test_every_member_once_per_interval_and_no_burst() -> None:
    members = set(range(18_000))
    rounds: PingRounds[int] = PingRounds(SLICE)
    handed = run(rounds, {3.0: members}, 0.0, 3.0)
    assert Counter(m for _, _, m in handed) == Counter(members)  # each exactly once
    per_slice = Counter(t for t, _, _ in handed)
    # 18,000 over 150 slices: 120 a slice, never the whole group at once.
    assert max(per_slice.values()) <= math.ceil(18_000 * SLICE / 3.0) + 1
    # The next round starts once the interval is over, and hands out everybody again.
    again = run(rounds, {3.0: members}, 3.0, 3.0)
    assert Counter(m for _, _, m in again) == Counter(members)


def test_a_member_who_joins_mid_round_is_pinged_within_the_interval() -> None:
    members = set(range(300))
    groups = {3.0: members}
    rounds: PingRounds[int] = PingRounds(SLICE)
    first = run(rounds, groups, 0.0, 1.0)
    members.add(999)
    rounds.joined(3.0, 999)
    rest = run(rounds, groups, 1.0, 2.0)
    times = [t for t, _, m in first + rest if m == 999]
    assert len(times) == 1 and times[0] < 3.0


def test_a_member_who_joins_after_the_round_is_handed_out_at_once() -> None:
    members = set(range(10))
    groups = {3.0: members}
    rounds: PingRounds[int] = PingRounds(SLICE)
    run(rounds, groups, 0.0, 2.9)  # the round handed out everybody by now
    members.add(42)
    rounds.joined(3.0, 42)
    assert [m for _, _, m in run(rounds, groups, 2.9, 0.06)] == [42]


def test_groups_of_several_intervals_and_dropped_groups() -> None:
    groups = {1.0: set(range(100)), 5.0: set(range(100, 150))}
    rounds: PingRounds[int] = PingRounds(SLICE)
    handed = run(rounds, groups, 0.0, 5.0)
    counts = Counter((i, m) for _, i, m in handed)
    assert all(counts[(1.0, m)] == 5 for m in range(100))  # once a second, for 5 s
    assert all(counts[(5.0, m)] == 1 for m in range(100, 150))
    del groups[1.0]  # emptied: the node dropped it
    later = run(rounds, groups, 5.0, 5.0)
    assert {i for _, i, _ in later} == {5.0}
