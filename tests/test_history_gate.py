"""The history gate, sans I/O: what waits while history is pending, and what goes out."""

from __future__ import annotations

from trio_cable.server.history_gate import HistoryGate


def test_release_keeps_order_and_drops_what_history_delivered() -> None:
    gate = HistoryGate()
    gate.hold(b"confirm")
    gate.hold(b"s1-4", "s1", 4)
    gate.hold(b"s2-1", "s2", 1)
    gate.hold(b"s1-5", "s1", 5)
    gate.hold(b"transmit")
    gate.sent_as_history("s1", 3)
    gate.sent_as_history("s1", 4)  # history reached offset 4 of s1: the live copy is dropped
    assert gate.release() == [b"confirm", b"s2-1", b"s1-5", b"transmit"]
    assert gate.release() == []  # a released gate is empty


def test_unicasts_go_first_broadcasts_keep_waiting() -> None:
    gate = HistoryGate()
    gate.hold(b"confirm")
    gate.hold(b"live-1", "s", 1)
    gate.hold(b"ping")
    assert gate.take_unicasts() == [b"confirm", b"ping"]
    assert len(gate) == 1
    assert gate.take_unicasts() == []
    assert gate.release() == [b"live-1"]


def test_offsets_only_move_forward() -> None:
    gate = HistoryGate()
    gate.sent_as_history("s", 7)
    gate.sent_as_history("s", 2)  # history sorted by time may revisit a lower offset
    gate.hold(b"s-7", "s", 7)
    gate.hold(b"s-8", "s", 8)
    assert gate.release() == [b"s-8"]


def test_a_restore_waits_for_every_restored_subscription() -> None:
    gate = HistoryGate(["a", "b"])
    assert gate.awaiting == {"a", "b"}
    assert gate.answered("a") is False
    assert gate.answered("a") is False  # answering twice changes nothing
    assert gate.answered("b") is True
    # Without a restore nothing is awaited: the first answer releases.
    assert HistoryGate().answered("x") is True


def test_unpositioned_frames_are_never_dropped() -> None:
    gate = HistoryGate()
    gate.sent_as_history("s", 10)
    gate.hold(b"unicast-on-s", None, 3)
    gate.hold(b"no-offset", "s", None)  # a broadcast of a stream without history
    assert gate.release() == [b"unicast-on-s", b"no-offset"]


def test_the_wait_is_bounded_in_bytes_not_time() -> None:
    gate = HistoryGate(["a"], limit=10)
    assert gate.hold(b"12345", "s", 1) is False
    assert gate.hold(b"12345", "s", 2) is False  # exactly at the limit: still fine
    assert gate.held_bytes == 10
    assert gate.hold(b"x") is True  # over it: the session must release now
    assert gate.take_unicasts() == [b"x"]
    assert gate.held_bytes == 10
    assert gate.release() == [b"12345", b"12345"]
    assert gate.held_bytes == 0
