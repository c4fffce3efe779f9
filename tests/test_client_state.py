"""The client's protocol state, sans-I/O: de-duplication, resume plans, message parsing."""

from __future__ import annotations

import json
import random

import msgpack
import pytest

from trio_cable.client import state as proto
from trio_cable.client.state import ClientSession, StreamPosition, make_identifier


def test_identifier_is_compact_and_channel_first() -> None:
    assert make_identifier("Chat", {"room": "é", "a": 1}) == '{"channel":"Chat","room":"é","a":1}'
    with pytest.raises(ValueError):
        make_identifier("")
    with pytest.raises(ValueError):
        make_identifier("Chat", {"channel": "x"})


# -- StreamPosition ------------------------------------------------------------------------------


def test_position_dedups_in_order() -> None:
    pos = StreamPosition("e1")
    assert [pos.add(o) for o in (5, 6, 7, 6, 5, 8)] == [True, True, True, False, False, True]
    assert pos.last_contiguous() == 8


def test_position_accepts_late_history_below_newest() -> None:
    # Live message 12 arrives, then history delivers 8..12: 8..11 are new, 12 is a duplicate.
    pos = StreamPosition("e1")
    for o in (5, 6, 7):
        pos.add(o)
    assert pos.add(12)
    assert pos.last_contiguous() == 7  # history must resume after 7, not after 12
    assert [pos.add(o) for o in (8, 9, 10, 11, 12)] == [True, True, True, True, False]
    assert pos.last_contiguous() == 12


def test_position_window_is_bounded() -> None:
    pos = StreamPosition("e", window=64)
    offsets = list(range(1, 10_001))
    random.Random(1).shuffle(offsets[:500])
    for o in offsets:
        pos.add(o)
    assert len(pos.ahead) <= 64
    assert pos.last_contiguous() == 10_000
    assert not pos.add(9_999)


def test_position_random_order_exactly_once() -> None:
    rng = random.Random(9)
    offsets = list(range(1, 2001))
    stream = offsets + rng.sample(offsets, 800)  # every message, plus 800 re-deliveries
    rng.shuffle(stream)
    pos = StreamPosition("e", window=4096)
    accepted = [o for o in stream if pos.add(o)]
    assert sorted(accepted) == offsets


# -- session: messages ---------------------------------------------------------------------------


def welcomed(subprotocol: str = "actioncable-v1-ext-json", sid: str = "s1") -> ClientSession:
    session = ClientSession(subprotocol)
    session.receive({"type": "welcome", "sid": sid})
    return session


def test_receive_messages() -> None:
    s = welcomed()
    sub = s.add("Chat", {"room": 1})
    ident = sub.identifier
    assert s.receive({"type": "ping", "message": 1700000000}) == proto.Ping(1700000000)
    assert s.history_since() == 1699999999
    assert s.receive({"identifier": ident, "type": "confirm_subscription"}) == proto.Confirmed(
        ident, True
    )
    assert sub.status == "confirmed" and sub.confirmed_once
    assert s.receive({"identifier": ident, "message": {"a": 1}}) == proto.Data(ident, {"a": 1})
    stored = {"identifier": ident, "message": 1, "stream_id": "st", "epoch": "E", "offset": 3}
    assert s.receive(stored) == proto.Data(ident, 1, "st", "E", 3)
    assert s.receive(stored) == proto.Duplicate(ident, "st", "E", 3)
    assert sub.duplicates == 1
    # A new epoch means lost history: the same offset is a new message.
    assert isinstance(s.receive({**stored, "epoch": "F"}), proto.Data)
    assert sub.position_of("st") == ("F", 3)
    assert s.receive({"identifier": "nope", "message": 1}) == proto.Data("nope", 1, known=False)
    assert s.receive({"identifier": ident, "type": "reject_history"}) == proto.HistoryRejected(
        ident
    )
    assert s.receive({"type": "pong"}) == proto.Pong()
    assert isinstance(s.receive({"type": "what"}), proto.Ignored)


def test_reject_removes_subscription() -> None:
    s = welcomed()
    sub = s.add("Chat")
    event = s.receive({"identifier": sub.identifier, "type": "reject_subscription"})
    assert event == proto.Rejected(sub.identifier, True)
    assert sub.status == "rejected" and sub.identifier not in s.subs
    # And it can be subscribed again.
    s.add("Chat")


def test_duplicate_subscription_refused() -> None:
    s = welcomed()
    s.add("Chat", {"x": 1})
    with pytest.raises(ValueError, match="already subscribed"):
        s.add("Chat", {"x": 1})


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            {"type": "disconnect", "reason": "server_restart", "reconnect": True},
            ("server_restart", True, None),
        ),
        (
            {"type": "disconnect", "reason": "x", "reconnect": True, "reconnect_after": 2500},
            ("x", True, 2.5),
        ),
        # The Rails client stops for good without "reconnect": so do we.
        ({"type": "disconnect", "reason": "unauthorized"}, ("unauthorized", False, None)),
        (
            {"type": "disconnect", "reconnect": "yes", "reconnect_after": -1},
            ("unknown", False, None),
        ),
    ],
)
def test_disconnect(message: dict, expected: tuple) -> None:
    event = welcomed().receive(message)
    assert isinstance(event, proto.Disconnect)
    assert (event.reason, event.reconnect, event.reconnect_after) == expected


def test_codecs() -> None:
    s = ClientSession("actioncable-v1-msgpack")
    raw = s.encode(s.subscribe_command("x"))
    assert isinstance(raw, bytes)
    assert msgpack.unpackb(raw) == {"command": "subscribe", "identifier": "x"}
    assert s.decode(msgpack.packb({"type": "ping", "message": 1})) == {"type": "ping", "message": 1}
    with pytest.raises(proto.ProtocolError):
        s.decode('{"type":"ping"}')
    j = ClientSession("actioncable-v1-json")
    assert j.encode(j.message_command("i", "speak", {"t": 1})) == (
        '{"command":"message","identifier":"i","data":"{\\"t\\":1,\\"action\\":\\"speak\\"}"}'
    )
    for bad in (b"{}", "[1]", "{", "NaN"):
        with pytest.raises(proto.ProtocolError):
            j.decode(bad)
    with pytest.raises(ValueError):
        ClientSession("actioncable-v2")


# -- session: reconnect plans --------------------------------------------------------------------


def live_session(subprotocol: str = "actioncable-v1-ext-json") -> tuple[ClientSession, list[str]]:
    """A session with three confirmed subscriptions (one with stream positions) and one
    pending, whose connection was just lost."""
    s = welcomed(subprotocol, sid="old")
    subs = [s.add("Chat", {"room": r}) for r in (1, 2, 3)]
    pending = s.add("Chat", {"room": 4})
    for sub in subs:
        s.receive({"identifier": sub.identifier, "type": "confirm_subscription"})
    s.receive({"type": "ping", "message": 1000})
    for offset in (1, 2, 3, 5):
        s.receive(
            {
                "identifier": subs[0].identifier,
                "message": offset,
                "stream_id": "r1",
                "epoch": "E",
                "offset": offset,
            }
        )
    s.connection_lost()
    assert all(sub.status == "pending" for sub in s.subs.values())
    return s, [sub.identifier for sub in subs] + [pending.identifier]


def test_resume_query_only_on_ext_protocols() -> None:
    s, _ = live_session()
    assert s.resume_query() == {"sid": "old"}
    plain, _ = live_session("actioncable-v1-json")
    assert plain.resume_query() == {}
    assert ClientSession("actioncable-v1-ext-msgpack", resume=False).resume_query() == {}


def test_plan_when_restored() -> None:
    s, ids = live_session()
    stray = make_identifier("Gone", {})
    event = s.receive(
        {"type": "welcome", "sid": "new", "restored": True, "restored_ids": [ids[0], ids[1], stray]}
    )
    assert isinstance(event, proto.Welcome)
    plan = event.plan
    assert plan.restored and plan.sid == "new" and s.sid == "new"
    assert plan.confirmed == (ids[0], ids[1])
    assert s.subs[ids[0]].status == "confirmed"
    # History from the last contiguous position (3: offset 4 is missing), since for the others.
    assert plan.history == (
        (ids[0], {"since": 999, "streams": {"r1": {"epoch": "E", "offset": 3}}}),
        (ids[1], {"since": 999}),
    )
    # Not restored: subscribe again, with history when it had been confirmed before.
    assert plan.subscribe == ((ids[2], {"since": 999}), (ids[3], None))
    assert plan.unsubscribe == (stray,)


def test_plan_when_not_restored_resubscribes_with_history() -> None:
    s, ids = live_session()
    plan = s.receive({"type": "welcome", "sid": "new"}).plan  # type: ignore[union-attr]
    assert not plan.restored and plan.confirmed == () and plan.history == ()
    assert plan.subscribe == (
        (ids[0], {"since": 999, "streams": {"r1": {"epoch": "E", "offset": 3}}}),
        (ids[1], {"since": 999}),
        (ids[2], {"since": 999}),
        (ids[3], None),
    )


def test_plan_on_plain_protocol_has_no_history() -> None:
    s, ids = live_session("actioncable-v1-json")
    # Even if a server claimed a restore, plain protocols do not resume.
    plan = s.receive({"type": "welcome", "sid": "n", "restored": True, "restored_ids": ids}).plan  # type: ignore[union-attr]
    assert not plan.restored
    assert plan.subscribe == tuple((i, None) for i in ids)


def test_resume_end_to_end_sans_io() -> None:
    """A simulated server: messages 1..20 on a stream; the client loses the connection after
    8 (having seen 1..6 and 8), the server restores the session and replays history from the
    requested offset while live messages continue; the client ends with 1..20 exactly once."""
    s = welcomed(sid="a")
    sub = s.add("Feed")
    ident = sub.identifier
    s.receive({"identifier": ident, "type": "confirm_subscription"})
    log = {
        o: {"identifier": ident, "message": o, "stream_id": "f", "epoch": "E", "offset": o}
        for o in range(1, 21)
    }
    delivered: list[int] = []

    def feed(offset: int) -> None:
        event = s.receive(json.loads(json.dumps(log[offset])))
        if isinstance(event, proto.Data):
            delivered.append(event.message)

    for o in (1, 2, 3, 4, 5, 6, 8):
        feed(o)
    s.connection_lost()
    plan = s.receive(
        {"type": "welcome", "sid": "b", "restored": True, "restored_ids": [ident]}
    ).plan  # type: ignore[union-attr]
    ((hist_ident, request),) = plan.history
    assert hist_ident == ident and request["streams"]["f"] == {"epoch": "E", "offset": 6}
    # Live messages 15, 16 race ahead of the history replay (7..16), then live 17..20.
    for o in (15, 16):
        feed(o)
    for o in range(request["streams"]["f"]["offset"] + 1, 17):
        feed(o)
    for o in range(17, 21):
        feed(o)
    assert sorted(delivered) == list(range(1, 21))
    assert len(delivered) == 20
    assert sub.duplicates == 3  # 8, 15, 16 came twice


def test_since_before_any_ping_falls_back_to_our_clock_at_the_first_welcome() -> None:
    """A server that does not ping at once: a subscription with nothing received must still
    be able to ask for what it missed, so ``since`` comes from our clock, with a margin."""
    import time

    before = int(time.time())
    s = ClientSession("actioncable-v1-ext-json")
    assert s.history_since() is None
    s.receive({"type": "welcome", "sid": "a"})
    since = s.history_since()
    assert since is not None and before - 6 <= since <= int(time.time()) - 5
    # A later welcome does not move it; the server's clock wins once known.
    s.connection_lost()
    s.receive({"type": "welcome", "sid": "b"})
    assert s.history_since() == since
    s.receive({"type": "ping", "message": 1700000000})
    assert s.history_since() == 1699999999
