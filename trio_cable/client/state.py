"""The client's protocol state, sans-I/O: subscriptions, ordered delivery of reliable streams
(gap detection, de-duplication), and what to send after a (re)connection.  No trio and no
sockets, so the resume and ordering logic can be tested (and simulated) without a server.

The runtime (:mod:`trio_cable.client.cable`) feeds every decoded server message to
:meth:`ClientSession.receive` and acts on the :class:`Event` list it gets back, in order; on
each ``welcome`` an event carries a :class:`WelcomePlan` saying which subscriptions were
restored by the server, which need ``history``, and which must be subscribed again.  Held
messages wait for at most ``gap_timeout``: the runtime calls :meth:`ClientSession.expire` at
:meth:`ClientSession.next_deadline`.
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
    "Held",
    "HistoryConfirmed",
    "HistoryNeeded",
    "HistoryRejected",
    "Ignored",
    "Missing",
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


# -- ordered delivery of a reliable stream -------------------------------------------------------


class StreamPosition:
    """Where a subscription stands in one stream, in one epoch: the offset last delivered to
    the application, and the messages held back because they came before their turn.

    A message is delivered when its offset is ``delivered + 1`` (or when it is the first one
    of the stream and no history is on its way that could start lower); one further ahead is
    held in ``held`` until the gap below it is filled, or given up (:meth:`give_up`).  Offsets
    at or below ``delivered``, or already held, are duplicates.  ``deadline`` is when the
    current hold gives up (``None`` while nothing is held); ``asked_top`` is the highest
    offset held when ``history`` was last asked for this stream (``None``: not asked since the
    hold began).  Everything missing below it had been published before the server read that
    history, so what the history did not bring is gone.
    """

    __slots__ = ("asked_top", "deadline", "delivered", "epoch", "held")

    def __init__(self, epoch: str) -> None:
        self.epoch = epoch
        self.delivered: int | None = None
        self.held: dict[int, Data] = {}
        self.deadline: float | None = None
        self.asked_top: int | None = None

    def seen(self, offset: int) -> bool:
        """Whether ``offset`` was delivered or is held already."""
        return (self.delivered is not None and offset <= self.delivered) or offset in self.held

    def take_run(self, out: list[Event]) -> None:
        """Deliver (append to ``out``) the held messages that are next in line."""
        held = self.held
        if self.delivered is None:
            return
        while held:
            data = held.pop(self.delivered + 1, None)
            if data is None:
                break
            out.append(data)
            self.delivered += 1
        if not held:
            self.deadline = None
            self.asked_top = None

    def give_up(
        self, out: list[Event], identifier: str, stream: str, reason: str, upto: int | None = None
    ) -> None:
        """Stop waiting for the gaps below ``upto`` (all of them by default): deliver the held
        messages up to there in offset order, each gap announced by a :class:`Missing`
        before the message after it."""
        held = self.held
        if not held:
            return
        if self.delivered is None:
            # Nothing delivered yet: where the stream starts for us is unknown, so the lowest
            # held message starts it and nothing is reported missing below it.
            self.delivered = min(held) - 1
        for offset in sorted(held):
            if upto is not None and offset > upto:
                break
            if offset > self.delivered + 1:
                out.append(
                    Missing(identifier, stream, self.epoch, self.delivered + 1, offset - 1, reason)
                )
            out.append(held.pop(offset))
            self.delivered = offset
        self.take_run(out)


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
    #: A ``history`` request (or a subscribe with history) is unanswered on this connection:
    #: no second one is sent, and a stream with no position yet waits for it.
    history_pending: bool = False
    duplicates: int = 0
    received: int = 0

    def position_of(self, stream: str) -> tuple[str, int] | None:
        """(epoch, last offset delivered) of ``stream``, if anything was delivered."""
        pos = self.positions.get(stream)
        if pos is None or pos.delivered is None:
            return None
        return pos.epoch, pos.delivered

    def history_request(self, since: int | None) -> dict[str, Any] | None:
        """The ``history`` object asking for everything after what was delivered: by position
        for streams with one, by ``since`` (unix seconds) for the others.  ``None`` when there
        is nothing to ask with."""
        history: dict[str, Any] = {}
        if since is not None:
            history["since"] = since
        streams = {
            stream: {"epoch": pos.epoch, "offset": pos.delivered}
            for stream, pos in self.positions.items()
            if pos.delivered is not None
        }
        if streams:
            history["streams"] = streams
        return history or None

    def gap_request(self) -> dict[str, Any] | None:
        """The ``history`` object for the streams held at a gap, by position; ``None`` if
        none is."""
        streams = {
            stream: {"epoch": pos.epoch, "offset": pos.delivered}
            for stream, pos in self.positions.items()
            if pos.held and pos.delivered is not None
        }
        return {"streams": streams} if streams else None

    def asking(self, now: float, gap_timeout: float) -> None:
        """A history request for this subscription goes out now: it covers every gap held so
        far (see :attr:`StreamPosition.asked_top`), and each gets a full ``gap_timeout``."""
        self.history_pending = True
        for pos in self.positions.values():
            if pos.held:
                pos.asked_top = max(pos.held)
                pos.deadline = now + gap_timeout


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
    """A message for the application, in its turn (stream metadata set for stored
    broadcasts)."""

    identifier: str
    message: Any
    stream_id: str | None = None
    epoch: str | None = None
    offset: int | None = None
    known: bool = True


@dataclass(frozen=True)
class Duplicate:
    """A stored broadcast delivered or held already (same stream, epoch and offset):
    dropped."""

    identifier: str
    stream_id: str
    epoch: str
    offset: int


@dataclass(frozen=True)
class Held:
    """A stored broadcast that came before its turn: held until the gap below it is filled
    (or given up)."""

    identifier: str
    stream_id: str
    epoch: str
    offset: int


@dataclass(frozen=True)
class HistoryNeeded:
    """Send ``history`` for ``identifier`` with ``history``: it fetches the gaps held."""

    identifier: str
    history: dict[str, Any]


@dataclass(frozen=True)
class Missing:
    """Offsets ``first`` to ``last`` of ``stream_id`` (in ``epoch``) will not be delivered;
    the next :class:`Data` of the stream is the message after them.

    ``reason``: ``not_in_history`` (the history asked for did not have them),
    ``history_rejected``, ``timeout`` (not filled within ``gap_timeout``), ``hold_limit``
    (more than ``hold_limit`` messages held), ``epoch_changed`` (the stream's history was
    lost while they were awaited).
    """

    identifier: str
    stream_id: str
    epoch: str
    first: int
    last: int
    reason: str


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
    | Held
    | HistoryNeeded
    | Missing
    | Disconnect
    | Ignored
)

# -- the session --------------------------------------------------------------------------------


class ClientSession:
    """Protocol state of one logical client across its connections.

    ``resume`` (extended protocols only) enables session resume and history: reconnect with the
    last ``sid``, ask ``history`` for restored subscriptions, re-subscribe the others with
    ``history``.

    Stored broadcasts (those with ``stream_id``, ``epoch`` and ``offset``) reach the
    application in offset order, once, per (subscription, stream): one that comes before its
    turn is held and the gap fetched with ``history``.  A hold is bounded: at most
    ``hold_limit`` messages per stream, for at most ``gap_timeout`` seconds (from the last
    ``history`` asked for it); past either, or when the history cannot fill the gap, what is
    held is delivered in order after a :class:`Missing` notice.  ``now`` arguments are
    seconds on any monotonic clock (the runtime's), the same one throughout.
    """

    def __init__(
        self,
        subprotocol: str,
        *,
        resume: bool = True,
        hold_limit: int = 1000,
        gap_timeout: float = 10.0,
    ) -> None:
        if subprotocol not in SUBPROTOCOLS:
            raise ValueError(
                f"unknown subprotocol {subprotocol!r} (known: {', '.join(SUBPROTOCOLS)})"
            )
        if hold_limit < 1:
            raise ValueError("hold_limit must be >= 1")
        if not gap_timeout > 0:
            raise ValueError("gap_timeout must be > 0")
        self.subprotocol = subprotocol
        self.binary, self.extended = SUBPROTOCOLS[subprotocol]
        self.resume = resume and self.extended
        self.hold_limit = hold_limit
        self.gap_timeout = gap_timeout
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
            # Its answer will not come; held messages stay held, for the next connection's
            # history to fill (or their deadline to give up).
            sub.history_pending = False
            if sub.status == "confirmed":
                sub.status = "pending"

    # -- incoming -----------------------------------------------------------------------------

    def receive(self, msg: dict[str, Any], now: float | None = None) -> list[Event]:
        """Update the state from one server message; the events it caused, in order.

        Mostly one event.  A stored broadcast gives :class:`Data` when it is next in line,
        followed by the held messages it unblocks; :class:`Held` (and :class:`HistoryNeeded`
        when a gap opens) when it is early; :class:`Duplicate` when it was delivered or held
        already.  A ``confirm_history`` / ``reject_history`` is followed by what it releases.
        """
        if now is None:
            now = time.monotonic()
        kind = msg.get("type")
        identifier = msg.get("identifier")
        if kind == "ping":
            server_time = msg.get("message")
            if isinstance(server_time, (int, float)) and not isinstance(server_time, bool):
                self.last_server_time = int(server_time)
                return [Ping(int(server_time))]
            return [Ping(None)]
        if isinstance(identifier, str):
            if kind is None and "message" in msg:
                return self._data(identifier, msg, now)
            sub = self.subs.get(identifier)
            known = sub is not None and sub.status in ("pending", "confirmed")
            if kind == "confirm_subscription":
                if sub is not None and known:
                    sub.status = "confirmed"
                    sub.confirmed_once = True
                return [Confirmed(identifier, known)]
            if kind == "reject_subscription":
                if sub is not None and known:
                    self.remove(identifier, "rejected")
                return [Rejected(identifier, known)]
            if kind == "confirm_history":
                out: list[Event] = [HistoryConfirmed(identifier)]
                if sub is not None and known:
                    self._history_answered(sub, out, now, rejected=False)
                return out
            if kind == "reject_history":
                out = [HistoryRejected(identifier)]
                if sub is not None and known:
                    self._history_answered(sub, out, now, rejected=True)
                return out
            return [Ignored(msg)]
        if kind == "welcome":
            return [Welcome(self._welcome(msg, now))]
        if kind == "disconnect":
            reason = msg.get("reason")
            after = msg.get("reconnect_after")
            advice = (
                after / 1000.0
                if isinstance(after, (int, float)) and not isinstance(after, bool) and after >= 0
                else None
            )
            # The Rails client stops for good when "reconnect" is missing; so do we.
            return [
                Disconnect(
                    reason if isinstance(reason, str) else "unknown",
                    msg.get("reconnect") is True,
                    advice,
                )
            ]
        if kind == "pong":
            return [Pong()]
        return [Ignored(msg)]

    def next_deadline(self) -> float | None:
        """When the earliest hold gives up (call :meth:`expire` then); ``None``: none held."""
        deadlines = [
            pos.deadline
            for sub in self.subs.values()
            for pos in sub.positions.values()
            if pos.deadline is not None
        ]
        return min(deadlines, default=None)

    def expire(self, now: float) -> list[Event]:
        """Give up the holds whose deadline has passed: what they held, in order, each gap
        announced by a :class:`Missing` (reason ``timeout``)."""
        out: list[Event] = []
        for sub in self.subs.values():
            released: list[Event] = []
            for stream, pos in sub.positions.items():
                if pos.deadline is not None and pos.deadline <= now:
                    pos.give_up(released, sub.identifier, stream, "timeout")
            _count(sub, released)
            out.extend(released)
        return out

    def _data(self, identifier: str, msg: dict[str, Any], now: float) -> list[Event]:
        sub = self.subs.get(identifier)
        stream, epoch, offset = msg.get("stream_id"), msg.get("epoch"), msg.get("offset")
        tagged = (
            isinstance(stream, str)
            and isinstance(epoch, str)
            and isinstance(offset, int)
            and not isinstance(offset, bool)
        )
        if sub is None or sub.status not in ("pending", "confirmed"):
            return [Data(identifier, msg["message"], known=False)]
        if not tagged:
            sub.received += 1
            return [Data(identifier, msg["message"])]
        assert isinstance(stream, str) and isinstance(epoch, str) and isinstance(offset, int)
        out: list[Event] = []
        pos = sub.positions.get(stream)
        if pos is None or pos.epoch != epoch:
            if pos is not None:
                # A new epoch means the stream's history was lost: what the old one held will
                # never be completed, and its positions mean nothing any more.
                pos.give_up(out, identifier, stream, "epoch_changed")
            pos = StreamPosition(epoch)
            sub.positions[stream] = pos
        elif not pos.held and pos.delivered is not None and offset == pos.delivered + 1:
            # The usual case, kept short: the next message, nothing held.
            pos.delivered = offset
            sub.received += 1
            return [Data(identifier, msg["message"], stream, epoch, offset)]
        if pos.seen(offset):
            sub.duplicates += 1
            out.append(Duplicate(identifier, stream, epoch, offset))
            _count(sub, out)
            return out
        data = Data(identifier, msg["message"], stream, epoch, offset)
        if pos.delivered is None and not sub.history_pending:
            # The first message of the stream is where we join it (or the lowest held, if a
            # history that was awaited never answered).
            pos.delivered = min(offset, min(pos.held, default=offset)) - 1
            pos.take_run(out)
        delivered = pos.delivered
        if delivered is not None and offset == delivered + 1:
            pos.delivered = offset
            out.append(data)
            pos.take_run(out)
        else:
            # Early: a gap below it, or history on its way that may start lower.
            if not pos.held:
                pos.deadline = now + self.gap_timeout
            pos.held[offset] = data
            out.append(Held(identifier, stream, epoch, offset))
            while len(pos.held) > self.hold_limit:
                lowest = min(pos.held)
                pos.give_up(out, identifier, stream, "hold_limit", upto=lowest)
            if pos.held and pos.delivered is not None and not sub.history_pending:
                self._ask(sub, out, now)
        _count(sub, out)
        return out

    def _ask(self, sub: SubState, out: list[Event], now: float) -> None:
        request = sub.gap_request()
        if request is not None:
            sub.asking(now, self.gap_timeout)
            out.append(HistoryNeeded(sub.identifier, request))

    def _history_answered(
        self, sub: SubState, out: list[Event], now: float, *, rejected: bool
    ) -> None:
        """A history request of ``sub`` was answered: everything it brought has arrived.
        Streams that had no position start at their lowest held message; gaps the request
        covered and did not fill are given up; gaps left after that are asked again."""
        sub.history_pending = False
        identifier = sub.identifier
        for stream, pos in sub.positions.items():
            if not pos.held:
                continue
            if pos.delivered is None:
                pos.delivered = min(pos.held) - 1
                pos.take_run(out)
            if pos.asked_top is not None:
                reason = "history_rejected" if rejected else "not_in_history"
                pos.give_up(out, identifier, stream, reason, upto=pos.asked_top)
        # Gaps that opened after the request went out (or above what it covered): ask again.
        self._ask(sub, out, now)
        _count(sub, out)

    def _welcome(self, msg: dict[str, Any], now: float) -> WelcomePlan:
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
                request = sub.history_request(since) if self.resume and sub.confirmed_once else None
                if request is not None:
                    sub.asking(now, self.gap_timeout)
                again.append((sub.identifier, request))
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
                    sub.asking(now, self.gap_timeout)
                    history.append((sub.identifier, request))
            else:
                request = sub.history_request(since) if sub.confirmed_once else None
                if request is not None:
                    sub.asking(now, self.gap_timeout)
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


def _count(sub: SubState, out: list[Event]) -> None:
    """Count the messages of ``sub`` that ``out`` delivers."""
    sub.received += sum(1 for event in out if isinstance(event, Data))
