"""The Action Cable session without a socket: its decisions, driven command by command.

The transport is a list that records what the session writes (the session is written against
the Transport interface, sans I/O); everything else is real: the hub, the in-memory broker,
the channel executor, the application's channels.  Over real sockets the same behaviour is
tested end to end in test_server_protocol.py and test_resume.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from trio_cable import CableApp, Channel, Config, ConnectRequest, Unauthorized
from trio_cable.broker.memory import MemoryBroker
from trio_cable.channels import BUILTIN_CHANNELS
from trio_cable.identity import JWTIdentifier
from trio_cable.metrics import Metrics
from trio_cable.protocol.cable import JSON
from trio_cable.protocol.codes import DisconnectReason
from trio_cable.protocol.handshake import Request
from trio_cable.server.admission import TokenBucket
from trio_cable.server.executor import ChannelExecutor
from trio_cable.server.hub import Hub
from trio_cable.server.session import Session
from trio_cable.server.transport import WireFormat

# No framing: what the session writes is the encoded message itself.
PLAIN = WireFormat(JSON, False, bytes, "test-json")
EXT = WireFormat(JSON, True, bytes, "test-ext-json")


class RecordingTransport:
    """A Transport that keeps what is written, and how it was closed."""

    def __init__(self) -> None:
        self.written: list[Any] = []
        self.close_code: int | None = None
        self.aborted = False
        self._open = True
        self._cork: list[bytes] | None = None

    @property
    def open(self) -> bool:
        return self._open

    @property
    def queued_bytes(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        if not self._open:
            return
        if self._cork is not None:
            self._cork.append(data)
        else:
            self.written.append(json.loads(data))

    def cork(self) -> bool:
        if self._cork is not None:
            return False
        self._cork = []
        return True

    def uncork(self) -> None:
        cork, self._cork = self._cork or [], None
        for data in cork:
            self.write(data)

    def close(self, code: int) -> None:
        self.close_code = code
        self._open = False

    def abort(self) -> None:
        self.aborted = True
        self._open = False

    def take(self) -> list[Any]:
        out, self.written = self.written, []
        return out


class Gate:
    """A channel whose subscribed() waits until the test opens it."""

    opened = trio.Event()


class SlowChannel(Channel):
    async def subscribed(self) -> None:
        self.stream_from(self.params["stream"])
        await Gate.opened.wait()


class ChatChannel(Channel):
    async def subscribed(self) -> None:
        if self.params.get("reject"):
            self.transmit({"sorry": True})
            self.reject()
            return
        self.stream_from(f"chat:{self.params['room']}")

    def echo(self, data: dict[str, Any]) -> None:  # a plain function: handled at once
        self.transmit(data)

    async def shout(self, data: dict[str, Any]) -> None:
        await self.broadcast(f"chat:{self.params['room']}", {"shout": data["text"]})

    async def explode(self, data: dict[str, Any]) -> None:
        raise RuntimeError("boom")


@dataclass
class LocalNode:
    """A SessionNode of real parts, without a listener."""

    config: Config = field(default_factory=lambda: Config(public_streams=True))
    app: CableApp = field(default_factory=CableApp)
    metrics: Metrics = field(default_factory=Metrics)
    broker: MemoryBroker = field(default_factory=MemoryBroker)
    jwt: JWTIdentifier | None = None
    attached: set[Session] = field(default_factory=set)
    pinged: list[Session] = field(default_factory=list)
    taken: list[str] = field(default_factory=list)
    changed: list[Session] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hub = Hub(self.metrics)
        self.broker.bind(self.hub.deliver, lambda command: None)
        channels = {c.name(): c for c in BUILTIN_CHANNELS}
        channels.update(self.app.channels)
        self.executor = ChannelExecutor(self.app, channels, trio.CapacityLimiter(8), self.metrics)

    def attach(self, session: Session) -> None:
        self.attached.add(session)

    def detach(self, session: Session) -> None:
        self.attached.discard(session)

    def start_pinging(self, session: Session) -> None:
        self.pinged.append(session)

    async def take_over(self, sid: str) -> None:
        self.taken.append(sid)

    def session_changed(self, session: Session) -> None:
        self.changed.append(session)

    async def broadcast(self, stream: str, data: Any) -> None:
        await self.broker.publish(stream, json.dumps(data))


def make_session(
    node: LocalNode, wire: WireFormat = PLAIN, query: dict[str, str] | None = None
) -> tuple[Session, RecordingTransport]:
    transport = RecordingTransport()
    request = Request("GET", "/cable", "/cable", dict(query or {}), {}, remote="test:1")
    rate = node.config.command_rate
    budget = TokenBucket(rate, 2 * rate, trio.current_time())
    session = Session(
        node,
        transport,
        wire,
        request,
        f"sid{len(node.attached)}",
        budget,
        subprotocol="actioncable-v1-json",
    )
    return session, transport


async def send(session: Session, command: dict[str, Any]) -> None:
    """Hand one command to the session, and await the rest of it like a transport does."""
    work = session.receive(json.dumps(command).encode(), False)
    if work is not None:
        await work()


def ident(channel: str = "ChatChannel", **params: Any) -> str:
    return json.dumps({"channel": channel, **params})


def chat_app() -> CableApp:
    app = CableApp()
    app.channel(ChatChannel)
    app.channel(SlowChannel)
    return app


async def test_welcome_then_subscribe_confirm_and_broadcast() -> None:
    node = LocalNode(app=chat_app())
    session, transport = make_session(node)
    await session.opened()
    assert transport.take() == [{"type": "welcome", "sid": session.sid}]
    assert node.attached == {session} and node.pinged == [session]
    await send(session, {"command": "subscribe", "identifier": ident(room="1")})
    assert transport.take() == [{"identifier": ident(room="1"), "type": "confirm_subscription"}]
    await node.broadcast("chat:1", {"text": "hi"})
    assert transport.take() == [{"identifier": ident(room="1"), "message": {"text": "hi"}}]


async def test_a_plain_function_action_needs_no_await() -> None:
    node = LocalNode(app=chat_app())
    session, transport = make_session(node)
    await session.opened()
    await send(session, {"command": "subscribe", "identifier": ident(room="1")})
    transport.take()
    data = json.dumps({"action": "echo", "n": 1})
    work = session.receive(
        json.dumps({"command": "message", "identifier": ident(room="1"), "data": data}).encode(),
        False,
    )
    assert work is None  # done on the read fast path
    assert transport.take() == [{"identifier": ident(room="1"), "message": json.loads(data)}]
    # An async action is work for the transport's task.
    shout = json.dumps({"action": "shout", "text": "yo"})
    work = session.receive(
        json.dumps({"command": "message", "identifier": ident(room="1"), "data": shout}).encode(),
        False,
    )
    assert work is not None
    assert transport.take() == []
    await work()
    assert transport.take() == [{"identifier": ident(room="1"), "message": {"shout": "yo"}}]


async def test_callback_errors_cost_the_command_not_the_session() -> None:
    node = LocalNode(app=chat_app())
    session, transport = make_session(node)
    await session.opened()
    await send(session, {"command": "subscribe", "identifier": ident(room="1")})
    boom = json.dumps({"action": "explode"})
    await send(session, {"command": "message", "identifier": ident(room="1"), "data": boom})
    assert node.metrics.callback_errors_total == 1
    assert transport.open
    await send(session, {"command": "message", "identifier": ident(room="1"), "data": '{"x":1}'})
    assert transport.open  # no such action (receive is the default): logged, ignored


async def test_rejection_sends_what_subscribed_transmitted_first() -> None:
    node = LocalNode(app=chat_app())
    session, transport = make_session(node)
    await session.opened()
    transport.take()
    await send(session, {"command": "subscribe", "identifier": ident(room="1", reject=True)})
    assert transport.take() == [
        {"identifier": ident(room="1", reject=True), "message": {"sorry": True}},
        {"identifier": ident(room="1", reject=True), "type": "reject_subscription"},
    ]
    assert session.subscriptions == {}
    assert node.hub.subscribers("chat:1") == 0


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1]", b'{"command":"nope"}', b'{"command":"subscribe"}'],
)
async def test_bad_frames_end_the_session_with_invalid_request(payload: bytes) -> None:
    node = LocalNode()
    session, transport = make_session(node)
    await session.opened()
    transport.take()
    assert session.receive(payload, False) is None
    assert transport.take() == [
        {"type": "disconnect", "reason": "invalid_request", "reconnect": False}
    ]
    assert transport.close_code == 1008
    assert not session.resumable


async def test_a_bad_subscribe_with_an_identifier_is_only_rejected() -> None:
    node = LocalNode()
    session, transport = make_session(node)
    await session.opened()
    transport.take()
    bad = json.dumps({"command": "subscribe", "identifier": ident(), "history": 5}).encode()
    assert session.receive(bad, False) is None
    assert transport.take() == [{"identifier": ident(), "type": "reject_subscription"}]
    assert transport.open


async def test_connect_callback_refusal_is_unauthorized() -> None:
    app = CableApp()

    @app.connect
    def connect(request: ConnectRequest) -> dict[str, Any]:
        if request.query.get("user") != "ann":
            raise Unauthorized()
        return {"user": "ann"}

    node = LocalNode(app=app)
    session, transport = make_session(node, query={"user": "bob"})
    await session.opened()
    assert transport.take() == [
        {"type": "disconnect", "reason": "unauthorized", "reconnect": False}
    ]
    assert node.metrics.unauthorized_total == 1 and node.metrics.callback_errors_total == 0
    ann, ann_transport = make_session(node, query={"user": "ann"})
    await ann.opened()
    assert ann.identifiers == {"user": "ann"}
    assert ann_transport.take()[0]["type"] == "welcome"


async def test_rate_limited_commands_are_answered_not_dropped() -> None:
    node = LocalNode(config=Config(command_rate=1, public_streams=True))
    session, transport = make_session(node)
    await session.opened()
    transport.take()
    streams = [ident("$pubsub", stream_name=f"s{i}") for i in range(4)]
    for identifier in streams:
        await send(session, {"command": "subscribe", "identifier": identifier})
    answers = [(m["identifier"], m["type"]) for m in transport.take()]
    # A burst of twice the rate is allowed; then each subscribe gets its reject at once.
    assert answers == [
        (streams[0], "confirm_subscription"),
        (streams[1], "confirm_subscription"),
        (streams[2], "reject_subscription"),
        (streams[3], "reject_subscription"),
    ]
    assert node.metrics.rate_limited_commands_total == 2


async def test_history_goes_before_live_broadcasts_held_meanwhile() -> None:
    Gate.opened = trio.Event()
    node = LocalNode(app=chat_app())
    for n in range(3):
        await node.broadcast("slow", {"n": n})  # offsets 1..3, before the client came
    session, transport = make_session(node, wire=EXT)
    await session.opened()
    transport.take()
    identifier = ident("SlowChannel", stream="slow")
    command = {"command": "subscribe", "identifier": identifier, "history": {"since": 0}}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, session, command)
        await trio.testing.wait_all_tasks_blocked()
        # subscribed() is still running: a live broadcast must wait for the history.
        await node.broadcast("slow", {"n": 3})
        await trio.testing.wait_all_tasks_blocked()
        assert transport.take() == []
        Gate.opened.set()
    messages = transport.take()
    assert messages[0] == {"identifier": identifier, "type": "confirm_subscription"}
    assert [m["message"]["n"] for m in messages[1:-1]] == [0, 1, 2, 3]
    assert [m["offset"] for m in messages[1:-1]] == [1, 2, 3, 4]
    assert messages[-1] == {"identifier": identifier, "type": "confirm_history"}
    # The live copy of offset 4 came as history: it was not sent twice.
    await node.broadcast("slow", {"n": 4})
    assert [m["offset"] for m in transport.take()] == [5]


async def test_a_restored_session_holds_live_messages_until_history() -> None:
    node = LocalNode(app=chat_app())
    first, transport = make_session(node, wire=EXT)
    await first.opened()
    await send(first, {"command": "subscribe", "identifier": ident(room="1")})
    await node.broadcast("chat:1", {"n": 1})
    position = transport.take()[-1]
    await first.closing()
    await first.closed()

    await node.broadcast("chat:1", {"n": 2})  # published while the client was away
    second, transport2 = make_session(node, wire=EXT, query={"sid": first.sid})
    await second.opened()
    welcome = transport2.take()
    assert welcome == [
        {"type": "welcome", "sid": second.sid, "restored": True, "restored_ids": [ident(room="1")]}
    ]
    await node.broadcast("chat:1", {"n": 3})  # live, but history comes first
    # However long the client takes (no timer), and keepalives do not end the wait.
    await trio.sleep(0.5)
    await send(second, {"command": "pong"})
    await send(second, {"command": "ping"})
    assert transport2.take() == [{"type": "pong"}]
    streams = {"chat:1": {"epoch": position["epoch"], "offset": position["offset"]}}
    await send(
        second,
        {"command": "history", "identifier": ident(room="1"), "history": {"streams": streams}},
    )
    got = transport2.take()
    assert [m.get("message", m.get("type")) for m in got] == [
        {"n": 2},
        {"n": 3},
        "confirm_history",
    ]
    assert node.metrics.sessions_resumed_total == 1
    await node.broadcast("chat:1", {"n": 4})  # the gate is gone: live again
    assert [m["message"] for m in transport2.take()] == [{"n": 4}]


async def test_a_restored_client_that_never_asks_is_released_by_bytes_or_a_command() -> None:
    node = LocalNode(app=chat_app(), config=Config(max_send_queue=1000))
    first, _ = make_session(node, wire=EXT)
    await first.opened()
    await send(first, {"command": "subscribe", "identifier": ident(room="1")})
    await first.closing()
    await first.closed()
    second, transport = make_session(node, wire=EXT, query={"sid": first.sid})
    await second.opened()
    transport.take()
    sizes = []
    while not transport.written:
        await node.broadcast("chat:1", {"pad": "x" * 40})
        sizes.append(1)
    # Held until the bytes passed max_send_queue (1000), then all of them at once, in order.
    got = transport.take()
    assert len(got) == len(sizes) > 4
    assert [m["offset"] for m in got] == sorted(m["offset"] for m in got)

    third_first, _ = make_session(node, wire=EXT)
    await third_first.opened()
    await send(third_first, {"command": "subscribe", "identifier": ident(room="2")})
    await third_first.closing()
    await third_first.closed()
    third, transport3 = make_session(node, wire=EXT, query={"sid": third_first.sid})
    await third.opened()
    transport3.take()
    await node.broadcast("chat:2", {"n": 1})
    assert transport3.take() == []
    # Anything but history or a keepalive means the client is not going to ask first.
    await send(third, {"command": "subscribe", "identifier": ident(room="3")})
    assert [m.get("message", m.get("type")) for m in transport3.take()] == [
        {"n": 1},
        "confirm_subscription",
    ]


async def test_a_close_during_a_command_waits_for_its_reply() -> None:
    Gate.opened = trio.Event()
    node = LocalNode(app=chat_app())
    session, transport = make_session(node)
    await session.opened()
    transport.take()
    identifier = ident("SlowChannel", stream="x")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, session, {"command": "subscribe", "identifier": identifier})
        await trio.testing.wait_all_tasks_blocked()
        session.close()  # e.g. a drain: deferred until the subscribe is answered
        assert transport.open
        Gate.opened.set()
    assert [m.get("type") for m in transport.take()] == ["confirm_subscription"]
    assert transport.close_code == 1000


async def test_too_slow_farewell_and_closed_unsubscribes() -> None:
    node = LocalNode(app=chat_app())
    session, _transport = make_session(node)
    await session.opened()
    await send(session, {"command": "subscribe", "identifier": ident(room="1")})
    notice = session.farewell(DisconnectReason.TOO_SLOW)
    assert json.loads(notice or b"") == {
        "type": "disconnect",
        "reason": "too_slow",
        "reconnect": True,
    }
    await session.closing()
    await session.closed()
    assert session not in node.attached
    assert node.hub.subscribers("chat:1") == 0


async def test_history_waits_for_live_copies_still_in_the_fan_out_queue(monkeypatch) -> None:
    # A big audience is written by the hub's fan-out task, later than the broker delivered
    # it: a history read can hold a message whose live copy is still queued for this very
    # connection.  It must be dropped by the gate, not written after it opened (seen as a
    # duplicate at a resume with 1,000 clients per worker).
    from trio_cable.server import hub as hub_module

    monkeypatch.setattr(hub_module, "INLINE_RECIPIENTS", 0)  # every broadcast is a job
    node = LocalNode(app=chat_app())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(node.hub.run_fanout)
        await trio.testing.wait_all_tasks_blocked()
        session, transport = make_session(node, wire=EXT)
        await session.opened()
        await send(session, {"command": "subscribe", "identifier": ident(room="1")})
        await node.broadcast("chat:1", {"n": 1})
        await trio.testing.wait_all_tasks_blocked()
        position = transport.take()[-1]
        assert position["offset"] == 1
        await node.broadcast("chat:1", {"n": 2})  # stored; its live copy waits for the task
        assert node.hub.pending_fanouts == 1
        streams = {"chat:1": {"epoch": position["epoch"], "offset": 1}}
        await send(
            session,
            {"command": "history", "identifier": ident(room="1"), "history": {"streams": streams}},
        )
        await trio.testing.wait_all_tasks_blocked()
        got = [m.get("offset", m.get("type")) for m in transport.take()]
        assert got == [2, "confirm_history"]
        nursery.cancel_scope.cancel()
