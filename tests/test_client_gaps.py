"""The client's own gap detection, over a real socket, against a server that gets the order
wrong on purpose.

The server here is a scripted Action Cable ext-protocol endpoint (trio-websocket on a real
TCP port), not trio_cable's: it sends live messages before the history the client asked
for, out of order and with gaps, which trio_cable's server never does (its history gate),
so that the client's part is tested on its own.  Each test says what the server sends; the
client must hand the program every offset once, in order, and fetch what is missing with
``history``, or say what is missing (``MessagesMissing``) when the history cannot.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

from trio_cable.client import Backoff, CableEvent, MessagesMissing, Subscription, open_cable

SUBPROTOCOL = "actioncable-v1-ext-json"
STREAM = "feed"
EPOCH = "E1"


class Peer:
    """One client connection as the script sees it."""

    def __init__(self, ws: WebSocketConnection, number: int, query: str) -> None:
        self.ws = ws
        self.number = number  # 1 for the first connection, 2 for the next ...
        self.query = query
        self.identifier: str | None = None

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(message))

    async def command(self) -> dict[str, Any]:
        """The client's next command (its pongs skipped)."""
        while True:
            command = json.loads(await self.ws.get_message())
            if command.get("command") != "pong":
                return command

    async def stored(self, *offsets: int) -> None:
        """Stored broadcasts of STREAM with these offsets, in this order."""
        assert self.identifier is not None
        for offset in offsets:
            await self.send(
                {
                    "identifier": self.identifier,
                    "message": {"n": offset},
                    "stream_id": STREAM,
                    "epoch": EPOCH,
                    "offset": offset,
                }
            )

    async def subscribed(self) -> None:
        """welcome, then the client's subscribe, confirmed."""
        await self.send({"type": "welcome", "sid": f"sid{self.number}"})
        command = await self.command()
        assert command["command"] == "subscribe", command
        self.identifier = command["identifier"]
        await self.send({"identifier": self.identifier, "type": "confirm_subscription"})

    async def history(self) -> dict[str, Any]:
        """The client's next command, which must be a ``history`` for the subscription."""
        command = await self.command()
        assert command["command"] == "history" and command["identifier"] == self.identifier
        return command["history"]

    async def confirm_history(self) -> None:
        await self.send({"identifier": self.identifier, "type": "confirm_history"})


Script = Callable[[Peer], Awaitable[None]]


async def scripted_server(nursery: trio.Nursery, script: Script) -> str:
    """Serve ``script`` for every connection; the URL to connect to."""
    connections = 0

    async def handler(request: WebSocketRequest) -> None:
        nonlocal connections
        assert SUBPROTOCOL in request.proposed_subprotocols
        ws = await request.accept(subprotocol=SUBPROTOCOL)
        connections += 1
        query = request.path.partition("?")[2]
        try:
            await script(Peer(ws, connections, query))
            await trio.sleep_forever()
        except ConnectionClosed:
            pass

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    return f"ws://127.0.0.1:{server.port}/cable"


def _open(url: str, events: list[CableEvent], **kw: Any) -> Any:
    return open_cable(
        url,
        subprotocol=SUBPROTOCOL,
        backoff=Backoff("full_jitter", base=0.05, cap=0.1),
        on_event=events.append,
        close_timeout=0.2,
        **kw,
    )


async def _subscribe(cable: Any) -> Subscription:
    return await cable.subscribe("$pubsub", {"stream_name": STREAM})


async def _offsets(sub: Subscription, count: int) -> list[Any]:
    """The next ``count`` things the program sees: offsets, and MessagesMissing notices as
    ("missing", first, last, reason)."""
    seen: list[Any] = []
    with trio.fail_after(20):
        while len(seen) < count:
            try:
                message = await sub.receive()
            except MessagesMissing as missing:
                assert (missing.stream_id, missing.epoch) == (STREAM, EPOCH)
                seen.append(("missing", missing.first, missing.last, missing.reason))
                continue
            assert message.stream_id == STREAM and message.data == {"n": message.offset}
            seen.append(message.offset)
    return seen


async def test_live_messages_before_history_out_of_order_with_gaps_arrive_in_order_once(
    nursery: trio.Nursery,
) -> None:
    """First connection: 1, 2, 3, then 6 and 5 (4 missing).  The client must ask history
    from 3; before answering, the server sends live 7, then the history 4..7 (three of them
    duplicates).  Then the server restarts; on the restored connection it sends live 11 and
    10 before the client's history has even arrived (9 missing), then answers it with 9..11."""
    asked: list[dict[str, Any]] = []
    identifier: list[str] = []
    done = trio.Event()

    async def script(peer: Peer) -> None:
        if peer.number == 1:
            await peer.subscribed()
            assert peer.identifier is not None
            identifier.append(peer.identifier)
            await peer.stored(1, 2, 3, 6, 5)
            asked.append(await peer.history())
            await peer.stored(7)  # live, overtaking the history
            await peer.stored(4, 5, 6, 7)
            await peer.confirm_history()
            await peer.stored(8)
            await done.wait()
            await peer.send({"type": "disconnect", "reason": "server_restart", "reconnect": True})
            await peer.ws.aclose()
            return
        assert "sid=sid1" in peer.query
        peer.identifier = identifier[0]
        await peer.send(
            {"type": "welcome", "sid": "sid2", "restored": True, "restored_ids": identifier}
        )
        await peer.stored(11, 10)  # live, before the client's history arrives
        asked.append(await peer.history())
        await peer.stored(9, 10, 11)
        await peer.confirm_history()
        await peer.stored(12)

    url = await scripted_server(nursery, script)
    events: list[CableEvent] = []
    async with _open(url, events) as cable:
        feed = await _subscribe(cable)
        assert await _offsets(feed, 8) == [1, 2, 3, 4, 5, 6, 7, 8]
        done.set()
        assert await _offsets(feed, 4) == [9, 10, 11, 12]
        assert feed.duplicates == 5  # 5, 6, 7 of the first history; 10, 11 of the second
        assert feed.position(STREAM) == (EPOCH, 12)
    # The gap's request, by position from the last offset delivered; then the resume's.
    assert asked[0] == {"streams": {STREAM: {"epoch": EPOCH, "offset": 3}}}
    assert asked[1]["streams"] == {STREAM: {"epoch": EPOCH, "offset": 8}}
    gap_requests = [e for e in events if e.kind == "history_requested" and e.reason == "gap"]
    assert len(gap_requests) == 1  # the resume asked on its own; 10 and 11 waited for it
    assert not [e for e in events if e.kind == "messages_missing"]


@pytest.mark.parametrize("answer", ["reject_history", "empty_history", "no_answer"])
async def test_a_gap_the_history_cannot_fill_is_reported_and_the_rest_delivered(
    nursery: trio.Nursery, answer: str
) -> None:
    """1, 2, then 5: the client asks history from 2, and the server rejects it, answers it
    with nothing, or never answers.  The program gets 1, 2, a MessagesMissing for 3..4 with
    the reason, then 5 and what follows."""
    asked = trio.Event()
    gave_up = trio.Event()

    async def script(peer: Peer) -> None:
        await peer.subscribed()
        await peer.stored(1, 2, 5)
        assert await peer.history() == {"streams": {STREAM: {"epoch": EPOCH, "offset": 2}}}
        asked.set()
        if answer == "reject_history":
            await peer.send({"identifier": peer.identifier, "type": "reject_history"})
        elif answer == "empty_history":
            await peer.confirm_history()
        else:
            await gave_up.wait()
            await peer.stored(3)  # too late: the program was told it is missing
        await peer.stored(6)

    url = await scripted_server(nursery, script)
    events: list[CableEvent] = []
    gap_timeout = 0.5
    async with _open(url, events, gap_timeout=gap_timeout) as cable:
        feed = await _subscribe(cable)
        assert await _offsets(feed, 2) == [1, 2]
        with trio.fail_after(20):
            await asked.wait()
        reason = {
            "reject_history": "history_rejected",
            "empty_history": "not_in_history",
            "no_answer": "timeout",
        }[answer]
        assert await _offsets(feed, 2) == [("missing", 3, 4, reason), 5]
        gave_up.set()
        assert await _offsets(feed, 1) == [6]
    (notice,) = [e for e in events if e.kind == "messages_missing"]
    assert notice.reason == reason and isinstance(notice.error, MessagesMissing)
    assert notice.error.count == 2
    (request,) = [e for e in events if e.kind == "history_requested"]
    assert request.reason == "gap"
    if answer == "no_answer":
        # Given up at the timeout, not before (trio never wakes a sleeper early; the hold
        # began a few microseconds before the request was recorded).
        assert notice.time - request.time >= gap_timeout - 0.01
