"""The sans-I/O Action Cable protocol layer: codecs, commands, replies, broadcasts."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_cable.protocol import cable
from trio_cable.protocol.cable import (
    JSON,
    MSGPACK,
    SUBPROTOCOLS,
    UNSUPPORTED,
    BroadcastEncoder,
    Codec,
    History,
    InvalidCommand,
    Message,
    Ping,
    Pong,
    Publication,
    Subscribe,
    Unsubscribe,
    Whisper,
    decode_broadcast_data,
    decode_command,
    parse_action,
    parse_identifier,
    parse_publications,
    select_subprotocol,
    token_from_subprotocols,
)

IDENT = '{"channel":"ChatChannel","room":"1"}'
CODECS = [JSON, MSGPACK]


def enc(codec: Codec, obj: Any) -> bytes:
    """Encode a client frame the way a client library would."""
    if codec is JSON:
        return json.dumps(obj).encode()
    return msgpack.packb(obj, use_bin_type=True)


def invalid(codec: Codec, obj_or_payload: Any, **kwargs: Any) -> InvalidCommand:
    payload = obj_or_payload if isinstance(obj_or_payload, bytes) else enc(codec, obj_or_payload)
    with pytest.raises(InvalidCommand) as info:
        decode_command(codec, payload, **kwargs)
    return info.value


# Values every codec can carry: what a JSON client can send and a JSON client can receive.
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"]))
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=["Cs"])), children, max_size=4)
    ),
    max_leaves=20,
)


def depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def nested(levels: int) -> Any:
    value: Any = 1
    for i in range(levels):
        value = [value] if i % 2 else {"k": value}
    return value


# -- codecs ---------------------------------------------------------------------------------------


def test_codec_attributes() -> None:
    assert (JSON.name, JSON.binary) == ("json", False)
    assert (MSGPACK.name, MSGPACK.binary) == ("msgpack", True)
    assert isinstance(JSON, Codec) and isinstance(MSGPACK, Codec)
    assert repr(JSON) == "<Codec json>"


def test_json_encode_is_compact_utf8() -> None:
    assert JSON.encode({"a": [1, 2.5, None, True], "é": "ü→"}) == (
        '{"a":[1,2.5,null,true],"é":"ü→"}'.encode()
    )


def test_msgpack_encode_uses_bin_type() -> None:
    assert MSGPACK.encode({"a": b"\x00"}) == b"\x81\xa1a\xc4\x01\x00"
    assert MSGPACK.encode("é") == b"\xa2\xc3\xa9"


@given(json_values)
def test_codec_roundtrip(value: Any) -> None:
    for codec in CODECS:
        assert codec.decode(codec.encode(value), max_depth=1000) == value


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b"nope",
        b'{"a":1} trailing',
        b"\xff\xfe{}",  # not UTF-8
        b'\xef\xbb\xbf{"command":"ping"}',  # UTF-8 BOM
        '{"a":1}'.encode("utf-16"),  # json.loads(bytes) would sniff and accept this
        b'"\xed\xa0\x80"',  # an encoded surrogate
        b"NaN",
        b'{"a":Infinity}',
        b'{"a":-Infinity}',
    ],
)
def test_json_decode_garbage(payload: bytes) -> None:
    with pytest.raises(InvalidCommand) as info:
        JSON.decode(payload)
    assert info.value.reason == "invalid JSON"
    assert info.value.identifier is None


def test_json_decode_accepts_str_bytearray_memoryview() -> None:
    for payload in ('{"a":1}', bytearray(b'{"a":1}'), memoryview(b'{"a":1}')):
        assert JSON.decode(payload) == {"a": 1}


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",  # never used byte
        b"\x92\x01",  # truncated array
        b"\x01\x02",  # extra data
        b"\xa2\xff\xfe",  # invalid UTF-8 in a str
        b"\x91" * 100_000 + b"\xc0",  # deeper than the unpacker's own stack
    ],
)
def test_msgpack_decode_garbage(payload: bytes) -> None:
    with pytest.raises(InvalidCommand) as info:
        MSGPACK.decode(payload)
    assert info.value.reason.startswith("invalid msgpack")


@pytest.mark.parametrize(
    "value",
    [
        {1: "int key"},
        {b"k": "bytes key"},
        {"k": b"bytes value"},
        [msgpack.ExtType(1, b"x")],
        {"t": msgpack.Timestamp(0)},
        b"top-level bytes",
        (1.5, [msgpack.ExtType(2, b"")]),
    ],
)
def test_msgpack_decode_refuses_what_json_cannot_carry(value: Any) -> None:
    payload = msgpack.packb(value, use_bin_type=True, strict_types=False, datetime=False)
    with pytest.raises(InvalidCommand) as info:
        MSGPACK.decode(payload)
    assert info.value.reason.startswith("invalid msgpack")


def test_msgpack_decode_refuses_text() -> None:
    with pytest.raises(InvalidCommand):
        MSGPACK.decode('{"a":1}')


@pytest.mark.parametrize("codec", CODECS)
def test_depth_limit_is_exact(codec: Codec) -> None:
    assert depth(nested(32)) == 32
    assert codec.decode(codec.encode(nested(32))) == nested(32)
    with pytest.raises(InvalidCommand) as info:
        codec.decode(codec.encode(nested(33)))
    assert info.value.reason == "too deeply nested"
    assert codec.decode(codec.encode(nested(33)), max_depth=33) == nested(33)


def test_json_absurd_nesting_is_refused_without_recursion() -> None:
    for payload in (b"[" * 1_000_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000):
        with pytest.raises(InvalidCommand) as info:
            JSON.decode(payload)
        assert info.value.reason == "too deeply nested"


def test_brackets_inside_strings_do_not_count() -> None:
    text = json.dumps({"data": "[{" * 5000 + '\\"[' * 100, "list": [[[]]]})
    assert JSON.decode(text)["list"] == [[[]]]


def test_many_shallow_containers_pass_the_exact_scan() -> None:
    text = json.dumps([{"i": i, "l": [i]} for i in range(1000)])
    assert len(JSON.decode(text)) == 1000


@given(json_values, st.integers(min_value=0, max_value=4))
def test_depth_check_matches_the_real_depth(value: Any, max_depth: int) -> None:
    for codec in CODECS:
        payload = codec.encode(value)
        if depth(value) <= max_depth:
            assert codec.decode(payload, max_depth=max_depth) == value
        else:
            with pytest.raises(InvalidCommand, match="too deeply nested"):
                codec.decode(payload, max_depth=max_depth)


def test_json_encode_fallbacks() -> None:
    # Non-finite floats become null (like JSON.stringify), lone surrogates U+FFFD: never invalid
    # JSON, never an exception in the sender.
    assert JSON.encode({"a": math.inf, "b": [-math.inf, math.nan], "c": 1.5}) == (
        b'{"a":null,"b":[null,null],"c":1.5}'
    )
    assert JSON.encode({"\ud800k": "x\udfffy"}) == '{"\ufffdk":"x\ufffdy"}'.encode()
    assert JSON.encode(10**30) == b"1000000000000000000000000000000"


def test_msgpack_encode_fallbacks() -> None:
    assert msgpack.unpackb(MSGPACK.encode({"big": 2**64, "neg": -(2**63) - 1})) == {
        "big": float(2**64),
        "neg": float(-(2**63) - 1),
    }
    assert msgpack.unpackb(MSGPACK.encode([10**400])) == [None]
    assert msgpack.unpackb(MSGPACK.encode("a\ud800")) == "a\ufffd"
    assert msgpack.unpackb(MSGPACK.encode(math.inf)) == math.inf  # msgpack carries it as is
    assert MSGPACK.encode(2**64 - 1) == b"\xcf" + b"\xff" * 8  # still an int at the edge


def test_json_decodes_lone_surrogate_escapes_and_reencodes_them() -> None:
    value = JSON.decode(b'{"a":"\\ud800"}')
    assert value == {"a": "\ud800"}
    assert JSON.encode(value) == '{"a":"\ufffd"}'.encode()


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_garbage_only_ever_raises_invalid_command(payload: bytes) -> None:
    for codec in CODECS:
        with contextlib.suppress(InvalidCommand):
            decode_command(codec, payload)


# -- subprotocols ---------------------------------------------------------------------------------


def test_subprotocol_table() -> None:
    assert {name: (sp.codec, sp.extended) for name, sp in SUBPROTOCOLS.items()} == {
        "actioncable-v1-json": (JSON, False),
        "actioncable-v1-ext-json": (JSON, True),
        "actioncable-v1-msgpack": (MSGPACK, False),
        "actioncable-v1-ext-msgpack": (MSGPACK, True),
    }
    assert all(sp.name == name for name, sp in SUBPROTOCOLS.items())
    assert UNSUPPORTED == "actioncable-unsupported"


@pytest.mark.parametrize(
    ("offered", "expected"),
    [
        (["actioncable-v1-json", "actioncable-unsupported"], "actioncable-v1-json"),
        (["actioncable-v1-ext-json", "actioncable-v1-json"], "actioncable-v1-ext-json"),
        (["actioncable-v1-json", "actioncable-v1-ext-json"], "actioncable-v1-json"),
        (["anycable-token.abc", "actioncable-v1-ext-msgpack"], "actioncable-v1-ext-msgpack"),
        (["graphql-ws", " actioncable-v1-msgpack "], "actioncable-v1-msgpack"),
        (["actioncable-unsupported"], None),
        (["anycable-token.actioncable-v1-json"], None),
        (["ACTIONCABLE-V1-JSON"], None),  # subprotocol names are case-sensitive
        ([], None),
    ],
)
def test_select_subprotocol(offered: list[str], expected: str | None) -> None:
    selected = select_subprotocol(offered)
    assert (selected.name if selected else None) == expected


def test_token_from_subprotocols() -> None:
    assert token_from_subprotocols(["actioncable-v1-json", "anycable-token.a.b.c"]) == "a.b.c"
    assert token_from_subprotocols(["anycable-token.", "anycable-token.x", "anycable-token.y"]) == (
        "x"
    )
    assert token_from_subprotocols(["actioncable-v1-json"]) is None
    assert token_from_subprotocols([]) is None


# -- decode_command: valid ------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_decode_subscribe(codec: Codec) -> None:
    cmd = decode_command(codec, enc(codec, {"command": "subscribe", "identifier": IDENT}))
    assert cmd == Subscribe(IDENT)


def test_identifier_is_kept_byte_for_byte() -> None:
    # Key order, spacing and escapes of the identifier string survive untouched.
    ident = '{ "room":"1" ,"channel":"Chat\\u0043hannel"}'
    payload = json.dumps({"command": "subscribe", "identifier": ident}).encode()
    assert decode_command(JSON, payload).identifier == ident


@pytest.mark.parametrize("codec", CODECS)
def test_decode_unsubscribe(codec: Codec) -> None:
    cmd = decode_command(codec, enc(codec, {"command": "unsubscribe", "identifier": IDENT}))
    assert cmd == Unsubscribe(IDENT)


@pytest.mark.parametrize("codec", CODECS)
def test_decode_message(codec: Codec) -> None:
    data = json.dumps({"action": "speak", "text": "hi"})
    cmd = decode_command(
        codec, enc(codec, {"command": "message", "identifier": IDENT, "data": data})
    )
    assert cmd == Message(IDENT, data)
    assert parse_action(cmd.data) == ("speak", {"action": "speak", "text": "hi"})


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("name", ["ping", "pong"])
def test_decode_ping_pong(codec: Codec, name: str) -> None:
    assert decode_command(codec, enc(codec, {"command": name})).name == name
    expected = Ping() if name == "ping" else Pong()
    assert decode_command(codec, enc(codec, {"command": name})) == expected
    # An identifier on ping/pong is ignored rather than validated.
    assert decode_command(codec, enc(codec, {"command": name, "identifier": 5})) == expected


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("data", [{"typing": True}, "text", None, [1, 2], 3.5])
def test_decode_whisper(codec: Codec, data: Any) -> None:
    cmd = decode_command(
        codec, enc(codec, {"command": "whisper", "identifier": IDENT, "data": data})
    )
    assert cmd == Whisper(IDENT, data)


HISTORY = {"since": 1700000000, "streams": {"chat/1": {"epoch": "e1", "offset": 12}}}


@pytest.mark.parametrize("codec", CODECS)
def test_decode_history(codec: Codec) -> None:
    raw = {"command": "history", "identifier": IDENT, "history": HISTORY}
    assert decode_command(codec, enc(codec, raw)) == History(IDENT, HISTORY)


@pytest.mark.parametrize(
    ("history", "normalized"),
    [
        ({"since": 1.5}, {"since": 1.5}),
        ({"since": 0}, {"since": 0}),
        ({"streams": {}}, {"streams": {}}),
        ({}, {}),
        ({"since": None, "streams": None}, {}),
        (
            {"streams": {"s": {"epoch": "", "offset": 0, "extra": 1}}, "unknown": True},
            {"streams": {"s": {"epoch": "", "offset": 0}}},
        ),
    ],
)
def test_history_is_normalized(history: dict[str, Any], normalized: dict[str, Any]) -> None:
    raw = {"command": "history", "identifier": IDENT, "history": history}
    assert decode_command(JSON, enc(JSON, raw)).history == normalized


@pytest.mark.parametrize("codec", CODECS)
def test_decode_subscribe_with_history(codec: Codec) -> None:
    raw: dict[str, Any] = {"command": "subscribe", "identifier": IDENT, "history": HISTORY}
    assert decode_command(codec, enc(codec, raw)) == Subscribe(IDENT, HISTORY)
    raw["history"] = None
    assert decode_command(codec, enc(codec, raw)) == Subscribe(IDENT)


def test_unknown_keys_are_ignored() -> None:
    raw = {"command": "subscribe", "identifier": IDENT, "extra": {"x": 1}, "data": 5}
    assert decode_command(JSON, enc(JSON, raw)) == Subscribe(IDENT)


# -- decode_command: errors -----------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("value", [[], "subscribe", 1, None, [{"command": "ping"}]])
def test_not_an_object(codec: Codec, value: Any) -> None:
    err = invalid(codec, value)
    assert (err.reason, err.identifier, err.command) == ("not an object", None, None)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"identifier": IDENT}, "missing command"),
        ({"command": None, "identifier": IDENT}, "missing command"),
        ({"command": 1, "identifier": IDENT}, "command must be a string"),
        ({"command": ["subscribe"], "identifier": IDENT}, "command must be a string"),
        ({"command": "fly", "identifier": IDENT}, "unknown command 'fly'"),
        ({"command": "SUBSCRIBE", "identifier": IDENT}, "unknown command 'SUBSCRIBE'"),
        ({"command": ""}, "unknown command ''"),
    ],
)
def test_bad_command_field(codec: Codec, raw: dict[str, Any], reason: str) -> None:
    err = invalid(codec, raw)
    assert (err.reason, err.identifier, err.command) == (reason, None, None)


def test_unknown_command_reason_is_truncated() -> None:
    err = invalid(JSON, {"command": "x" * 10_000})
    assert len(err.reason) < 100


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("name", ["subscribe", "unsubscribe", "message", "history", "whisper"])
@pytest.mark.parametrize(
    ("identifier", "reason"),
    [
        (None, "missing identifier"),
        (42, "identifier must be a string"),
        ({"channel": "ChatChannel"}, "identifier must be a string"),  # must be a JSON *string*
        ("", "empty identifier"),
        ("x" * 4097, "identifier too long (4097 > 4096)"),
    ],
)
def test_bad_identifier(codec: Codec, name: str, identifier: Any, reason: str) -> None:
    raw: dict[str, Any] = {"command": name, "data": "{}", "history": {}}
    if identifier is not None:
        raw["identifier"] = identifier
    err = invalid(codec, raw)
    assert (err.reason, err.identifier, err.command) == (reason, None, name)


def test_identifier_size_limit_is_configurable() -> None:
    raw = {"command": "subscribe", "identifier": "x" * 4097}
    assert decode_command(JSON, enc(JSON, raw), max_identifier_size=5000).identifier == "x" * 4097
    err = invalid(JSON, {"command": "subscribe", "identifier": "x" * 11}, max_identifier_size=10)
    assert err.reason == "identifier too long (11 > 10)"


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({}, "message without data"),
        ({"data": None}, "message data must be a string"),
        ({"data": {"action": "speak"}}, "message data must be a string"),
        ({"data": 1}, "message data must be a string"),
    ],
)
def test_bad_message_data(codec: Codec, extra: dict[str, Any], reason: str) -> None:
    err = invalid(codec, {"command": "message", "identifier": IDENT, **extra})
    assert (err.reason, err.identifier, err.command) == (reason, IDENT, "message")


@pytest.mark.parametrize("codec", CODECS)
def test_whisper_without_data(codec: Codec) -> None:
    err = invalid(codec, {"command": "whisper", "identifier": IDENT})
    assert (err.reason, err.identifier, err.command) == ("whisper without data", IDENT, "whisper")


@pytest.mark.parametrize("codec", CODECS)
def test_history_without_history(codec: Codec) -> None:
    err = invalid(codec, {"command": "history", "identifier": IDENT})
    assert (err.reason, err.identifier, err.command) == (
        "history command without history",
        IDENT,
        "history",
    )


BAD_HISTORIES: list[tuple[Any, str]] = [
    (None, "history must be an object"),
    ([], "history must be an object"),
    ("since", "history must be an object"),
    ({"since": "yesterday"}, "history.since must be a non-negative number (unix seconds)"),
    ({"since": True}, "history.since must be a non-negative number (unix seconds)"),
    ({"since": -1}, "history.since must be a non-negative number (unix seconds)"),
    ({"since": [1]}, "history.since must be a non-negative number (unix seconds)"),
    ({"streams": []}, "history.streams must be an object"),
    ({"streams": "s"}, "history.streams must be an object"),
    (
        {"streams": {"": {"epoch": "e", "offset": 1}}},
        "history.streams keys must be non-empty strings",
    ),
    ({"streams": {"s": None}}, "history.streams['s'] must be an object"),
    ({"streams": {"s": [1]}}, "history.streams['s'] must be an object"),
    ({"streams": {"s": {"offset": 1}}}, "history.streams['s'].epoch must be a string"),
    ({"streams": {"s": {"epoch": 1, "offset": 1}}}, "history.streams['s'].epoch must be a string"),
    (
        {"streams": {"s": {"epoch": "e"}}},
        "history.streams['s'].offset must be a non-negative integer",
    ),
    (
        {"streams": {"s": {"epoch": "e", "offset": "1"}}},
        "history.streams['s'].offset must be a non-negative integer",
    ),
    (
        {"streams": {"s": {"epoch": "e", "offset": 1.5}}},
        "history.streams['s'].offset must be a non-negative integer",
    ),
    (
        {"streams": {"s": {"epoch": "e", "offset": -1}}},
        "history.streams['s'].offset must be a non-negative integer",
    ),
    (
        {"streams": {"s": {"epoch": "e", "offset": True}}},
        "history.streams['s'].offset must be a non-negative integer",
    ),
]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("history", "reason"), BAD_HISTORIES)
def test_bad_history(codec: Codec, history: Any, reason: str) -> None:
    err = invalid(codec, {"command": "history", "identifier": IDENT, "history": history})
    assert (err.reason, err.identifier, err.command) == (reason, IDENT, "history")


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("history", "reason"), [h for h in BAD_HISTORIES if h[0] is not None])
def test_bad_subscribe_history(codec: Codec, history: Any, reason: str) -> None:
    err = invalid(codec, {"command": "subscribe", "identifier": IDENT, "history": history})
    assert (err.reason, err.identifier, err.command) == (reason, IDENT, "subscribe")


def test_history_since_must_be_finite() -> None:
    raw = {"command": "history", "identifier": IDENT, "history": {"since": math.inf}}
    err = invalid(MSGPACK, raw)
    assert err.reason.startswith("history.since")


@pytest.mark.parametrize("codec", CODECS)
def test_decode_errors_before_parsing_are_not_attributed(codec: Codec) -> None:
    err = invalid(codec, b"\xc1{")
    assert err.identifier is None and err.command is None


@pytest.mark.parametrize("codec", CODECS)
def test_deep_command_is_refused(codec: Codec) -> None:
    raw = {"command": "whisper", "identifier": IDENT, "data": nested(40)}
    err = invalid(codec, raw)
    assert err.reason == "too deeply nested"
    assert decode_command(codec, enc(codec, raw), max_depth=64).data == nested(40)


def test_deep_data_string_is_not_the_commands_depth() -> None:
    # message.data is a string: its nesting is parse_action's business, not decode_command's.
    data = json.dumps(nested(40))
    cmd = decode_command(JSON, enc(JSON, {"command": "message", "identifier": IDENT, "data": data}))
    assert cmd.data == data
    with pytest.raises(InvalidCommand, match="too deeply nested"):
        parse_action(data)


def test_invalid_command_is_an_exception_with_reason() -> None:
    err = InvalidCommand("boom", "id", "subscribe")
    assert str(err) == "boom"
    assert (err.reason, err.identifier, err.command) == ("boom", "id", "subscribe")
    assert InvalidCommand("x").identifier is None


# -- identifiers and actions ----------------------------------------------------------------------


def test_parse_identifier() -> None:
    assert parse_identifier(IDENT) == ("ChatChannel", {"room": "1"})
    assert parse_identifier('{"channel":"$pubsub","signed_stream_name":"x--y"}') == (
        "$pubsub",
        {"signed_stream_name": "x--y"},
    )
    assert parse_identifier('{"room":{"id":[1,2]},"channel":"A"}') == (
        "A",
        {"room": {"id": [1, 2]}},
    )


@pytest.mark.parametrize(
    "identifier",
    [
        "ChatChannel",
        "{",
        '["ChatChannel"]',
        '"ChatChannel"',
        '{"room":"1"}',
        '{"channel":null}',
        '{"channel":1}',
        '{"channel":""}',
        '{"channel":{"name":"x"}}',
        '{"channel":"A","x":' + "[" * 50 + "]" * 50 + "}",
        "",
    ],
)
def test_parse_identifier_errors(identifier: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        parse_identifier(identifier)
    assert info.value.identifier == identifier


def test_parse_action() -> None:
    assert parse_action('{"action":"speak","text":"hi"}') == (
        "speak",
        {"action": "speak", "text": "hi"},
    )
    assert parse_action('{"text":"hi"}') == ("receive", {"text": "hi"})
    assert parse_action("{}") == ("receive", {})


@pytest.mark.parametrize(
    "data", ["", "speak", "[]", '"speak"', "null", '{"action":1}', '{"action":null}', "{"]
)
def test_parse_action_errors(data: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        parse_action(data, identifier=IDENT)
    assert info.value.identifier == IDENT
    assert info.value.command == "message"


# -- server -> client builders: exact bytes -------------------------------------------------------


def mp_str(s: str) -> bytes:
    raw = s.encode()
    assert len(raw) < 32
    return bytes([0xA0 | len(raw)]) + raw


def mp_map(*pairs: tuple[str, bytes]) -> bytes:
    """A msgpack map written by hand: fixmap header, then key, value pairs in order."""
    return bytes([0x80 | len(pairs)]) + b"".join(mp_str(k) + v for k, v in pairs)


ID = '{"channel":"C"}'

BUILDERS = [
    (
        cable.welcome("abc"),
        b'{"type":"welcome","sid":"abc"}',
        mp_map(("type", mp_str("welcome")), ("sid", mp_str("abc"))),
    ),
    (
        cable.welcome("new", restored_ids=[ID]),
        b'{"type":"welcome","sid":"new","restored":true,"restored_ids":["{\\"channel\\":\\"C\\"}"]}',
        mp_map(
            ("type", mp_str("welcome")),
            ("sid", mp_str("new")),
            ("restored", b"\xc3"),
            ("restored_ids", b"\x91" + mp_str(ID)),
        ),
    ),
    (
        cable.welcome("new", restored_ids=[]),
        b'{"type":"welcome","sid":"new","restored":true,"restored_ids":[]}',
        mp_map(
            ("type", mp_str("welcome")),
            ("sid", mp_str("new")),
            ("restored", b"\xc3"),
            ("restored_ids", b"\x90"),
        ),
    ),
    (
        cable.ping(1700000000),
        b'{"type":"ping","message":1700000000}',
        mp_map(("type", mp_str("ping")), ("message", b"\xce" + (1700000000).to_bytes(4, "big"))),
    ),
    (cable.pong(), b'{"type":"pong"}', mp_map(("type", mp_str("pong")))),
    (
        cable.confirm_subscription(ID),
        b'{"identifier":"{\\"channel\\":\\"C\\"}","type":"confirm_subscription"}',
        mp_map(("identifier", mp_str(ID)), ("type", mp_str("confirm_subscription"))),
    ),
    (
        cable.reject_subscription(ID),
        b'{"identifier":"{\\"channel\\":\\"C\\"}","type":"reject_subscription"}',
        mp_map(("identifier", mp_str(ID)), ("type", mp_str("reject_subscription"))),
    ),
    (
        cable.confirm_history(ID),
        b'{"identifier":"{\\"channel\\":\\"C\\"}","type":"confirm_history"}',
        mp_map(("identifier", mp_str(ID)), ("type", mp_str("confirm_history"))),
    ),
    (
        cable.reject_history(ID),
        b'{"identifier":"{\\"channel\\":\\"C\\"}","type":"reject_history"}',
        mp_map(("identifier", mp_str(ID)), ("type", mp_str("reject_history"))),
    ),
    (
        cable.disconnect("unauthorized", False),
        b'{"type":"disconnect","reason":"unauthorized","reconnect":false}',
        mp_map(
            ("type", mp_str("disconnect")),
            ("reason", mp_str("unauthorized")),
            ("reconnect", b"\xc2"),
        ),
    ),
    (
        cable.disconnect("server_restart", True, reconnect_after_ms=2500),
        b'{"type":"disconnect","reason":"server_restart","reconnect":true,"reconnect_after":2500}',
        mp_map(
            ("type", mp_str("disconnect")),
            ("reason", mp_str("server_restart")),
            ("reconnect", b"\xc3"),
            ("reconnect_after", b"\xcd\x09\xc4"),
        ),
    ),
    (
        cable.data_message(ID, {"text": "hé"}),
        '{"identifier":"{\\"channel\\":\\"C\\"}","message":{"text":"hé"}}'.encode(),
        mp_map(("identifier", mp_str(ID)), ("message", mp_map(("text", mp_str("hé"))))),
    ),
    (
        cable.data_message(ID, '{"a":1}'),
        b'{"identifier":"{\\"channel\\":\\"C\\"}","message":"{\\"a\\":1}"}',
        mp_map(("identifier", mp_str(ID)), ("message", mp_str('{"a":1}'))),
    ),
    (
        cable.data_message(ID, 7, stream_id="chat/1", epoch="ep", offset=300),
        b'{"identifier":"{\\"channel\\":\\"C\\"}","message":7,"stream_id":"chat/1","epoch":"ep",'
        b'"offset":300}',
        mp_map(
            ("identifier", mp_str(ID)),
            ("message", b"\x07"),
            ("stream_id", mp_str("chat/1")),
            ("epoch", mp_str("ep")),
            ("offset", b"\xcd\x01\x2c"),
        ),
    ),
]


@pytest.mark.parametrize(("message", "json_bytes", "msgpack_bytes"), BUILDERS)
def test_builder_bytes(message: dict[str, Any], json_bytes: bytes, msgpack_bytes: bytes) -> None:
    assert JSON.encode(message) == json_bytes
    assert MSGPACK.encode(message) == msgpack_bytes


def test_disconnect_always_has_reconnect() -> None:
    msg = cable.disconnect("remote", 0)  # type: ignore[arg-type]
    assert msg["reconnect"] is False
    assert list(msg) == ["type", "reason", "reconnect"]


def test_builders_return_fresh_dicts() -> None:
    a = cable.pong()
    a["x"] = 1
    assert cable.pong() == {"type": "pong"}


# -- broadcasts -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"a":1}', {"a": 1}),
        ('"{\\"a\\":1}"', '{"a":1}'),  # the *string* '{"a":1}' arrives as a string
        ("[1,2]", [1, 2]),
        ("42", 42),
        ("null", None),
        ("hello", "hello"),  # not JSON: the raw string
        ("", ""),
        ("{", "{"),
        ("NaN", "NaN"),
        ("[" * 300 + "]" * 300, "[" * 300 + "]" * 300),  # deeper than the broadcast limit
        ({"already": "decoded"}, {"already": "decoded"}),
        ([1], [1]),
        (3, 3),
        (None, None),
    ],
)
def test_decode_broadcast_data(data: Any, message: Any) -> None:
    assert decode_broadcast_data(data) == message


def test_broadcast_string_json_arrives_as_string() -> None:
    encoder = BroadcastEncoder(json.dumps('{"a":1}'))
    assert (
        encoder.encode(JSON, ID)
        == b'{"identifier":"{\\"channel\\":\\"C\\"}","message":"{\\"a\\":1}"}'
    )


stream_fields = st.fixed_dictionaries(
    {},
    optional={
        "stream_id": st.text(),
        "epoch": st.text(),
        "offset": st.integers(min_value=0, max_value=2**63),
    },
)


@settings(max_examples=300)
@given(
    data=json_values,
    as_string=st.booleans(),
    identifiers=st.lists(st.text(), min_size=1, max_size=4),
    fields=stream_fields,
)
def test_broadcast_encoder_matches_whole_encoding(
    data: Any, as_string: bool, identifiers: list[str], fields: dict[str, Any]
) -> None:
    raw = json.dumps(data) if as_string else data
    encoder = BroadcastEncoder(raw, **fields)
    assert encoder.message == data
    for identifier in identifiers:
        for codec in CODECS:
            expected = codec.encode(cable.data_message(identifier, data, **fields))
            assert encoder.encode(codec, identifier) == expected


@given(
    data=st.recursive(
        st.floats() | st.text() | st.integers(min_value=-(2**70), max_value=2**70),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(), c, max_size=3),
        max_leaves=10,
    ),
    identifier=st.text(),
)
def test_broadcast_encoder_matches_even_with_fallbacks(data: Any, identifier: str) -> None:
    # NaN, infinities, lone surrogates, huge ints: sanitized, and still byte-identical.
    encoder = BroadcastEncoder(data, decode=False)
    for codec in CODECS:
        assert encoder.encode(codec, identifier) == codec.encode(
            cable.data_message(identifier, data)
        )


def test_broadcast_encoder_caches() -> None:
    encoder = BroadcastEncoder('{"text":"hi"}', stream_id="s", epoch="e", offset=1)
    first = encoder.encode(JSON, ID)
    assert encoder.encode(JSON, ID) is first
    assert encoder.encode(MSGPACK, ID) is not first
    assert encoder.encode(MSGPACK, ID) is encoder.encode(MSGPACK, ID)
    assert json.loads(first) == {
        "identifier": ID,
        "message": {"text": "hi"},
        "stream_id": "s",
        "epoch": "e",
        "offset": 1,
    }


def test_broadcast_encoder_decodes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Any] = []
    real = cable.decode_broadcast_data

    def counting(data: Any, **kwargs: Any) -> Any:
        calls.append(data)
        return real(data, **kwargs)

    monkeypatch.setattr(cable, "decode_broadcast_data", counting)
    encoder = BroadcastEncoder('{"a":1}')
    for i in range(10):
        for codec in CODECS:
            encoder.encode(codec, f'{{"channel":"C{i}"}}')
    assert calls == ['{"a":1}']


def test_broadcast_encoder_decode_false_keeps_strings() -> None:
    encoder = BroadcastEncoder('{"a":1}', decode=False)
    assert encoder.message == '{"a":1}'


def test_broadcast_encoder_other_codec() -> None:
    class Upper(Codec):
        __slots__ = ()

        def encode(self, obj: Any) -> bytes:
            return JSON.encode(obj).upper()

    encoder = BroadcastEncoder('{"a":"b"}')
    assert encoder.encode(Upper("upper", False), ID) == (
        b'{"IDENTIFIER":"{\\"CHANNEL\\":\\"C\\"}","MESSAGE":{"A":"B"}}'
    )


# -- publications ---------------------------------------------------------------------------------


def test_single_publication() -> None:
    body = b'{"stream":"chat/1","data":"{\\"text\\":\\"hi\\"}"}'
    assert parse_publications(body) == [Publication("chat/1", '{"text":"hi"}')]


def test_publication_list_and_meta() -> None:
    body = json.dumps(
        [
            {"stream": "a", "data": "1", "meta": {"exclude_socket": "sid-1", "transient": True}},
            {"stream": "b", "data": {"raw": "object"}, "meta": None},
            {"stream": "c", "data": None, "meta": {"exclude_socket": None}},
            {"stream": "d", "data": "x", "meta": {"exclude_socket": ""}},
        ]
    )
    pubs = parse_publications(body.encode())
    assert pubs == [
        Publication("a", "1", "sid-1", {"exclude_socket": "sid-1", "transient": True}),
        Publication("b", {"raw": "object"}),
        Publication("c", None, None, {"exclude_socket": None}),
        Publication("d", "x", None, {"exclude_socket": ""}),
    ]


def test_empty_publication_list() -> None:
    assert parse_publications(b"[]") == []


def test_publication_accepts_str_body() -> None:
    assert parse_publications('{"stream":"s","data":"1"}') == [Publication("s", "1")]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "invalid JSON"),
        (b"", "invalid JSON"),
        (b'"a string"', "publication: publication is not an object"),
        (b"42", "publication: publication is not an object"),
        (b"[1]", "publication 0: publication is not an object"),
        (b'{"data":"x"}', "publication: stream must be a non-empty string"),
        (b'{"stream":"","data":"x"}', "publication: stream must be a non-empty string"),
        (b'{"stream":1,"data":"x"}', "publication: stream must be a non-empty string"),
        (b'{"stream":["a"],"data":"x"}', "publication: stream must be a non-empty string"),
        (b'{"stream":"s"}', "publication: publication without data"),
        (b'{"stream":"s","data":"x","meta":[]}', "publication: meta must be an object"),
        (b'{"stream":"s","data":"x","meta":"m"}', "publication: meta must be an object"),
        (
            b'{"stream":"s","data":"x","meta":{"exclude_socket":1}}',
            "publication: meta.exclude_socket must be a string",
        ),
        (
            b'[{"stream":"s","data":"x"},{"stream":"t"}]',
            "publication 1: publication without data",
        ),
        (
            b'{"command":"disconnect","payload":{"identifier":"x"}}',
            "publication: invalid JSON",  # the identifier must be JSON identifiers
        ),
        (
            b'{"command":"disconnect","payload":{"identifier":"{}"}}',
            "publication: disconnect needs non-empty identifiers",
        ),
        (b'{"command":"disconnect"}', "publication: disconnect needs a payload object"),
        (b'{"command":"restart","payload":{}}', "publication: unknown broadcast command 'restart'"),
        (b"[" * 100_000, "too deeply nested"),
    ],
)
def test_bad_publications(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidCommand) as info:
        parse_publications(body)
    assert info.value.reason == reason


def test_publication_is_frozen() -> None:
    pub = Publication("s", "d")
    with pytest.raises(AttributeError):
        pub.stream = "t"  # type: ignore[misc]
    assert pub.meta == {} and pub.exclude_socket is None


def test_remote_disconnect_command_publication():
    from trio_cable.protocol.cable import RemoteCommand

    body = (
        b'{"command":"disconnect",'
        b'"payload":{"identifier":"{\\"user\\":\\"ann\\"}","reconnect":true}}'
    )
    (item,) = parse_publications(body)
    assert item == RemoteCommand("disconnect", {"user": "ann"}, True)
    assert item.to_dict() == {
        "command": "disconnect",
        "identifiers": {"user": "ann"},
        "reconnect": True,
    }
