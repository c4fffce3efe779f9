"""The hostile inputs of issue 14, built by hand (no hypothesis needed).

The amplification payloads are the frames that cost the most to decode per byte sent: a
megabyte of msgpack empty arrays (one byte each on the wire, a Python list each once
unpacked) and JSON made of ``[`` (a nesting level per byte, or a bracket per byte inside a
string that a depth scan must walk).  The stall prefixes are the first bytes of requests that
never finish.  The fuzz campaign (:mod:`bench.fuzz.strategies`), the hostile-patterns bench
(:mod:`bench.hostile`) and ``tests/test_hostile_patterns.py`` send these same bytes.
"""

from __future__ import annotations

import msgpack

#: The default ``--max-message-size``: the worst frames of issue 14 are this size.
MIB = 1 << 20

#: The first 11 bytes of a TLS ClientHello (record header, handshake type and length, the
#: client version), and nothing more: a TLS handshake that stops.
PARTIAL_CLIENT_HELLO = bytes.fromhex("1603010200010001fc0303")

#: An upgrade request cut before its blank line.
PARTIAL_HEAD = b"GET /cable HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"


def _post_head(key: str | None, framing: str) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST /_broadcast HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}{framing}\r\n\r\n").encode()


def partial_body(key: str | None = None) -> bytes:
    """A ``POST /_broadcast`` (with the broadcast *key*, if any: without it a keyed server
    answers ``401`` at once) whose ``Content-Length`` body never comes in full."""
    return _post_head(key, "Content-Length: 10") + b"abc"


def partial_chunked(key: str | None = None) -> bytes:
    """The same with a chunked body that never sends its last chunk."""
    return _post_head(key, "Transfer-Encoding: chunked") + b"5\r\nab"


_MSGPACK_HEAD = b"\x82" + msgpack.packb("command") + msgpack.packb("ping") + msgpack.packb("x")
_JSON_HEAD = b'{"command":"ping","x":'


def msgpack_amplifier(size: int = MIB) -> bytes:
    """``{"command":"ping","x":[<array32 of empty arrays>]}``, *size* bytes long: one byte
    per empty array on the wire (1.85 s of CPU and ~150 MB unpacked before issue 14)."""
    n = max(0, size - len(_MSGPACK_HEAD) - 5)
    return _MSGPACK_HEAD + b"\xdd" + n.to_bytes(4, "big") + b"\x90" * n


def msgpack_nested_amplifier(size: int = MIB) -> bytes:
    """``{"command":"ping","x":[[[[...`` nested one level per byte, *size* bytes long (the
    innermost array is empty)."""
    return _MSGPACK_HEAD + b"\x91" * max(0, size - len(_MSGPACK_HEAD) - 1) + b"\x90"


def json_bracket_string(size: int = MIB) -> bytes:
    """``{"command":"ping","x":"[[[[...."}``: a string of *size* bytes, all of it ``[``
    (0.45 s of CPU before issue 14: a depth scan that counted brackets inside strings)."""
    n = max(0, size - len(_JSON_HEAD) - 3)
    return _JSON_HEAD + b'"' + b"[" * n + b'"}'


def json_bracket_depth(size: int = MIB) -> bytes:
    """``{"command":"ping","x":[[[[...``: one nesting level per byte, never closed."""
    return _JSON_HEAD + b"[" * max(0, size - len(_JSON_HEAD))


def json_empty_arrays(size: int = MIB) -> bytes:
    """``{"command":"ping","x":[[],[],...]}``: an element per three bytes."""
    n = max(1, (size - len(_JSON_HEAD) - 3) // 3)
    return _JSON_HEAD + b"[" + b"[]," * (n - 1) + b"[]]}"


#: Every amplifier by name, as (builder, WebSocket opcode, subprotocol it is sent on).
AMPLIFIERS = {
    "msgpack-arrays": (msgpack_amplifier, 2, "actioncable-v1-msgpack"),
    "msgpack-nested": (msgpack_nested_amplifier, 2, "actioncable-v1-msgpack"),
    "json-bracket-string": (json_bracket_string, 1, "actioncable-v1-json"),
    "json-bracket-depth": (json_bracket_depth, 1, "actioncable-v1-json"),
    "json-empty-arrays": (json_empty_arrays, 1, "actioncable-v1-json"),
}
