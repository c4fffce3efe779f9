"""The Action Cable / AnyCable wire protocol, sans I/O.

Everything here is a pure function or a small value: it turns client frames into validated
:class:`Command` objects and builds the server's replies as plain dicts, which a :class:`Codec`
(JSON or msgpack, chosen by the negotiated subprotocol) turns into frame payloads. No trio, no
sockets.

The contract is ``PROTOCOL.md``. Two rules shape much of this module:

* A subscription ``identifier`` is an opaque string chosen by the client. It is echoed back
  exactly as received and never re-serialized (Rails and AnyCable clients order its keys
  differently, and match replies by string equality). :func:`parse_identifier` decodes it only to
  read the channel and params.
* Input is untrusted. Every malformed frame becomes an :class:`InvalidCommand` with a reason for the
  log, never another exception type, and nesting depth is bounded *before* ``json.loads`` gets to
  recurse on it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import msgpack

__all__ = [
    "DEFAULT_BROADCAST_MAX_DEPTH",
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_ELEMENTS",
    "DEFAULT_MAX_IDENTIFIER_SIZE",
    "JSON",
    "MSGPACK",
    "SUBPROTOCOLS",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "UNSUPPORTED",
    "BroadcastEncoder",
    "Codec",
    "Command",
    "History",
    "InvalidCommand",
    "Join",
    "Leave",
    "Message",
    "Ping",
    "Pong",
    "PresenceQuery",
    "Publication",
    "RemoteCommand",
    "Subprotocol",
    "Subscribe",
    "SubscriptionCommand",
    "Unsubscribe",
    "Whisper",
    "confirm_history",
    "confirm_subscription",
    "data_message",
    "decode_broadcast_data",
    "decode_command",
    "disconnect",
    "is_stream_name",
    "parse_action",
    "parse_identifier",
    "parse_publications",
    "ping",
    "pong",
    "presence_info",
    "presence_join",
    "presence_leave",
    "presence_message",
    "reject_history",
    "reject_subscription",
    "select_subprotocol",
    "token_from_subprotocols",
    "welcome",
]

#: Nesting limit for client commands, identifiers and action payloads (real ones nest 1-3 deep).
DEFAULT_MAX_DEPTH = 32
#: Nesting limit for publications coming from the application (trusted, but still bounded so that
#: neither ``json.loads`` nor the encoders can hit the interpreter's recursion limit).
DEFAULT_BROADCAST_MAX_DEPTH = 256
DEFAULT_MAX_IDENTIFIER_SIZE = 4096

#: Anything that holds a frame payload. Text payloads may also be given already decoded, as ``str``.
Payload: TypeAlias = bytes | bytearray | memoryview | str


class InvalidCommand(Exception):
    """A frame or value that breaks the protocol.

    ``reason`` is human-readable and meant for the log, not for the client. ``identifier`` is set
    when the bad command could be attributed to a subscription (it had a valid identifier), and
    ``command`` when the command name was known; the server uses both to pick its answer
    (``reject_subscription`` / ``reject_history`` rather than a ``disconnect``).
    """

    def __init__(
        self, reason: str, identifier: str | None = None, command: str | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.identifier = identifier
        self.command = command


# -------------------------------------------------------------------------------------------------
# Shape limits: nesting depth and element count, checked before or while decoding, in time linear
# in the payload and at C speed.  json.loads recurses once per nesting level (RecursionError, or a
# stack overflow on a small thread stack, on "[" * 100_000), and a megabyte of tiny containers
# costs hundreds of milliseconds to build and walk: one client must not buy that with one frame.

#: Elements (containers and their members) a client command or action payload may hold.  Real ones
#: hold a few dozen; a megabyte of ``[[],[],...]`` holds half a million.
DEFAULT_MAX_ELEMENTS = 10_000

# A string literal once its escapes are gone (see _json_shape_ok).  Without escapes, a failed match
# means no quote follows at all, so the search cannot restart at every quote (a pattern over raw
# JSON strings, escapes included, is quadratic on an unterminated string of escaped quotes).
_BARE_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_INNERMOST = re.compile(r"\[\]|\{\}")


def _json_shape_ok(text: str, max_depth: int, max_elements: int | None) -> str | None:
    """None if the JSON text nests at most *max_depth* deep and holds at most *max_elements*
    elements (None: any number); else why not.

    Fast path: brackets and commas anywhere (strings included) bound both, and ``str.count`` runs
    in C.  Otherwise string literals are removed (escape pairs first, with ``str.replace``; then
    whole strings, with a regex that cannot backtrack), and the depth is found by peeling the
    innermost bracket pairs, one level per pass.  On invalid JSON the answer may be wrong, but the
    decoder rejects such text anyway.
    """
    opens = text.count("[") + text.count("{")
    limit = max_elements if max_elements is not None else 1 << 62
    # Every element takes two characters at least (a digit and a comma), so a text of up to
    # twice the limit cannot hold too many: the common case needs no count of its commas.
    if opens <= max_depth and (len(text) <= 2 * limit or opens + text.count(",") <= limit):
        return None
    bare = _BARE_STRING.sub("0", text.replace("\\\\", "").replace('\\"', ""))
    if bare.count("[") + bare.count("{") + bare.count(",") > limit:
        return "too many elements"
    brackets = _NOT_BRACKETS.sub("", bare)  # short now: at most twice the limit
    for _ in range(max_depth):
        if not brackets:
            return None
        brackets = _INNERMOST.sub("", brackets)
    return "too deeply nested" if brackets else None


_SCALARS = (str, int, float, type(None))  # bool is an int


def _check_tree(obj: Any, max_depth: int) -> None:
    """Check a decoded msgpack value: JSON-compatible types only, at most ``max_depth`` deep.

    msgpack can carry things JSON cannot (bytes, extension types, timestamps, non-string map keys);
    refusing them here keeps every value a command carries re-encodable for JSON clients too (a
    whisper from a msgpack client may go to a JSON client). Iterative, so depth cannot blow the
    stack; the element budget (enforced while unpacking) bounds its work.
    """
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > max_depth:
                raise InvalidCommand("too deeply nested")
            for key, item in value.items():
                if type(key) is not str:
                    raise InvalidCommand("invalid msgpack (map keys must be strings)")
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif not isinstance(item, _SCALARS):
                    raise InvalidCommand(f"invalid msgpack (unsupported {type(item).__name__})")
        elif isinstance(value, list):
            if depth > max_depth:
                raise InvalidCommand("too deeply nested")
            for item in value:
                if isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                elif not isinstance(item, _SCALARS):
                    raise InvalidCommand(f"invalid msgpack (unsupported {type(item).__name__})")
        elif not isinstance(value, _SCALARS):
            raise InvalidCommand(f"invalid msgpack (unsupported {type(value).__name__})")


class _TooManyElements(Exception):
    pass


class _ElementBudget:
    """msgpack unpack hooks that count the elements of every container as it is built, and
    stop the unpacker once there are more than *limit* (before it builds the rest)."""

    __slots__ = ("left",)

    def __init__(self, limit: int) -> None:
        self.left = limit

    def list_hook(self, value: list[Any]) -> list[Any]:
        self.left -= len(value) + 1
        if self.left < 0:
            raise _TooManyElements
        return value

    def object_hook(self, value: dict[str, Any]) -> dict[str, Any]:
        self.left -= len(value) + 1
        if self.left < 0:
            raise _TooManyElements
        return value


# -------------------------------------------------------------------------------------------------
# Encoding fallbacks. The fast path encodes as-is; only when that fails (values JSON or msgpack
# cannot carry faithfully) is the value sanitized and encoded again, so that one odd value coming
# from a client or the application never takes the sending code down. The sanitizing follows what a
# browser would see: JSON.stringify turns non-finite numbers into null, JavaScript numbers beyond 64
# bits are floats, and a lone UTF-16 surrogate cannot be UTF-8 encoded, so it becomes U+FFFD.
# Sanitizing is applied value by value, so sanitizing an envelope equals sanitizing its parts
# (BroadcastEncoder's splicing relies on that).

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_INT64_MIN = -(2**63)
_UINT64_MAX = 2**64 - 1


def _sanitize(value: Any, *, ints_to_float: bool) -> Any:
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        if ints_to_float and not _INT64_MIN <= value <= _UINT64_MAX:
            try:
                return float(value)
            except OverflowError:
                return None
        return value
    if isinstance(value, float):
        return value if ints_to_float or math.isfinite(value) else None
    if isinstance(value, dict):
        return {
            _sanitize(k, ints_to_float=ints_to_float): _sanitize(v, ints_to_float=ints_to_float)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_sanitize(v, ints_to_float=ints_to_float) for v in value]
    return value  # unknown types: let the encoder raise its TypeError (a programming error)


# -------------------------------------------------------------------------------------------------
# Codecs


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN / Infinity / -Infinity: they are not JSON, and browsers reject them.
    raise ValueError(f"{name} is not valid JSON")


_json_loads: Callable[[str], Any] = json.JSONDecoder(parse_constant=_reject_constant).decode
# One encoder instance: json.dumps() with non-default arguments builds a new encoder on every call.
_json_dumps: Callable[[Any], str] = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


class Codec:
    """How Action Cable objects travel in frames: ``JSON`` (text frames) or ``MSGPACK`` (binary).

    ``encode`` turns a server message (a plain dict, see the builders below) into a frame payload;
    ``decode`` turns a frame payload into a value, raising :class:`InvalidCommand` on garbage or on
    nesting deeper than ``max_depth``.
    """

    __slots__ = ("binary", "name")

    name: str
    binary: bool

    def __init__(self, name: str, binary: bool) -> None:
        self.name = name
        self.binary = binary

    def encode(self, obj: Any) -> bytes:
        """Encode ``obj`` to a frame payload."""
        raise NotImplementedError

    def decode(
        self,
        payload: Payload,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_elements: int | None = None,
    ) -> Any:
        """Decode a frame payload; raises :class:`InvalidCommand`.  *max_elements* bounds
        the containers and members it may hold (None: any number)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<Codec {self.name}>"


class _JSONCodec(Codec):
    __slots__ = ()

    def encode(self, obj: Any) -> bytes:
        try:
            return _json_dumps(obj).encode("utf-8")
        except ValueError:  # a non-finite float, or a lone surrogate (UnicodeEncodeError)
            return _json_dumps(_sanitize(obj, ints_to_float=False)).encode("utf-8")

    def decode(
        self,
        payload: Payload,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_elements: int | None = None,
    ) -> Any:
        try:
            # Decode UTF-8 explicitly: json.loads(bytes) would also sniff UTF-16/32 and let
            # encoded surrogates through, neither of which is a valid text frame.
            text = payload if isinstance(payload, str) else str(payload, "utf-8")
        except UnicodeDecodeError:
            raise InvalidCommand("invalid JSON") from None
        refusal = _json_shape_ok(text, max_depth, max_elements)
        if refusal is not None:
            raise InvalidCommand(refusal)
        try:
            return _json_loads(text)
        except (ValueError, RecursionError):
            raise InvalidCommand("invalid JSON") from None


class _MsgpackCodec(Codec):
    __slots__ = ()

    def encode(self, obj: Any) -> bytes:
        try:
            return msgpack.packb(obj, use_bin_type=True)
        except (OverflowError, ValueError):  # an int beyond 64 bits, a lone surrogate
            return msgpack.packb(_sanitize(obj, ints_to_float=True), use_bin_type=True)

    def decode(
        self,
        payload: Payload,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        max_elements: int | None = None,
    ) -> Any:
        if isinstance(payload, str):
            raise InvalidCommand("invalid msgpack (text payload)")
        try:
            # The C unpacker keeps its own bounded stack (StackError, no recursion), and unpackb
            # caps container and string lengths at the payload size, so garbage cannot make it
            # allocate much. strict_map_key refuses int/float/... map keys up front.  With an
            # element budget, a container's announced length is refused from its header, and
            # the hooks stop the unpacker once the containers built hold too many elements.
            if max_elements is None:
                obj = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            else:
                budget = _ElementBudget(max_elements)
                obj = msgpack.unpackb(
                    payload,
                    raw=False,
                    strict_map_key=True,
                    max_array_len=max_elements,
                    max_map_len=max_elements,
                    list_hook=budget.list_hook,
                    object_hook=budget.object_hook,
                )
        except _TooManyElements:
            raise InvalidCommand("too many elements") from None
        except (ValueError, TypeError, msgpack.UnpackException):
            raise InvalidCommand("invalid msgpack") from None
        _check_tree(obj, max_depth)
        return obj


#: The JSON codec: text frames, compact separators, UTF-8, non-ASCII kept as is.
JSON: Codec = _JSONCodec("json", binary=False)
#: The msgpack codec: binary frames, one object per frame; ``bytes`` encode as msgpack bin.
MSGPACK: Codec = _MsgpackCodec("msgpack", binary=True)


# -------------------------------------------------------------------------------------------------
# Subprotocols


@dataclass(frozen=True)
class Subprotocol:
    """A WebSocket subprotocol the server can select: its codec, and whether it is AnyCable's
    extended protocol (session resume, history, ``pong``, ``whisper``)."""

    name: str
    codec: Codec
    extended: bool


SUBPROTOCOLS: dict[str, Subprotocol] = {
    sp.name: sp
    for sp in (
        Subprotocol("actioncable-v1-json", JSON, extended=False),
        Subprotocol("actioncable-v1-ext-json", JSON, extended=True),
        Subprotocol("actioncable-v1-msgpack", MSGPACK, extended=False),
        Subprotocol("actioncable-v1-ext-msgpack", MSGPACK, extended=True),
    )
}

#: Offered by clients that want a clean refusal; the server may select it when nothing else matches.
UNSUPPORTED = "actioncable-unsupported"
#: Prefix of the subprotocol entry that carries a JWT (``anycable-token.<jwt>``); never selected.
TOKEN_SUBPROTOCOL_PREFIX = "anycable-token."


def select_subprotocol(offered: Sequence[str]) -> Subprotocol | None:
    """The first supported subprotocol in the client's order of preference, or ``None``.

    Token entries (``anycable-token.*``) and :data:`UNSUPPORTED` are never returned.
    """
    for name in offered:
        sp = SUBPROTOCOLS.get(name.strip())
        if sp is not None:
            return sp
    return None


def token_from_subprotocols(offered: Sequence[str]) -> str | None:
    """The token of the first non-empty ``anycable-token.<jwt>`` entry, or ``None``."""
    for name in offered:
        name = name.strip()
        if name.startswith(TOKEN_SUBPROTOCOL_PREFIX) and len(name) > len(TOKEN_SUBPROTOCOL_PREFIX):
            return name[len(TOKEN_SUBPROTOCOL_PREFIX) :]
    return None


# -------------------------------------------------------------------------------------------------
# Client -> server

_NEEDS_IDENTIFIER = frozenset(
    {"subscribe", "unsubscribe", "message", "history", "whisper", "join", "leave", "presence"}
)
_COMMANDS = _NEEDS_IDENTIFIER | {"ping", "pong"}


@dataclass(frozen=True, slots=True)
class Subscribe:
    """``subscribe``; ``history`` (ext protocols) asks for history once confirmed, and
    ``presence`` (``{"id": str, "info": any}``) joins presence right after."""

    identifier: str
    history: dict[str, Any] | None = None
    presence: dict[str, Any] | None = None
    name: ClassVar[str] = "subscribe"


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """``unsubscribe``."""

    identifier: str
    name: ClassVar[str] = "unsubscribe"


@dataclass(frozen=True, slots=True)
class Message:
    """``message``: ``data`` is the JSON *string* of the action (see :func:`parse_action`)."""

    identifier: str
    data: str
    name: ClassVar[str] = "message"


@dataclass(frozen=True, slots=True)
class History:
    """``history``: ``history`` is the validated, normalized request:
    ``{"since": number?, "streams": {stream: {"epoch": str, "offset": int}}?}``."""

    identifier: str
    history: dict[str, Any]
    name: ClassVar[str] = "history"


@dataclass(frozen=True, slots=True)
class Whisper:
    """``whisper``: ``data`` is any JSON value (not stringified)."""

    identifier: str
    data: Any
    name: ClassVar[str] = "whisper"


@dataclass(frozen=True, slots=True)
class Join:
    """``join``: enter the subscription's presence set as ``id`` (a string) with ``info``
    (any JSON value; None when absent)."""

    identifier: str
    id: str
    info: Any = None
    name: ClassVar[str] = "join"


@dataclass(frozen=True, slots=True)
class Leave:
    """``leave``: leave the subscription's presence set."""

    identifier: str
    name: ClassVar[str] = "leave"


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """``presence``: ask the presence set (``return_records``: with the members, default)."""

    identifier: str
    return_records: bool = True
    name: ClassVar[str] = "presence"


@dataclass(frozen=True, slots=True)
class Ping:
    """The client's ``ping`` command (ext protocols): answered with ``pong``."""

    name: ClassVar[str] = "ping"


@dataclass(frozen=True, slots=True)
class Pong:
    """The client's ``pong``, the answer to the server's ping (ext protocols)."""

    name: ClassVar[str] = "pong"


#: One validated client command.
Command: TypeAlias = (
    Subscribe
    | Unsubscribe
    | Message
    | History
    | Whisper
    | Join
    | Leave
    | PresenceQuery
    | Ping
    | Pong
)
#: The commands that name a subscription.
SubscriptionCommand: TypeAlias = (
    Subscribe | Unsubscribe | Message | History | Whisper | Join | Leave | PresenceQuery
)

_PING = Ping()
_PONG = Pong()


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _validate_history(history: Any, identifier: str, command: str) -> dict[str, Any]:
    """Check the shape of a history request and return a copy holding only the known keys."""

    def fail(reason: str) -> InvalidCommand:
        return InvalidCommand(reason, identifier, command)

    if not isinstance(history, dict):
        raise fail("history must be an object")
    result: dict[str, Any] = {}
    since = history.get("since")
    if since is not None:
        if not _is_number(since) or since < 0:
            raise fail("history.since must be a non-negative number (unix seconds)")
        result["since"] = since
    streams = history.get("streams")
    if streams is not None:
        if not isinstance(streams, dict):
            raise fail("history.streams must be an object")
        checked: dict[str, dict[str, Any]] = {}
        for stream, position in streams.items():
            if not isinstance(stream, str) or not stream:
                raise fail("history.streams keys must be non-empty strings")
            if not isinstance(position, dict):
                raise fail(f"history.streams[{stream[:100]!r}] must be an object")
            epoch = position.get("epoch")
            offset = position.get("offset")
            if not isinstance(epoch, str):
                raise fail(f"history.streams[{stream[:100]!r}].epoch must be a string")
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                raise fail(
                    f"history.streams[{stream[:100]!r}].offset must be a non-negative integer"
                )
            checked[stream] = {"epoch": epoch, "offset": offset}
        result["streams"] = checked
    return result


def decode_command(
    codec: Codec,
    payload: Payload,
    *,
    max_identifier_size: int = DEFAULT_MAX_IDENTIFIER_SIZE,
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Command:
    """Decode and validate one client frame.

    Raises :class:`InvalidCommand` for anything PROTOCOL.md does not allow: undecodable payload,
    nesting deeper than ``max_depth``, a top level that is not an object, a missing or unknown
    ``command``, a missing/empty/non-string/oversize ``identifier`` (for every command but
    ``ping``/``pong``), a ``message`` whose ``data`` is missing or not a string, a ``whisper``
    without ``data``, and a malformed ``history``. Once the identifier is valid, errors carry it.
    Unknown extra keys are ignored, as Action Cable does.
    """
    obj = codec.decode(payload, max_depth=max_depth, max_elements=max_elements)
    if not isinstance(obj, dict):
        raise InvalidCommand("not an object")
    command = obj.get("command")
    if not isinstance(command, str):
        raise InvalidCommand("missing command" if command is None else "command must be a string")
    if command not in _COMMANDS:
        raise InvalidCommand(f"unknown command {command[:64]!r}")
    if command not in _NEEDS_IDENTIFIER:
        return _PING if command == "ping" else _PONG

    identifier = obj.get("identifier")
    if identifier is None:
        raise InvalidCommand("missing identifier", command=command)
    if not isinstance(identifier, str):
        raise InvalidCommand("identifier must be a string", command=command)
    if not identifier:
        raise InvalidCommand("empty identifier", command=command)
    if len(identifier) > max_identifier_size:
        raise InvalidCommand(
            f"identifier too long ({len(identifier)} > {max_identifier_size})", command=command
        )

    if command == "message":
        if "data" not in obj:
            raise InvalidCommand("message without data", identifier, command)
        data = obj["data"]
        if not isinstance(data, str):
            raise InvalidCommand("message data must be a string", identifier, command)
        return Message(identifier, data)
    if command == "whisper":
        if "data" not in obj:
            raise InvalidCommand("whisper without data", identifier, command)
        return Whisper(identifier, _json_value(obj["data"], "whisper data", identifier, command))
    if command == "history":
        if "history" not in obj:
            raise InvalidCommand("history command without history", identifier, command)
        return History(identifier, _validate_history(obj["history"], identifier, command))
    if command == "subscribe":
        history = obj.get("history")  # optional (ext protocols): confirm first, then history
        presence = obj.get("presence")  # optional: join right after the confirm
        return Subscribe(
            identifier,
            None if history is None else _validate_history(history, identifier, command),
            None if presence is None else _validate_presence(presence, identifier, command),
        )
    if command == "join":
        presence = _validate_presence(obj.get("presence"), identifier, command)
        return Join(identifier, presence["id"], presence.get("info"))
    if command == "leave":
        return Leave(identifier)
    if command == "presence":
        data = obj.get("data")
        records = data.get("return_records", True) if isinstance(data, dict) else True
        return PresenceQuery(identifier, records is not False)
    return Unsubscribe(identifier)


#: The longest presence id accepted (ids are user ids, not documents).
MAX_PRESENCE_ID = 256


def _validate_presence(presence: Any, identifier: str, command: str) -> dict[str, Any]:
    """``{"id": str, "info": any}`` of a ``join`` (or a ``subscribe`` with presence).  A
    numeric id is taken as its decimal string, as @anycable/core sends ``String(id)``."""
    if not isinstance(presence, dict):
        raise InvalidCommand("presence must be an object", identifier, command)
    pid = presence.get("id")
    if isinstance(pid, int) and not isinstance(pid, bool):
        pid = str(pid)
    if not isinstance(pid, str) or not pid or len(pid) > MAX_PRESENCE_ID:
        raise InvalidCommand(
            f"presence.id must be a non-empty string of at most {MAX_PRESENCE_ID} characters",
            identifier,
            command,
        )
    result: dict[str, Any] = {"id": pid}
    if presence.get("info") is not None:
        result["info"] = _json_value(presence["info"], "presence.info", identifier, command)
    return result


def _json_value(value: Any, what: str, identifier: str, command: str) -> Any:
    """*value* when JSON can carry it to every client and broker: a msgpack client may send
    bytes, or a NaN, that no JSON client could receive."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise InvalidCommand(f"{what} is not a JSON value", identifier, command) from None
    return value


def parse_identifier(
    identifier: str, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> tuple[str, dict[str, Any]]:
    """Read a subscription identifier: ``(channel name, params without "channel")``.

    The identifier must be a JSON object with a non-empty string ``channel``. This is for reading
    only: replies echo the original string, never a re-serialization of the result.
    """
    try:
        obj = JSON.decode(identifier, max_depth=max_depth, max_elements=DEFAULT_MAX_ELEMENTS)
    except InvalidCommand as exc:
        raise InvalidCommand(f"identifier: {exc.reason}", identifier) from None
    if not isinstance(obj, dict):
        raise InvalidCommand("identifier is not a JSON object", identifier)
    channel = obj.pop("channel", None)
    if not isinstance(channel, str) or not channel:
        raise InvalidCommand("identifier has no channel name", identifier)
    return channel, obj


def parse_action(
    data: str, *, identifier: str | None = None, max_depth: int = DEFAULT_MAX_DEPTH
) -> tuple[str, dict[str, Any]]:
    """Read a ``message`` command's data: ``(action, whole decoded object)``.

    ``data`` must be a JSON object; its ``action`` (a string) defaults to ``"receive"``, as in
    Action Cable. Errors carry ``identifier`` when given.
    """
    try:
        obj = JSON.decode(data, max_depth=max_depth, max_elements=DEFAULT_MAX_ELEMENTS)
    except InvalidCommand as exc:
        raise InvalidCommand(f"message data: {exc.reason}", identifier, "message") from None
    if not isinstance(obj, dict):
        raise InvalidCommand("message data is not a JSON object", identifier, "message")
    action = obj.get("action", "receive")
    if not isinstance(action, str):
        raise InvalidCommand("message action must be a string", identifier, "message")
    return action, obj


# -------------------------------------------------------------------------------------------------
# Server -> client. Plain dicts in the key order PROTOCOL.md shows (dicts keep insertion order, and
# both codecs write keys in that order).


def welcome(sid: str, restored_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """``welcome``; given ``restored_ids`` (a resumed session, ext protocols), also ``restored``."""
    msg: dict[str, Any] = {"type": "welcome", "sid": sid}
    if restored_ids is not None:
        msg["restored"] = True
        msg["restored_ids"] = list(restored_ids)
    return msg


def ping(now: int) -> dict[str, Any]:
    """The keepalive ``ping``; ``now`` is unix time in whole seconds."""
    return {"type": "ping", "message": now}


def pong() -> dict[str, Any]:
    """The answer to a client ``ping`` command (ext protocols)."""
    return {"type": "pong"}


def confirm_subscription(identifier: str) -> dict[str, Any]:
    """Confirm a ``subscribe``."""
    return {"identifier": identifier, "type": "confirm_subscription"}


def reject_subscription(identifier: str) -> dict[str, Any]:
    """Reject a ``subscribe``."""
    return {"identifier": identifier, "type": "reject_subscription"}


def confirm_history(identifier: str) -> dict[str, Any]:
    """Sent after the history messages of a successful ``history`` request (ext protocols)."""
    return {"identifier": identifier, "type": "confirm_history"}


def reject_history(identifier: str) -> dict[str, Any]:
    """A ``history`` request that could not be served (ext protocols)."""
    return {"identifier": identifier, "type": "reject_history"}


def presence_join(pid: str, info: Any = None) -> dict[str, Any]:
    """A presence ``join`` event (the message of a ``presence`` broadcast; Go key order)."""
    if info is None:
        return {"type": "join", "id": pid}
    return {"type": "join", "info": info, "id": pid}


def presence_leave(pid: str) -> dict[str, Any]:
    """A presence ``leave`` event."""
    return {"type": "leave", "id": pid}


def presence_info(
    total: int, records: Sequence[dict[str, Any]] | None = None, *, error: bool = False
) -> dict[str, Any]:
    """The answer to a ``presence`` command: ``total``, and ``records`` unless there are
    none or they were not asked for; ``type: error`` when the broker failed."""
    msg: dict[str, Any] = {"type": "error" if error else "info", "total": total}
    if records:
        msg["records"] = list(records)
    return msg


def presence_message(identifier: str, message: Any) -> dict[str, Any]:
    """A presence event or answer for one subscription."""
    return {"type": "presence", "identifier": identifier, "message": message}


def disconnect(
    reason: str, reconnect: bool, reconnect_after_ms: int | None = None
) -> dict[str, Any]:
    """``disconnect``. ``reconnect`` is always present: the Rails client stops for good without it.

    ``reconnect_after_ms`` adds trio_cable's ``reconnect_after`` advice (ignored by other clients).
    """
    msg: dict[str, Any] = {"type": "disconnect", "reason": reason, "reconnect": bool(reconnect)}
    if reconnect_after_ms is not None:
        msg["reconnect_after"] = reconnect_after_ms
    return msg


def data_message(
    identifier: str,
    message: Any,
    *,
    stream_id: str | None = None,
    epoch: str | None = None,
    offset: int | None = None,
) -> dict[str, Any]:
    """A data frame for one subscription (a transmission or a broadcast).

    ``stream_id``, ``epoch`` and ``offset`` describe a stored broadcast (reliable streams); each is
    included when given.
    """
    msg: dict[str, Any] = {"identifier": identifier, "message": message}
    if stream_id is not None:
        msg["stream_id"] = stream_id
    if epoch is not None:
        msg["epoch"] = epoch
    if offset is not None:
        msg["offset"] = offset
    return msg


# -------------------------------------------------------------------------------------------------
# Broadcasts


def decode_broadcast_data(data: Any, *, max_depth: int = DEFAULT_BROADCAST_MAX_DEPTH) -> Any:
    """A publication's data as the ``message`` clients receive.

    A string is JSON-decoded; if it is not valid JSON (or nests deeper than ``max_depth``) the raw
    string is kept. Broadcasting the *string* ``'"{\\"a\\":1}"'`` therefore arrives as the string
    ``'{"a":1}'``. Non-string data (a JSON value given directly) passes through unchanged.
    """
    if isinstance(data, str):
        try:
            return JSON.decode(data, max_depth=max_depth)
        except InvalidCommand:
            return data
    return data


_MSGPACK_IDENTIFIER_KEY = msgpack.packb("identifier")
_MSGPACK_MESSAGE_KEY = msgpack.packb("message")


class BroadcastEncoder:
    """Encodes one broadcast for many recipients.

    The publication data is decoded once (:func:`decode_broadcast_data`, unless ``decode=False``
    says ``data`` already is the message), the message is encoded once per codec, and the result for
    each ``(codec, identifier)`` pair is built once and cached, so fanning out to N subscribers of a
    few identifiers costs a few encodings, not N.

    The envelope is spliced around the encoded message rather than re-encoding the whole dict; the
    bytes are identical to ``codec.encode(data_message(...))``.
    """

    __slots__ = ("_cache", "_parts_by_codec", "epoch", "kind", "message", "offset", "stream_id")

    def __init__(
        self,
        data: Any,
        *,
        stream_id: str | None = None,
        epoch: str | None = None,
        offset: int | None = None,
        decode: bool = True,
        kind: str | None = None,
    ) -> None:
        self.message: Any = decode_broadcast_data(data) if decode else data
        #: The message's ``type`` (``presence`` for presence events), first in the envelope.
        self.kind = kind
        self.stream_id = stream_id
        self.epoch = epoch
        self.offset = offset
        self._parts_by_codec: dict[Codec, tuple[bytes, bytes, bytes] | None] = {}
        self._cache: dict[tuple[Codec, str], bytes] = {}

    def _parts(self, codec: Codec) -> tuple[bytes, bytes, bytes] | None:
        """``(head, middle, tail)``: the envelope without the identifier, encoded once per codec, so
        that ``head + codec.encode(identifier) + middle + tail`` is the whole data frame payload.
        ``None`` for a codec that cannot be spliced."""
        if codec in self._parts_by_codec:
            return self._parts_by_codec[codec]
        tail_fields = [
            (key, value)
            for key, value in (
                ("stream_id", self.stream_id),
                ("epoch", self.epoch),
                ("offset", self.offset),
            )
            if value is not None
        ]
        parts: tuple[bytes, bytes, bytes] | None
        kind = self.kind
        if codec is JSON:
            head = (
                b'{"identifier":'
                if kind is None
                else b'{"type":' + JSON.encode(kind) + b',"identifier":'
            )
            middle = b',"message":' + JSON.encode(self.message)
            tail = b"".join(b',"' + k.encode() + b'":' + JSON.encode(v) for k, v in tail_fields)
            parts = (head, middle, tail + b"}")
        elif codec is MSGPACK:
            # What msgpack writes for a dict: a fixmap header (0x80 | n, n <= 15), then key, value,
            # key, value ... in insertion order.
            head = bytes([0x80 | (2 + len(tail_fields) + (kind is not None))])
            if kind is not None:
                head += MSGPACK.encode("type") + MSGPACK.encode(kind)
            head += _MSGPACK_IDENTIFIER_KEY
            middle = _MSGPACK_MESSAGE_KEY + MSGPACK.encode(self.message)
            tail = b"".join(MSGPACK.encode(k) + MSGPACK.encode(v) for k, v in tail_fields)
            parts = (head, middle, tail)
        else:
            parts = None
        self._parts_by_codec[codec] = parts
        return parts

    def encode(self, codec: Codec, identifier: str) -> bytes:
        """The payload of the data frame for ``identifier``, encoded with ``codec`` (cached)."""
        key = (codec, identifier)
        result = self._cache.get(key)
        if result is not None:
            return result
        parts = self._parts(codec)
        if parts is not None:
            head, middle, tail = parts
            result = head + codec.encode(identifier) + middle + tail
        elif self.kind is not None:
            result = codec.encode(
                {"type": self.kind, "identifier": identifier, "message": self.message}
            )
        else:
            result = codec.encode(
                data_message(
                    identifier,
                    self.message,
                    stream_id=self.stream_id,
                    epoch=self.epoch,
                    offset=self.offset,
                )
            )
        self._cache[key] = result
        return result


def is_stream_name(name: str) -> bool:
    """True for a usable stream name: a non-empty string that UTF-8 can encode.  JSON's
    ``"\\ud800"`` escape decodes to a lone surrogate, which no broker but the in-memory one
    could store; every broker refuses such names alike, up front."""
    if not name:
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Publication:
    """One message for a stream, from ``POST /_broadcast``, Redis or the application.

    ``data`` is kept as given (usually a JSON *string*; :class:`BroadcastEncoder` decodes it).
    ``exclude_socket`` is the sid of a connection that must not receive it. ``meta`` holds the whole
    ``meta`` object as sent, for options added later.
    """

    stream: str
    data: Any
    exclude_socket: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class RemoteCommand:
    """A command for the server nodes that travels with publications (AnyCable's broadcast
    commands).  Only ``disconnect`` exists: close every connection whose identifiers equal
    ``identifiers``, with ``reason: "remote"``."""

    command: str
    identifiers: dict[str, Any]
    reconnect: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The plain-data form brokers carry between nodes."""
        return {
            "command": self.command,
            "identifiers": self.identifiers,
            "reconnect": self.reconnect,
        }


def _parse_remote_command(obj: dict[str, Any], where: str) -> RemoteCommand:
    # {"command":"disconnect","payload":{"identifier":"<identifiers as JSON>","reconnect":false}}
    if obj.get("command") != "disconnect":
        raise InvalidCommand(f"{where}: unknown broadcast command {str(obj.get('command'))[:50]!r}")
    payload = obj.get("payload")
    if not isinstance(payload, dict):
        raise InvalidCommand(f"{where}: disconnect needs a payload object")
    identifier = payload.get("identifier")
    if isinstance(identifier, str):
        try:
            identifiers = JSON.decode(identifier)
        except InvalidCommand as exc:
            raise InvalidCommand(f"{where}: {exc.reason}") from None
    else:
        identifiers = identifier
    if not isinstance(identifiers, dict) or not identifiers:
        raise InvalidCommand(f"{where}: disconnect needs non-empty identifiers")
    reconnect = payload.get("reconnect", False)
    if not isinstance(reconnect, bool):
        raise InvalidCommand(f"{where}: reconnect must be a boolean")
    return RemoteCommand("disconnect", identifiers, reconnect)


def _parse_publication(obj: Any, where: str) -> Publication | RemoteCommand:
    if not isinstance(obj, dict):
        raise InvalidCommand(f"{where}: publication is not an object")
    if "stream" not in obj and "command" in obj:
        # AnyCable's remote commands (e.g. remote disconnect) share this channel.
        return _parse_remote_command(obj, where)
    stream = obj.get("stream")
    if not isinstance(stream, str) or not stream:
        raise InvalidCommand(f"{where}: stream must be a non-empty string")
    if not is_stream_name(stream):
        raise InvalidCommand(f"{where}: stream name is not valid UTF-8 (a lone surrogate)")
    if "data" not in obj:
        raise InvalidCommand(f"{where}: publication without data")
    meta = obj.get("meta")
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict):
        raise InvalidCommand(f"{where}: meta must be an object")
    exclude_socket = meta.get("exclude_socket")
    if exclude_socket is not None and not isinstance(exclude_socket, str):
        raise InvalidCommand(f"{where}: meta.exclude_socket must be a string")
    return Publication(stream, obj["data"], exclude_socket or None, meta)


def parse_publications(
    body: Payload, *, max_depth: int = DEFAULT_BROADCAST_MAX_DEPTH
) -> list[Publication | RemoteCommand]:
    """Parse a broadcast request body: one publication object, or a list of them.

    ``{"stream": "<non-empty>", "data": <string or any JSON value>, "meta": {"exclude_socket":
    "<sid>"}?}``, or a remote command (:class:`RemoteCommand`). Raises :class:`InvalidCommand`
    (with the reason to answer 400 with) on anything else; nothing is returned unless every
    publication is valid.
    """
    obj = JSON.decode(body, max_depth=max_depth)
    if isinstance(obj, list):
        return [_parse_publication(item, f"publication {i}") for i, item in enumerate(obj)]
    return [_parse_publication(obj, "publication")]
