"""The client's protocol state, sans-I/O: de-duplication, resume plans, message parsing."""

from __future__ import annotations

import json
import random
from typing import Any

import msgpack
import pytest

from trio_cable.client import state as proto
from trio_cable.client.state import ClientSession, make_identifier


def test_identifier_is_compact_and_channel_first() -> None:
    assert make_identifier("Chat", {"room": "é", "a": 1}) == '{"channel":"Chat","room":"é","a":1}'
    with pytest.raises(ValueError):
        make_identifier("")
    with pytest.raises(ValueError):
        make_identifier("Chat", {"channel": "x"})


# -- session: messages ---------------------------------------------------------------------------


def one(events: list[proto.Event]) -> proto.Event:
    """The one event a message caused."""
    assert len(events) == 1, events
    return events[0]


def welcome_plan(events: list[proto.Event]) -> proto.WelcomePlan:
    event = one(events)
    assert isinstance(event, proto.Welcome)
    return event.plan


def welcomed(subprotocol: str = "actioncable-v1-ext-json", sid: str = "s1") -> ClientSession:
    session = ClientSession(subprotocol)
    session.receive({"type": "welcome", "sid": sid})
    return session


def test_receive_messages() -> None:
    s = welcomed()
    sub = s.add("Chat", {"room": 1})
    ident = sub.identifier
    assert s.receive({"type": "ping", "message": 1700000000}) == [proto.Ping(1700000000)]
    assert s.history_since() == 1699999999
    assert s.receive({"identifier": ident, "type": "confirm_subscription"}) == [
        proto.Confirmed(ident, True)
    ]
    assert sub.status == "confirmed" and sub.confirmed_once
    assert s.receive({"identifier": ident, "message": {"a": 1}}) == [proto.Data(ident, {"a": 1})]
    stored = {"identifier": ident, "message": 1, "stream_id": "st", "epoch": "E", "offset": 3}
    assert s.receive(stored) == [proto.Data(ident, 1, "st", "E", 3)]
    assert s.receive(stored) == [proto.Duplicate(ident, "st", "E", 3)]
    assert sub.duplicates == 1
    # A new epoch means lost history: the same offset is a new message.
    assert [type(e) for e in s.receive({**stored, "epoch": "F"})] == [proto.Data]
    assert sub.position_of("st") == ("F", 3)
    assert s.receive({"identifier": "nope", "message": 1}) == [proto.Data("nope", 1, known=False)]
    assert s.receive({"identifier": ident, "type": "reject_history"}) == [
        proto.HistoryRejected(ident)
    ]
    assert s.receive({"type": "pong"}) == [proto.Pong()]
    assert isinstance(one(s.receive({"type": "what"})), proto.Ignored)


def test_reject_removes_subscription() -> None:
    s = welcomed()
    sub = s.add("Chat")
    event = one(s.receive({"identifier": sub.identifier, "type": "reject_subscription"}))
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
    event = one(welcomed().receive(message))
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
    event = one(
        s.receive(
            {
                "type": "welcome",
                "sid": "new",
                "restored": True,
                "restored_ids": [ids[0], ids[1], stray],
            }
        )
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
    plan = welcome_plan(s.receive({"type": "welcome", "sid": "new"}))
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
    plan = welcome_plan(
        s.receive({"type": "welcome", "sid": "n", "restored": True, "restored_ids": ids})
    )
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
        for event in s.receive(json.loads(json.dumps(log[offset]))):
            if isinstance(event, proto.Data):
                delivered.append(event.message)

    for o in (1, 2, 3, 4, 5, 6, 8):
        feed(o)
    s.connection_lost()
    plan = welcome_plan(
        s.receive({"type": "welcome", "sid": "b", "restored": True, "restored_ids": [ident]})
    )
    ((hist_ident, request),) = plan.history
    assert hist_ident == ident and request["streams"]["f"] == {"epoch": "E", "offset": 6}
    # Live messages 15, 16 race ahead of the history replay (7..16), then live 17..20.
    for o in (15, 16):
        feed(o)
    for o in range(request["streams"]["f"]["offset"] + 1, 17):
        feed(o)
    for o in range(17, 21):
        feed(o)
    assert delivered == list(range(1, 21))  # in order, once
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


# -- session: ordered delivery -------------------------------------------------------------------


def stored(ident: str, offset: int, epoch: str = "E", stream: str = "s") -> dict:
    return {
        "identifier": ident,
        "message": offset,
        "stream_id": stream,
        "epoch": epoch,
        "offset": offset,
    }


def subscribed(**session: Any) -> tuple[ClientSession, str]:
    s = ClientSession("actioncable-v1-ext-json", **session)
    s.receive({"type": "welcome", "sid": "a"}, 0.0)
    ident = s.add("Feed").identifier
    s.receive({"identifier": ident, "type": "confirm_subscription"}, 0.0)
    return s, ident


def offsets(events: list[proto.Event]) -> list[Any]:
    """What the application sees: offsets delivered, and ("missing", first, last, reason)."""
    seen: list[Any] = []
    for e in events:
        if isinstance(e, proto.Data):
            seen.append(e.offset)
        elif isinstance(e, proto.Missing):
            seen.append(("missing", e.first, e.last, e.reason))
    return seen


def test_a_gap_is_held_and_fetched_then_delivered_in_order() -> None:
    s, ident = subscribed()
    assert offsets(s.receive(stored(ident, 1), 0.0) + s.receive(stored(ident, 2), 0.0)) == [1, 2]
    events = s.receive(stored(ident, 4), 1.0)
    assert events == [
        proto.Held(ident, "s", "E", 4),
        proto.HistoryNeeded(ident, {"streams": {"s": {"epoch": "E", "offset": 2}}}),
    ]
    assert s.next_deadline() == 1.0 + s.gap_timeout
    # More early ones wait without a second request; a duplicate of a held one is dropped.
    assert s.receive(stored(ident, 5), 1.1) == [proto.Held(ident, "s", "E", 5)]
    assert s.receive(stored(ident, 4), 1.1) == [proto.Duplicate(ident, "s", "E", 4)]
    # The history: 3 unblocks 3, 4, 5; its 4 and 5 are duplicates.
    got = s.receive(stored(ident, 3), 1.2)
    assert offsets(got) == [3, 4, 5]
    assert [type(e) for e in s.receive(stored(ident, 4), 1.2)] == [proto.Duplicate]
    assert s.receive({"identifier": ident, "type": "confirm_history"}, 1.3) == [
        proto.HistoryConfirmed(ident)
    ]
    assert s.next_deadline() is None
    assert offsets(s.receive(stored(ident, 6), 1.4)) == [6]
    assert s.subs[ident].received == 6 and s.subs[ident].position_of("s") == ("E", 6)


def test_history_that_lacks_the_gap_gives_it_up() -> None:
    s, ident = subscribed()
    s.receive(stored(ident, 1), 0.0)
    s.receive(stored(ident, 4), 0.0)  # asks from 1
    s.receive(stored(ident, 4), 0.1)  # the history has 4 only
    events = s.receive({"identifier": ident, "type": "confirm_history"}, 0.2)
    assert events[0] == proto.HistoryConfirmed(ident)
    assert offsets(events) == [("missing", 2, 3, "not_in_history"), 4]
    assert events[1] == proto.Missing(ident, "s", "E", 2, 3, "not_in_history")


def test_rejected_history_gives_the_gap_up() -> None:
    s, ident = subscribed()
    s.receive(stored(ident, 1), 0.0)
    s.receive(stored(ident, 3), 0.0)
    s.receive(stored(ident, 5), 0.0)
    events = s.receive({"identifier": ident, "type": "reject_history"}, 0.1)
    # The request covered the gap below 3; the one below 5 opened after it: asked on its own.
    assert offsets(events) == [("missing", 2, 2, "history_rejected"), 3]
    assert events[-1] == proto.HistoryNeeded(ident, {"streams": {"s": {"epoch": "E", "offset": 3}}})
    events = s.receive({"identifier": ident, "type": "reject_history"}, 0.2)
    assert offsets(events) == [("missing", 4, 4, "history_rejected"), 5]
    assert offsets(s.receive(stored(ident, 4), 0.3)) == []  # too late: a duplicate now


def test_a_gap_that_opens_while_history_is_on_its_way_is_asked_after_it() -> None:
    """Only what was held when the history was asked is given up if it is not filled; a gap
    above that may simply be newer than the history, and gets a request of its own."""
    s, ident = subscribed()
    s.receive(stored(ident, 1), 0.0)
    assert isinstance(s.receive(stored(ident, 3), 0.0)[-1], proto.HistoryNeeded)
    s.receive(stored(ident, 2), 0.1)  # history: 2, 3
    s.receive(stored(ident, 3), 0.1)
    assert s.receive(stored(ident, 6), 0.2) == [proto.Held(ident, "s", "E", 6)]  # 4, 5 missing
    events = s.receive({"identifier": ident, "type": "confirm_history"}, 0.3)
    assert events[1:] == [
        proto.HistoryNeeded(ident, {"streams": {"s": {"epoch": "E", "offset": 3}}})
    ]
    assert offsets(s.receive(stored(ident, 4), 0.4) + s.receive(stored(ident, 5), 0.4)) == [4, 5, 6]


def test_a_hold_times_out() -> None:
    s, ident = subscribed(gap_timeout=2.0)
    s.receive(stored(ident, 1), 10.0)
    s.receive(stored(ident, 3), 10.0)
    s.receive(stored(ident, 4), 11.0)
    assert s.next_deadline() == 12.0  # from the first hold
    assert s.expire(11.9) == []
    assert offsets(s.expire(12.0)) == [("missing", 2, 2, "timeout"), 3, 4]
    assert s.next_deadline() is None
    # The history comes after all: its 2 is too late, the rest goes on in order.
    assert offsets(s.receive(stored(ident, 2), 12.5)) == []
    assert offsets(s.receive({"identifier": ident, "type": "confirm_history"}, 12.6)) == []
    assert offsets(s.receive(stored(ident, 5), 12.7)) == [5]


def test_the_hold_is_bounded_in_count() -> None:
    s, ident = subscribed(hold_limit=3)
    s.receive(stored(ident, 1), 0.0)
    for o in (3, 4, 5):
        assert offsets(s.receive(stored(ident, o), 0.0)) == []
    # A fourth held message is one too many: the lowest gap is given up.
    assert offsets(s.receive(stored(ident, 7), 0.0)) == [("missing", 2, 2, "hold_limit"), 3, 4, 5]
    assert len(s.subs[ident].positions["s"].held) == 1
    assert offsets(s.receive(stored(ident, 6), 0.0)) == [6, 7]


def test_an_epoch_change_resets_the_order() -> None:
    s, ident = subscribed()
    s.receive(stored(ident, 1), 0.0)
    s.receive(stored(ident, 3), 0.0)
    events = s.receive(stored(ident, 1, epoch="F"), 0.1)
    assert offsets(events) == [("missing", 2, 2, "epoch_changed"), 3]
    # The new epoch's first message waits for the answer to the history asked (it could
    # bring messages of the stream), which a server rejects: E is no longer its epoch.
    events = s.receive({"identifier": ident, "type": "reject_history"}, 0.2)
    assert [(e.epoch, e.offset) for e in events if isinstance(e, proto.Data)] == [("F", 1)]
    assert s.subs[ident].position_of("s") == ("F", 1)
    assert s.next_deadline() is None


def test_streams_are_ordered_each_on_its_own() -> None:
    s, ident = subscribed()
    s.receive(stored(ident, 1, stream="a"), 0.0)
    s.receive(stored(ident, 7, stream="b"), 0.0)
    events = s.receive(stored(ident, 3, stream="a"), 0.0)
    assert events[-1] == proto.HistoryNeeded(ident, {"streams": {"a": {"epoch": "E", "offset": 1}}})
    assert offsets(s.receive(stored(ident, 8, stream="b"), 0.0)) == [8]  # b is not held up
    assert offsets(s.receive(stored(ident, 2, stream="a"), 0.0)) == [2, 3]


def test_live_messages_before_the_history_of_a_subscription_with_no_position() -> None:
    """A subscription re-subscribed with history by ``since`` has no offset to order by: what
    arrives before the history is answered waits for it (history may start lower)."""
    s, ident = subscribed()
    s.receive({"type": "ping", "message": 1000}, 0.0)
    s.connection_lost()
    plan = welcome_plan(s.receive({"type": "welcome", "sid": "b"}, 1.0))
    assert plan.subscribe == ((ident, {"since": 999}),)
    s.receive({"identifier": ident, "type": "confirm_subscription"}, 1.1)
    assert offsets(s.receive(stored(ident, 14), 1.2)) == []  # live, early
    got = [o for n in range(5, 14) for o in offsets(s.receive(stored(ident, n), 1.3))]
    assert got == []  # still the history's turn to end
    events = s.receive({"identifier": ident, "type": "confirm_history"}, 1.4)
    assert offsets(events) == list(range(5, 15))


def test_held_messages_survive_a_reconnection_and_the_resume_fetches_the_gap() -> None:
    s, ident = subscribed(gap_timeout=5.0)
    s.receive(stored(ident, 1), 0.0)
    s.receive(stored(ident, 4), 0.0)  # asks, then the connection drops before the answer
    s.connection_lost()
    plan = welcome_plan(
        s.receive({"type": "welcome", "sid": "b", "restored": True, "restored_ids": [ident]}, 4.0)
    )
    assert plan.history[0][1]["streams"] == {"s": {"epoch": "E", "offset": 1}}
    assert s.next_deadline() == 9.0  # a full gap_timeout for the new request
    assert offsets(s.receive(stored(ident, 5), 4.1)) == []
    for o in (2, 3):
        s.receive(stored(ident, o), 4.2)
    assert s.subs[ident].position_of("s") == ("E", 5)


def test_a_stream_whose_history_never_answered_starts_at_its_lowest_held() -> None:
    s, ident = subscribed()
    s.receive({"type": "ping", "message": 1000}, 0.0)
    s.connection_lost()
    welcome_plan(s.receive({"type": "welcome", "sid": "b"}, 1.0))  # subscribe with since
    s.receive({"identifier": ident, "type": "confirm_subscription"}, 1.1)
    s.receive(stored(ident, 9), 1.2)
    s.receive(stored(ident, 8), 1.2)
    s.connection_lost()  # no answer on this connection; the next does not resume
    s.resume = False
    welcome_plan(s.receive({"type": "welcome", "sid": "c"}, 2.0))
    assert offsets(s.receive(stored(ident, 10), 2.1)) == [8, 9, 10]


@pytest.mark.parametrize("seed", range(40))
def test_ordering_against_a_simulated_server(seed: int) -> None:
    """A server with the log 1..N: live messages reach the client late, out of order and
    some never (lost in transit); every ``history`` request is answered, at a random later
    point among the live ones, with everything after the requested offset.  The application
    must see 1..N exactly once, in order, and no gap reported (nothing was lost for good)."""
    rng = random.Random(seed)
    n = 200
    s, ident = subscribed(hold_limit=10_000, gap_timeout=1e9)
    assert offsets(s.receive(stored(ident, 1), 0.0)) == [1]  # where the client joined
    # Live traffic: each message from 2 on, shuffled within a small window, 5% lost.
    live = [o for o in range(2, n + 1) if rng.random() > 0.05 or o == n]
    for i in range(len(live) - 1):
        if rng.random() < 0.3:
            j = min(len(live) - 1, i + rng.randint(1, 4))
            live[i], live[j] = live[j], live[i]
    inbox: list[dict] = [stored(ident, o) for o in live]
    seen = [1]
    now = 0.0
    while inbox:
        now += 0.001
        message = inbox.pop(0)
        for event in s.receive(message, now):
            if isinstance(event, proto.Data):
                seen.append(event.offset)
            assert not isinstance(event, proto.Missing), event
            if isinstance(event, proto.HistoryNeeded):
                after = event.history["streams"]["s"]["offset"]
                # Answered from what the server has published so far (all of it here).
                answer = [stored(ident, o) for o in range(after + 1, n + 1)]
                answer.append({"identifier": ident, "type": "confirm_history"})
                at = rng.randint(0, len(inbox))
                inbox[at:at] = answer
    assert seen == list(range(1, n + 1))
