"""The client's protocol state, sans-I/O: subscriptions, stream positions, de-duplication, and
what to send after a (re)connection.  No trio and no sockets, so the resume logic can be tested
(and simulated) without a server.

The runtime (:mod:`trio_cable.client.cable`) feeds every decoded server message to
:meth:`ClientSession.receive` and acts on the :class:`Event` it gets back; on each ``welcome``
the event carries a :class:`WelcomePlan` saying which subscriptions were restored by the
server, which need ``history``, and which must be subscribed again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from trio_cable.protocol import cable as wire

# Seconds taken off our own clock when it stands in for the server's (see history_since).
_SINCE_SKEW = 5

__all__ = [
    "SUBPROTOCOLS",
    "ClientSession",
    "Confirmed",
    "Data",
    "Disconnect",
    "Duplicate",
    "Event",
    "HistoryConfirmed",
    "HistoryRejected",
    "Ignored",
    "Ping",
    "Pong",
    "ProtocolError",
    "Rejected",
    "StreamPosition",
    "SubState",
    "Welcome",
    "WelcomePlan",
    "make_identifier",
]

#: The subprotocols the client speaks: name -> (binary frames, extended protocol).
SUBPROTOCOLS: dict[str, tuple[bool, bool]] = {
    name: (sp.codec.binary, sp.extended) for name, sp in wire.SUBPROTOCOLS.items()
}

# Compact separators: the identifier is what the server echoes back byte for byte, so it
# must be stable; key order is the caller's (channel first, like the Rails client).
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class ProtocolError(Exception):
    """The server sent something that is not the Action Cable protocol."""


def make_identifier(channel: str, params: dict[str, Any] | None = None) -> str:
    """The identifier string for ``channel`` with ``params`` (``{"channel": ..., **params}``)."""
    if not isinstance(channel, str) or not channel:
        raise ValueError("channel must be a non-empty string")
    params = dict(params or {})
    if "channel" in params:
        raise ValueError("params must not contain 'channel'")
    return _dumps({"channel": channel, **params})


# -- stream positions and de-duplication --------------------------------------------------------


class StreamPosition:
    """What a subscription has received of one stream in one epoch.

    Offsets up to ``floor`` count as received; ``ahead`` holds received offsets above it.  The
    floor only advances over a contiguous run, so history that arrives after newer live
    messages (offsets below the newest one) is still accepted, and exactly one copy of each
    (stream, epoch, offset) gets through.  ``ahead`` is bounded by ``window``: past it, the
    oldest entries fold into the floor (messages that late are outside any history window).
    """

    __slots__ = ("ahead", "epoch", "floor", "window")

    def __init__(self, epoch: str, *, window: int = 4096) -> None:
        self.epoch = epoch
        self.floor: int | None = None
        self.ahead: set[int] = set()
        self.window = window

    def seen(self, offset: int) -> bool:
        """Whether ``offset`` was received already."""
        return (self.floor is not None and offset <= self.floor) or offset in self.ahead

    def add(self, offset: int) -> bool:
        """Record ``offset``; False when it is a duplicate."""
        if self.seen(offset):
            return False
        self.ahead.add(offset)
        if self.floor is not None:
            while self.floor + 1 in self.ahead:
                self.floor += 1
                self.ahead.discard(self.floor)
        if len(self.ahead) > self.window:
            self._fold()
        return True

    def _fold(self) -> None:
        # Start the floor at the contiguous run from the lowest offset, then, if gaps still
        # leave too many, give up on the oldest gaps.
        run = self.last_contiguous()
        self.floor = run
        self.ahead = {o for o in self.ahead if o > run}
        while len(self.ahead) > self.window // 2:
            lowest = min(self.ahead)
            self.floor = lowest
            self.ahead.discard(lowest)
            while self.floor + 1 in self.ahead:
                self.floor += 1
                self.ahead.discard(self.floor)

    def last_contiguous(self) -> int:
        """The highest offset such that everything from the first one received up to it was
        received: where ``history`` must resume (it returns messages *after* the offset)."""
        if self.floor is not None:
            position = self.floor
        elif self.ahead:
            position = min(self.ahead)
        else:
            return 0
        while position + 1 in self.ahead:
            position += 1
        return position


# -- subscriptions -------------------------------------------------------------------------------

SubStatus = Literal["pending", "confirmed", "rejected", "removed"]


@dataclass
class SubState:
    """One subscription as the protocol sees it."""

    identifier: str
    channel: str
    params: dict[str, Any]
    #: ``pending`` until confirmed on the current connection; back to ``pending`` on every
    #: connection loss; ``rejected`` / ``removed`` are final.
    status: SubStatus = "pending"
    #: Whether it was ever confirmed: only then is there something to resume.
    confirmed_once: bool = False
    positions: dict[str, StreamPosition] = field(default_factory=dict)
    duplicates: int = 0
    received: int = 0

    def position_of(self, stream: str) -> tuple[str, int] | None:
        """(epoch, last contiguous offset) of ``stream``, if anything was received."""
        pos = self.positions.get(stream)
        if pos is None:
            return None
        return pos.epoch, pos.last_contiguous()

    def history_request(self, since: int | None) -> dict[str, Any] | None:
        """The ``history`` object asking for everything after what was received: by position
        for streams with one, by ``since`` (unix seconds) for the others.  ``None`` when there
        is nothing to ask with."""
        history: dict[str, Any] = {}
        if since is not None:
            history["since"] = since
        streams = {
            stream: {"epoch": pos.epoch, "offset": pos.last_contiguous()}
            for stream, pos in self.positions.items()
        }
        if streams:
            history["streams"] = streams
        return history or None


# -- events --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WelcomePlan:
    """What to do after a ``welcome``.

    ``restored``: the server resumed the session; ``confirmed`` lists the subscriptions it
    restored (they are confirmed without a subscribe), ``history`` the ``history`` commands to
    send for them.  ``subscribe`` lists (identifier, history or None) to subscribe, in the
    order they were first subscribed; ``unsubscribe`` restored identifiers no longer wanted.
    """

    sid: str
    restored: bool
    confirmed: tuple[str, ...] = ()
    history: tuple[tuple[str, dict[str, Any]], ...] = ()
    subscribe: tuple[tuple[str, dict[str, Any] | None], ...] = ()
    unsubscribe: tuple[str, ...] = ()


@dataclass(frozen=True)
class Welcome:
    plan: WelcomePlan


@dataclass(frozen=True)
class Ping:
    server_time: int | None


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Confirmed:
    identifier: str
    known: bool  # False: not a subscription of ours (the runtime unsubscribes it)


@dataclass(frozen=True)
class Rejected:
    identifier: str
    known: bool


@dataclass(frozen=True)
class HistoryConfirmed:
    identifier: str


@dataclass(frozen=True)
class HistoryRejected:
    identifier: str


@dataclass(frozen=True)
class Data:
    """A message for a subscription (stream metadata set for stored broadcasts)."""

    identifier: str
    message: Any
    stream_id: str | None = None
    epoch: str | None = None
    offset: int | None = None
    known: bool = True


@dataclass(frozen=True)
class Duplicate:
    """A stored broadcast received before (same stream, epoch and offset): dropped."""

    identifier: str
    stream_id: str
    epoch: str
    offset: int


@dataclass(frozen=True)
class Disconnect:
    reason: str
    reconnect: bool
    #: The server's ``reconnect_after`` advice in seconds, if any.
    reconnect_after: float | None = None


@dataclass(frozen=True)
class Ignored:
    """A message the client does not understand (kept for logging)."""

    message: Any


Event = (
    Welcome
    | Ping
    | Pong
    | Confirmed
    | Rejected
    | HistoryConfirmed
    | HistoryRejected
    | Data
    | Duplicate
    | Disconnect
    | Ignored
)


# -- the session --------------------------------------------------------------------------------


class ClientSession:
    """Protocol state of one logical client across its connections.

    ``resume`` (extended protocols only) enables session resume and history: reconnect with the
    last ``sid``, ask ``history`` for restored subscriptions, re-subscribe the others with
    ``history``.
    """

    def __init__(self, subprotocol: str, *, resume: bool = True, dedup_window: int = 4096) -> None:
        if subprotocol not in SUBPROTOCOLS:
            raise ValueError(
                f"unknown subprotocol {subprotocol!r} (known: {', '.join(SUBPROTOCOLS)})"
            )
        self.subprotocol = subprotocol
        self.binary, self.extended = SUBPROTOCOLS[subprotocol]
        self.resume = resume and self.extended
        self.dedup_window = dedup_window
        self.subs: dict[str, SubState] = {}
        #: The sid of the current (or last) connection.
        self.sid: str | None = None
        #: The server's clock (unix seconds) at its last ping: ``since`` for history.
        self.last_server_time: int | None = None
        #: Our own clock at the first welcome: ``since`` when no ping ever arrived.
        self.first_welcome_time: int | None = None
        self.connected = False

    # -- encoding ---------------------------------------------------------------------------

    def encode(self, command: dict[str, Any]) -> str | bytes:
        """A command as a WebSocket message: text for JSON, bytes for msgpack."""
        if self.binary:
            return msgpack.packb(command, use_bin_type=True)
        return _dumps(command)

    def decode(self, raw: str | bytes) -> dict[str, Any]:
        """A server message; raises :class:`ProtocolError` on garbage or a wrong frame type."""
        if self.binary:
            if not isinstance(raw, (bytes, bytearray)):
                raise ProtocolError("text frame on a msgpack connection")
            try:
                obj = msgpack.unpackb(raw, raw=False)
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                raise ProtocolError(f"invalid msgpack: {exc}") from None
        else:
            if not isinstance(raw, str):
                raise ProtocolError("binary frame on a JSON connection")
            try:
                obj = wire.JSON.decode(raw, max_depth=wire.DEFAULT_BROADCAST_MAX_DEPTH)
            except wire.InvalidCommand as exc:
                raise ProtocolError(exc.reason) from None
        if not isinstance(obj, dict):
            raise ProtocolError("server message is not an object")
        return obj

    # -- subscriptions ------------------------------------------------------------------------

    def add(self, channel: str, params: dict[str, Any] | None = None) -> SubState:
        """Register a subscription (pending); raises ``ValueError`` if it exists already."""
        identifier = make_identifier(channel, params)
        existing = self.subs.get(identifier)
        if existing is not None and existing.status in ("pending", "confirmed"):
            raise ValueError(f"already subscribed to {identifier}")
        sub = SubState(identifier, channel, dict(params or {}))
        self.subs[identifier] = sub
        return sub

    def remove(self, identifier: str, status: SubStatus = "removed") -> SubState | None:
        """Forget a subscription (unsubscribed, rejected or failed)."""
        sub = self.subs.pop(identifier, None)
        if sub is not None:
            sub.status = status
        return sub

    def history_since(self) -> int | None:
        """``since`` for history requests: the server's time at its last ping, less a second
        (whole-second clock; anything re-sent twice is de-duplicated by offset).  Before any
        ping (a server that does not ping at once), our own clock at the first welcome, less
        a margin for clock skew: a subscription that received nothing must still be able to
        ask for what was published while the client was away."""
        if self.last_server_time is not None:
            return max(0, self.last_server_time - 1)
        if self.first_welcome_time is not None:
            return max(0, self.first_welcome_time - _SINCE_SKEW)
        return None

    # -- commands -----------------------------------------------------------------------------

    @staticmethod
    def subscribe_command(identifier: str, history: dict[str, Any] | None = None) -> dict[str, Any]:
        cmd: dict[str, Any] = {"command": "subscribe", "identifier": identifier}
        if history is not None:
            cmd["history"] = history
        return cmd

    @staticmethod
    def unsubscribe_command(identifier: str) -> dict[str, Any]:
        return {"command": "unsubscribe", "identifier": identifier}

    @staticmethod
    def message_command(
        identifier: str, action: str, data: dict[str, Any] | None
    ) -> dict[str, Any]:
        payload = {**(data or {}), "action": action}
        return {"command": "message", "identifier": identifier, "data": _dumps(payload)}

    @staticmethod
    def history_command(identifier: str, history: dict[str, Any]) -> dict[str, Any]:
        return {"command": "history", "identifier": identifier, "history": history}

    @staticmethod
    def whisper_command(identifier: str, data: Any) -> dict[str, Any]:
        return {"command": "whisper", "identifier": identifier, "data": data}

    def resume_query(self) -> dict[str, str]:
        """Query parameters for the next connection: ``sid`` when resuming."""
        if self.resume and self.sid:
            return {"sid": self.sid}
        return {}

    def connection_lost(self) -> None:
        """The connection is gone: every live subscription must be confirmed again."""
        self.connected = False
        for sub in self.subs.values():
            if sub.status == "confirmed":
                sub.status = "pending"

    # -- incoming -----------------------------------------------------------------------------

    def receive(self, msg: dict[str, Any]) -> Event:
        """Update the state from one server message and say what it was."""
        kind = msg.get("type")
        identifier = msg.get("identifier")
        if kind == "ping":
            server_time = msg.get("message")
            if isinstance(server_time, (int, float)) and not isinstance(server_time, bool):
                self.last_server_time = int(server_time)
                return Ping(int(server_time))
            return Ping(None)
        if isinstance(identifier, str):
            if kind is None and "message" in msg:
                return self._data(identifier, msg)
            sub = self.subs.get(identifier)
            known = sub is not None and sub.status in ("pending", "confirmed")
            if kind == "confirm_subscription":
                if sub is not None and known:
                    sub.status = "confirmed"
                    sub.confirmed_once = True
                return Confirmed(identifier, known)
            if kind == "reject_subscription":
                if sub is not None and known:
                    self.remove(identifier, "rejected")
                return Rejected(identifier, known)
            if kind == "confirm_history":
                return HistoryConfirmed(identifier)
            if kind == "reject_history":
                return HistoryRejected(identifier)
            return Ignored(msg)
        if kind == "welcome":
            return Welcome(self._welcome(msg))
        if kind == "disconnect":
            reason = msg.get("reason")
            after = msg.get("reconnect_after")
            advice = (
                after / 1000.0
                if isinstance(after, (int, float)) and not isinstance(after, bool) and after >= 0
                else None
            )
            # The Rails client stops for good when "reconnect" is missing; so do we.
            return Disconnect(
                reason if isinstance(reason, str) else "unknown",
                msg.get("reconnect") is True,
                advice,
            )
        if kind == "pong":
            return Pong()
        return Ignored(msg)

    def _data(self, identifier: str, msg: dict[str, Any]) -> Event:
        sub = self.subs.get(identifier)
        stream, epoch, offset = msg.get("stream_id"), msg.get("epoch"), msg.get("offset")
        tagged = (
            isinstance(stream, str)
            and isinstance(epoch, str)
            and isinstance(offset, int)
            and not isinstance(offset, bool)
        )
        if sub is None or sub.status not in ("pending", "confirmed"):
            return Data(identifier, msg["message"], known=False)
        if not tagged:
            sub.received += 1
            return Data(identifier, msg["message"])
        assert isinstance(stream, str) and isinstance(epoch, str) and isinstance(offset, int)
        pos = sub.positions.get(stream)
        if pos is None or pos.epoch != epoch:
            # A new epoch means the stream's history was lost: positions in the old one mean
            # nothing any more.
            pos = StreamPosition(epoch, window=self.dedup_window)
            sub.positions[stream] = pos
        if not pos.add(offset):
            sub.duplicates += 1
            return Duplicate(identifier, stream, epoch, offset)
        sub.received += 1
        return Data(identifier, msg["message"], stream, epoch, offset)

    def _welcome(self, msg: dict[str, Any]) -> WelcomePlan:
        sid = msg.get("sid")
        sid = sid if isinstance(sid, str) else None
        self.connected = True
        if self.first_welcome_time is None:
            self.first_welcome_time = int(time.time())
        previous_sid = self.sid
        self.sid = sid
        restored_ids_raw = msg.get("restored_ids")
        restored = (
            self.resume
            and previous_sid is not None
            and msg.get("restored") is True
            and isinstance(restored_ids_raw, list)
        )
        since = self.history_since()
        if not restored:
            again: list[tuple[str, dict[str, Any] | None]] = []
            for sub in self.subs.values():
                if sub.status != "pending":
                    continue
                wanted = self.resume and sub.confirmed_once
                again.append((sub.identifier, sub.history_request(since) if wanted else None))
            return WelcomePlan(sid or "", False, subscribe=tuple(again))
        assert isinstance(restored_ids_raw, list)
        restored_ids = [i for i in restored_ids_raw if isinstance(i, str)]
        restored_set = set(restored_ids)
        confirmed: list[str] = []
        history: list[tuple[str, dict[str, Any]]] = []
        subscribe_: list[tuple[str, dict[str, Any] | None]] = []
        for sub in self.subs.values():
            if sub.status != "pending":
                continue
            if sub.identifier in restored_set:
                sub.status = "confirmed"
                sub.confirmed_once = True
                confirmed.append(sub.identifier)
                request = sub.history_request(since)
                if request is not None:
                    history.append((sub.identifier, request))
            else:
                request = sub.history_request(since) if sub.confirmed_once else None
                subscribe_.append((sub.identifier, request))
        unsubscribe = tuple(
            i for i in restored_ids if i not in self.subs or self.subs[i].status != "confirmed"
        )
        return WelcomePlan(
            sid or "",
            True,
            confirmed=tuple(confirmed),
            history=tuple(history),
            subscribe=tuple(subscribe_),
            unsubscribe=unsubscribe,
        )
