"""``python -m bench fuzz``: a hypothesis fuzz campaign on the protocol layer and a live server.

Targets, run round-robin until the time is up (``--minutes``, default 10):

``decode-json`` / ``decode-msgpack``
    :func:`~trio_cable.protocol.cable.decode_command` on valid commands that were then mutated
    (bytes flipped, inserted, deleted, truncated, spliced with another command, nesting deepened,
    blown up past the size limits, odd tokens such as ``NaN``, lone surrogates, msgpack
    extension types and 4-GiB length prefixes dropped in), followed by
    :func:`~trio_cable.protocol.cable.parse_identifier` and
    :func:`~trio_cable.protocol.cable.parse_action` on what it accepted.  The only exception
    allowed is :class:`~trio_cable.protocol.cable.InvalidCommand`; accepted commands must be
    well-typed and re-encodable by both codecs (a whisper from a msgpack client may go to a
    JSON client); every call must return within :data:`HANG_SECONDS`.
``publications``
    :func:`~trio_cable.protocol.cable.parse_publications` on mutated broadcast bodies, then the
    server's fan-out encoding (:class:`~trio_cable.protocol.cable.BroadcastEncoder`) of every
    accepted publication in both codecs.
``frames``
    mutated streams of valid client frames (carrying the mutated commands above), cut into
    random chunks, fed to the compiled (``trio_cable._speedups``) and the pure
    (``trio_cable._speedups_py``) parser: both must agree on every event and error, whole or
    chunked, and keep RFC 6455's promises (close codes 1002/1007/1009 only, text is UTF-8,
    messages within the size limit).
``live``
    a real ``python -m trio_cable serve`` process; each example is a batch of connections that
    send mutated upgrade requests, frames and commands in random chunks over real sockets.
    After every batch a well-behaved client must still connect, subscribe and receive a
    broadcast; the server's RSS and open fds are sampled, its log is scanned for tracebacks,
    and close codes other than the ones the bad-input table promises (or 1011) count as
    failures.

Results: ``bench/results/fuzz.json`` (``--out``) and a Markdown section (``--md``) for
``bench/RESULTS-hardening.md``.  ``tests/test_fuzz.py`` runs the same strategies and checks for
a few seconds each.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

from trio_cable import _speedups_py
from trio_cable.protocol import cable
from trio_cable.protocol.cable import InvalidCommand

try:
    from trio_cable import _speedups as _compiled
except ImportError:  # pragma: no cover - the extension is built in CI
    _compiled = None

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "bench" / "results" / "fuzz.json"
RESULTS_MD = ROOT / "bench" / "results" / "fuzz.md"
PLOT_PNG = ROOT / "bench" / "plots" / "fuzz.png"

#: A single decode / parse call taking longer than this is reported as a hang.
HANG_SECONDS = 5.0
#: Largest input the generators build (the server's default message limit is 1 MiB; these
#: stay below it so that a campaign explores many inputs rather than copying big ones).
MAX_INPUT = 80 * 1024
#: Longest repr of a failing input kept in the results (enough for any generated input).
MAX_EXAMPLE_REPR = 1 << 20
#: Cheap random mutants checked around every hypothesis example of the decoder targets.
MUTANTS_PER_EXAMPLE = 16
#: CPU budget of one check in the campaign: SLOW_BASE_S + SLOW_PER_BYTE_S x input size.  Linear
#: code stays orders of magnitude below it (a JSON decode of 80 KiB takes about a millisecond);
#: superlinear code (the event loop is blocked meanwhile) goes over it.  CPU time of this
#: thread, not wall time, so that a busy machine does not make false alarms.
SLOW_BASE_S = 0.25
SLOW_PER_BYTE_S = 10e-6

FrameErrorT = _speedups_py.FrameError

# =================================================================================================
# Inputs


CHANNELS = ["$pubsub", "BenchmarkChannel", "Turbo::StreamsChannel", "ChatChannel", "", "x" * 300]
COMMAND_NAMES = ["subscribe", "unsubscribe", "message", "history", "whisper", "ping", "pong"]


def odd_values(depth: int = 2) -> st.SearchStrategy[Any]:
    """JSON-ish values of every type, including the awkward ones (huge ints, long strings)."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=30),
        st.sampled_from(["", "\ud800", "x" * 5000, "é" * 50, "{", '{"channel":"$pubsub"}']),
    )
    if depth <= 0:
        return scalars
    inner = odd_values(depth - 1)
    return st.one_of(
        scalars,
        st.lists(inner, max_size=4),
        st.dictionaries(st.text(max_size=10), inner, max_size=4),
    )


@st.composite
def identifiers(draw: st.DrawFn) -> str:
    """A subscription identifier: usually a valid JSON object string, sometimes not."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=40))
    if kind == 1:  # around the 4 KiB limit
        size = draw(st.integers(4000, 4200))
        return json.dumps({"channel": "$pubsub", "stream_name": "s" * size})[: size + 10]
    params: dict[str, Any] = {"channel": draw(st.sampled_from(CHANNELS))}
    for key in draw(st.lists(st.sampled_from(["stream_name", "id", "room", "signed_stream_name"]),
                             max_size=3)):  # fmt: skip
        params[key] = draw(st.text(max_size=12) | odd_values(1))
    text = json.dumps(params, ensure_ascii=draw(st.booleans()))
    if kind == 2:  # deep nesting inside an otherwise valid identifier
        n = draw(st.integers(20, 60))
        text = text[:-1] + ',"n":' + "[" * n + "]" * n + "}"
    return text


@st.composite
def history_requests(draw: st.DrawFn) -> Any:
    """A ``history`` value: mostly well-formed, sometimes with wrong types."""
    if draw(st.integers(0, 4)) == 0:
        return draw(odd_values(2))
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["since"] = draw(st.one_of(st.integers(-5, 2**40), st.floats(), odd_values(0)))
    if draw(st.booleans()):
        out["streams"] = draw(
            st.dictionaries(
                st.text(max_size=8),
                st.one_of(
                    st.fixed_dictionaries(
                        {"epoch": st.text(max_size=8), "offset": st.integers(-3, 2**64)}
                    ),
                    odd_values(1),
                ),
                max_size=3,
            )
        )
    return out


def nested(value: Any, depth: int) -> Any:
    """*value* wrapped in *depth* alternating lists and objects."""
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@st.composite
def valid_commands(draw: st.DrawFn) -> dict[str, Any]:
    """A command object as clients send them (Action Cable and AnyCable's extensions)."""
    name = draw(st.sampled_from(COMMAND_NAMES))
    obj: dict[str, Any] = {"command": name}
    if name in ("ping", "pong"):
        return obj
    obj["identifier"] = draw(identifiers())
    if name == "message":
        action = draw(st.sampled_from(["echo", "broadcast", "speak", "receive", "unknown", ""]))
        data: dict[str, Any] = {"action": action}
        if draw(st.booleans()):
            data["payload"] = draw(odd_values(2))
        if draw(st.integers(0, 5)) == 0:
            data["deep"] = nested(1, draw(st.integers(25, 40)))
        obj["data"] = json.dumps(data)
    elif name == "whisper":
        obj["data"] = draw(odd_values(2))
    elif name == "history" or (name == "subscribe" and draw(st.booleans())):
        obj["history"] = draw(history_requests())
    return obj


@st.composite
def odd_commands(draw: st.DrawFn) -> Any:
    """Valid JSON/msgpack values with the command's fields of the wrong type or missing."""
    obj = dict(draw(valid_commands()))
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(["command", "identifier", "data", "history", "extra"]))
        if draw(st.booleans()):
            obj.pop(key, None)
        else:
            obj[key] = draw(odd_values(2))
    if draw(st.integers(0, 9)) == 0:
        return draw(odd_values(2))  # not an object at all
    return obj


def _msgpack_safe(value: Any) -> Any:
    """*value* with ints beyond 64 bits made floats, so that msgpack can pack it."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else float(value)
    if isinstance(value, dict):
        return {k: _msgpack_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_msgpack_safe(v) for v in value]
    return value


def encode(codec: str, obj: Any) -> bytes:
    """Encode *obj* the way a client of *codec* (``"json"`` or ``"msgpack"``) would."""
    if codec == "json":
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode(
            "utf-8", "surrogatepass"
        )
    return bytes(
        msgpack.packb(_msgpack_safe(obj), use_bin_type=True, unicode_errors="surrogatepass")
    )


_JSON_TOKENS = [
    b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b"null", b"true", b"false",
    b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"0.0e-999", b"9" * 5000,
    b'"\\ud800"', b'"\\udfff\\ud800"', b"\\u0000", b"\xff", b"\xed\xa0\x80", b"\xc0\x80",
    b"\x00", b"\xef\xbb\xbf", b'"command"', b'"identifier"', b'"data"', b'"history"',
    b'"subscribe"', b'"message"', b'"whisper"', b'"channel"', b'"streams"', b'"offset"',
    b"[" * 40, b"{\"a\":" * 40, b'"\\"', b"\t\n\r ", b"[]" * 20, b'"\\' * 64, b"\\" * 64,
]  # fmt: skip

_MSGPACK_TOKENS = [
    b"\xc0", b"\xc1", b"\xc2", b"\xc3", b"\x90", b"\x80", b"\xa0",
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00",
    b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00",
    b"\xca\x7f\xc0\x00\x00", b"\xc4\x03abc", b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x01",
    b"\xd7\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\xc7\x0c\xff" + b"\x00" * 12,
    b"\xc7\x05\xff\x00\x00\x00\x00\x00", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\x81\x01\x02", b"\x81\xc0\xc0",
    b"\x81\x91\x01\x02", b"\x91" * 100, b"\x81\xa1a" * 40, b"\xa3\xed\xa0\x80",
    b"\xa2\xc3\x28", b"\xa7command", b"\xaaidentifier",
]  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, base: bytes, codec: str, other: bytes = b"") -> bytes:
    """*base* after 0-4 random mutations (see the module docstring)."""
    data = bytearray(base)
    tokens = _JSON_TOKENS if codec == "json" else _MSGPACK_TOKENS
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.integers(0, 11))
        n = len(data)
        i = draw(st.integers(0, n))
        if op == 0 and n:  # flip a bit
            data[min(i, n - 1)] ^= 1 << draw(st.integers(0, 7))
        elif op == 1 and n:  # overwrite a byte
            data[min(i, n - 1)] = draw(st.integers(0, 255))
        elif op == 2:  # insert random bytes
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == 3:  # insert a token of the format
            data[i:i] = draw(st.sampled_from(tokens))
        elif op == 4:  # delete a range
            j = draw(st.integers(i, min(n, i + 32)))
            del data[i:j]
        elif op == 5:  # truncate
            del data[i:]
        elif op == 6 and n:  # duplicate a slice in place
            j = draw(st.integers(i, min(n, i + 64)))
            data[j:j] = data[i:j]
        elif op == 7 and other:  # splice with another command
            k = draw(st.integers(0, len(other)))
            data = data[:i] + bytearray(other[k:])
        elif op == 8:  # deepen nesting around the whole thing
            depth = draw(st.integers(1, 80))
            if codec == "json":
                data = bytearray(b"[" * depth) + data + bytearray(b"]" * depth)
            else:
                data = bytearray(b"\x91" * depth) + data
        elif op == 9:  # deepen nesting at a random place
            depth = draw(st.integers(1, 80))
            data[i:i] = b"[" * depth if codec == "json" else b"\x91" * depth
        elif op == 10 and n:  # blow a slice up past the limits
            j = draw(st.integers(i, min(n, i + 16)))
            piece = bytes(data[i:j]) or b"a"
            times = draw(st.integers(2, MAX_INPUT // len(piece)))
            data[i:j] = (piece * times)[: MAX_INPUT - n]
        elif op == 11:  # a random byte string instead
            data = bytearray(draw(st.binary(max_size=64)))
    return bytes(data[:MAX_INPUT])


def random_mutant(data: bytes, rng: random.Random, codec: str) -> bytes:
    """One cheap mutant of *data* (plain :mod:`random`, no hypothesis): the campaign checks a
    few of these around every generated example, which multiplies its throughput."""
    out = bytearray(data)
    tokens = _JSON_TOKENS if codec == "json" else _MSGPACK_TOKENS
    for _ in range(rng.randint(1, 4)):
        n = len(out)
        i = rng.randint(0, n)
        op = rng.randint(0, 7)
        if op == 0 and n:
            out[min(i, n - 1)] ^= 1 << rng.randint(0, 7)
        elif op == 1 and n:
            out[min(i, n - 1)] = rng.randint(0, 255)
        elif op == 2:
            out[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:
            out[i:i] = rng.choice(tokens)
        elif op == 4:
            del out[i : i + rng.randint(1, 16)]
        elif op == 5:
            del out[i:]
        elif op == 6:
            j = min(n, i + rng.randint(1, 32))
            out[j:j] = out[i:j]
        else:
            depth = rng.randint(1, 64)
            out[i:i] = b"[" * depth if codec == "json" else b"\x91" * depth
    return bytes(out[:MAX_INPUT])


@st.composite
def command_payloads(draw: st.DrawFn, codec: str) -> bytes:
    """One client frame payload for *codec*: a valid, odd-typed or mutated command."""
    obj = draw(valid_commands() if draw(st.integers(0, 3)) else odd_commands())
    base = encode(codec, obj)
    if draw(st.integers(0, 3)) == 0:
        return base
    other = encode(codec, draw(valid_commands()))
    return draw(mutated(base, codec, other))


@st.composite
def publication_bodies(draw: st.DrawFn) -> bytes:
    """A ``POST /_broadcast`` body: publications (or remote commands), then mutated."""

    def publication() -> Any:
        kind = draw(st.integers(0, 5))
        if kind == 0:
            identifier = draw(st.one_of(st.just('{"user_id":42}'), odd_values(1)))
            return {"command": draw(st.sampled_from(["disconnect", "x"])),
                    "payload": {"identifier": identifier,
                                "reconnect": draw(odd_values(0))}}  # fmt: skip
        if kind == 1:
            return draw(odd_values(2))
        data = draw(st.one_of(odd_values(2), st.builds(json.dumps, odd_values(2))))
        if draw(st.integers(0, 5)) == 0:
            data = json.dumps(nested("x", draw(st.integers(200, 300))))
        pub: dict[str, Any] = {"stream": draw(st.text(max_size=10) | odd_values(0)), "data": data}
        if draw(st.booleans()):
            pub["meta"] = draw(st.one_of(
                st.fixed_dictionaries({"exclude_socket": st.text(max_size=8) | odd_values(0)}),
                odd_values(1),
            ))  # fmt: skip
        return pub

    obj = [publication() for _ in range(draw(st.integers(1, 3)))]
    body = encode("json", obj if len(obj) > 1 or draw(st.booleans()) else obj[0])
    if draw(st.booleans()):
        return body
    return draw(mutated(body, "json"))


def as_payload(data: bytes, kind: int) -> bytes | bytearray | memoryview | str:
    """The same payload as ``bytes``, ``bytearray``, ``memoryview`` or (if UTF-8) ``str``."""
    if kind == 1:
        return bytearray(data)
    if kind == 2:
        return memoryview(b"\x00" + data)[1:]
    if kind == 3:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return data
    return data


# =================================================================================================
# Checks of the protocol layer. Each raises AssertionError (or lets an unexpected exception out)
# on a violation, and returns a short label of the outcome for the statistics.


class Hang(Exception):
    """A single call ran longer than :data:`HANG_SECONDS`."""


class SlowInput(AssertionError):
    """A single check used more CPU than its budget (see :data:`SLOW_BASE_S`)."""


@contextlib.contextmanager
def hang_alarm(seconds: float = HANG_SECONDS) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the block takes longer than *seconds*."""
    if not hasattr(signal, "setitimer") or os.getpid() != _MAIN_PID:
        yield
        return

    def on_alarm(_signum: int, _frame: Any) -> None:
        raise Hang(f"call took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_MAIN_PID = os.getpid()


def depth_of(value: Any) -> int:
    """Container nesting depth of a decoded value (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _check_json_value(value: Any, max_depth: int) -> None:
    """A decoded value: JSON types only (str keys), bounded depth, re-encodable by both codecs."""
    assert depth_of(value) <= max_depth, "value nests deeper than the limit"
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            assert all(type(k) is str for k in item), "non-string key"
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            assert item is None or isinstance(item, (str, int, float)), type(item)
    cable.JSON.encode(value)
    cable.MSGPACK.encode(value)


def _check_history(history: Any) -> None:
    assert isinstance(history, dict) and set(history) <= {"since", "streams"}, history
    if "since" in history:
        since = history["since"]
        assert isinstance(since, (int, float)) and not isinstance(since, bool)
        assert math.isfinite(since) and since >= 0
    if "streams" in history:
        for stream, position in history["streams"].items():
            assert isinstance(stream, str) and stream
            assert set(position) == {"epoch", "offset"}
            assert isinstance(position["epoch"], str)
            offset = position["offset"]
            assert isinstance(offset, int) and not isinstance(offset, bool) and offset >= 0


def check_command(codec: cable.Codec, payload: Any) -> str:
    """Decode one frame payload the way a connection does, and check the contract."""
    with hang_alarm():
        try:
            command = cable.decode_command(codec, payload)
        except InvalidCommand as exc:
            assert isinstance(exc.reason, str) and exc.reason
            assert exc.identifier is None or isinstance(exc.identifier, str)
            assert exc.command is None or exc.command in COMMAND_NAMES
            return "invalid: " + exc.reason.split(" (")[0].split(" '")[0][:40]
        assert isinstance(command, cable.Command)
        assert command.name in COMMAND_NAMES, command.name
        if isinstance(command, (cable.Ping, cable.Pong)):
            return f"ok: {command.name}"
        identifier = command.identifier
        assert isinstance(identifier, str) and 0 < len(identifier) <= 4096
        if isinstance(command, cable.Message):
            assert isinstance(command.data, str)
        elif isinstance(command, cable.Whisper):
            _check_json_value(command.data, cable.DEFAULT_MAX_DEPTH)
        elif isinstance(command, (cable.History, cable.Subscribe)) and command.history:
            _check_history(command.history)
        label = f"ok: {command.name}"
        try:
            channel, params = cable.parse_identifier(identifier)
        except InvalidCommand as exc:
            assert exc.identifier == identifier
            return label + ", bad identifier"
        assert isinstance(channel, str) and channel
        assert isinstance(params, dict) and "channel" not in params
        _check_json_value(params, cable.DEFAULT_MAX_DEPTH)
        if isinstance(command, cable.Message):
            try:
                action, data = cable.parse_action(command.data, identifier=identifier)
            except InvalidCommand as exc:
                assert exc.identifier == identifier and exc.command == "message"
                return label + ", bad data"
            assert isinstance(action, str) and isinstance(data, dict)
            _check_json_value(data, cable.DEFAULT_MAX_DEPTH)
        return label


def check_publications(body: Any) -> str:
    """Parse a broadcast body and encode every accepted publication for both codecs."""
    with hang_alarm():
        try:
            items = cable.parse_publications(body)
        except InvalidCommand as exc:
            assert isinstance(exc.reason, str) and exc.reason
            return "invalid: " + exc.reason.split(":")[-1].strip()[:40]
        assert isinstance(items, list)
        for item in items:
            if isinstance(item, cable.RemoteCommand):
                assert item.command == "disconnect"
                assert isinstance(item.identifiers, dict) and item.identifiers
                assert isinstance(item.reconnect, bool)
                continue
            assert isinstance(item, cable.Publication)
            assert isinstance(item.stream, str) and item.stream
            assert item.exclude_socket is None or isinstance(item.exclude_socket, str)
            encoder = cable.BroadcastEncoder(item.data, stream_id=item.stream, epoch="e", offset=1)
            for codec in (cable.JSON, cable.MSGPACK):
                out = encoder.encode(codec, '{"channel":"$pubsub"}')
                assert isinstance(out, bytes)
                assert codec.decode(out, max_depth=300)["identifier"] == '{"channel":"$pubsub"}'
        return f"ok: {len(items)} item(s)"


# -- frames ---------------------------------------------------------------------------------------

MASK = b"\x37\xfa\x21\x3d"


def client_frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0,
                 mask: bytes | None = MASK) -> bytes:  # fmt: skip
    """A client frame, built by the pure twin (its agreement with the compiled one is tested)."""
    return _speedups_py.build_frame(opcode, payload, fin, mask, rsv)


@st.composite
def frame_list(draw: st.DrawFn) -> list[bytes]:
    """Frames of a client session: commands (fragmented or not) with control frames between."""
    frames: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            frames.append(
                client_frame(draw(st.sampled_from([9, 10])), draw(st.binary(max_size=30)))
            )
        elif kind == 1:
            code = draw(st.sampled_from([1000, 1001, 1005, 1008, 2999, 3000, 4999, 5000]))
            reason = draw(st.binary(max_size=8))
            frames.append(client_frame(8, code.to_bytes(2, "big") + reason))
        else:
            codec = draw(st.sampled_from(["json", "msgpack"]))
            payload = draw(command_payloads(codec))
            opcode = 1 if codec == "json" else 2
            cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
            bounds = [0, *cuts, len(payload)]
            for i in range(len(bounds) - 1):
                last = i == len(bounds) - 2
                frames.append(client_frame(opcode if i == 0 else 0,
                                           payload[bounds[i]:bounds[i + 1]], fin=last))  # fmt: skip
                if not last and draw(st.integers(0, 3)) == 0:
                    frames.append(client_frame(9, b"between"))
    return frames


def _with_length(frame: bytes, new_length: int, encoding: int) -> bytes:
    """*frame*'s header rewritten to claim *new_length* in a 7-, 16- or 64-bit field."""
    b0, b1 = frame[0], frame[1]
    n = b1 & 0x7F
    start = 2 + (2 if n == 126 else 8 if n == 127 else 0)
    rest = frame[start:]
    mask_bit = b1 & 0x80
    if encoding == 0:
        return bytes([b0, mask_bit | min(new_length, 125)]) + rest
    if encoding == 1:
        return bytes([b0, mask_bit | 126]) + (new_length & 0xFFFF).to_bytes(2, "big") + rest
    return bytes([b0, mask_bit | 127]) + (new_length & (2**64 - 1)).to_bytes(8, "big") + rest


@st.composite
def mutated_frame_streams(draw: st.DrawFn) -> bytes:
    """A valid frame stream after structural and byte-level mutations."""
    frames = draw(frame_list())
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.integers(0, 8))
        i = draw(st.integers(0, len(frames) - 1)) if frames else 0
        if not frames:
            break
        f = bytearray(frames[i])
        if op == 0:  # flip FIN
            f[0] ^= 0x80
        elif op == 1:  # set reserved bits
            f[0] |= draw(st.integers(1, 7)) << 4
        elif op == 2:  # another opcode
            f[0] = (f[0] & 0xF0) | draw(st.integers(0, 15))
        elif op == 3:  # drop the mask bit (the mask bytes become payload)
            f[1] &= 0x7F
        elif op == 4:  # lie about the length, in any of the three encodings
            length = draw(st.one_of(st.integers(0, 200), st.integers(65530, 70000),
                                    st.integers(2**31, 2**64 - 1)))  # fmt: skip
            f = bytearray(_with_length(bytes(f), length, draw(st.integers(0, 2))))
        elif op == 5:  # non-minimal length encoding of the true length
            true_len = (
                len(f) - 2 - 4 - (2 if f[1] & 0x7F == 126 else 8 if f[1] & 0x7F == 127 else 0)
            )
            f = bytearray(_with_length(bytes(f), max(true_len, 0), draw(st.integers(1, 2))))
        elif op == 6:  # delete the frame
            del frames[i]
            continue
        elif op == 7:  # duplicate it
            frames.insert(i, bytes(f))
        elif op == 8:  # swap with the next one
            if i + 1 < len(frames):
                frames[i], frames[i + 1] = frames[i + 1], frames[i]
            continue
        frames[i] = bytes(f)
    data = b"".join(frames)
    if draw(st.integers(0, 2)) == 0:  # a few byte-level mutations on top
        data = draw(mutated(data, "msgpack"))
    return data[: MAX_INPUT * 2]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    """*data* cut at the positions *cuts* (taken modulo its length + 1)."""
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[lo:hi] for lo, hi in itertools.pairwise(bounds)]


def parse_events(kernels: Any, chunks: list[bytes], **options: Any) -> list[Any]:
    """Every event the parser yields for *chunks*; an error ends the list as a tuple, and the
    parser must then keep raising the same error."""
    parser = kernels.FrameParser(**options)
    events: list[Any] = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            while (message := parser.next_message()) is not None:
                events.append(message)
    except FrameErrorT as exc:
        events.append(("error", exc.code, exc.reason))
        for again in (lambda: parser.next_message(), lambda: parser.feed(b"x")):
            try:
                again()
            except FrameErrorT as exc2:
                assert (exc2.code, exc2.reason) == (exc.code, exc.reason)
            else:
                raise AssertionError("a failed parser accepted more input")
    return events


def check_frames(data: bytes, cuts: list[int], max_size: int, require_mask: bool) -> str:
    """Both parser twins agree on *data* in chunks; the whole stream gives the same result;
    and the events keep RFC 6455's promises."""
    options = {"max_message_size": max_size, "require_mask": require_mask}
    chunks = chunked(data, cuts)
    with hang_alarm():
        pure = parse_events(_speedups_py, chunks, **options)
        if _compiled is not None:
            compiled = parse_events(_compiled, chunks, **options)
            assert compiled == pure, f"twins disagree:\n compiled {compiled!r}\n pure     {pure!r}"
            whole = parse_events(_compiled, [data], **options)
            assert whole == compiled, "chunking changed the outcome"
    for event in pure:
        if event[0] == "error":
            assert event[1] in (1002, 1007, 1009), event
            continue
        opcode, payload = event
        assert isinstance(payload, bytes)
        assert opcode in (1, 2, 8, 9, 10), opcode
        if opcode == 1:
            assert _speedups_py.validate_utf8(payload)
        if opcode in (1, 2):
            assert len(payload) <= max_size
        else:
            assert len(payload) <= 125
    last = pure[-1] if pure else None
    if last is not None and last[0] == "error":
        return f"error {last[1]}: {last[2]}"
    return f"ok: {min(len(pure), 5)}{'+' if len(pure) >= 5 else ''} events"


# =================================================================================================
# The live server


FUZZ_SERVER_FLAGS = [
    "--public-streams", "--benchmark-channel", "--broadcast-key", "fuzz-key",
    "--echo-path", "/echo", "--max-message-size", "65536", "--handshake-timeout", "2",
    "--close-timeout", "1", "--ping-interval", "1", "--pong-timeout", "5",
    "--sessions-ttl", "20", "--history-ttl", "20", "--log-level", "warning",
    "--max-pending-handshakes", "256",
]  # fmt: skip

SUBPROTOCOL_NAMES = [
    "actioncable-v1-json", "actioncable-v1-ext-json", "actioncable-v1-msgpack",
    "actioncable-v1-ext-msgpack",
]  # fmt: skip

#: Close codes the bad-input table lets the server send (besides echoing the client's own).
ALLOWED_CLOSE_CODES = frozenset({1000, 1001, 1002, 1007, 1008, 1009})


@st.composite
def live_connections(draw: st.DrawFn) -> dict[str, Any]:
    """What one hostile (or clumsy) client does: an upgrade, then bytes in chunks."""
    spec: dict[str, Any] = {}
    kind = draw(st.integers(0, 19))
    if kind == 0:  # a mutated upgrade request
        request = (
            b"GET /cable HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: actioncable-v1-json\r\n\r\n"
        )
        spec["raw_request"] = draw(mutated(request, "json"))
        spec["path"] = "/cable"
    else:
        spec["path"] = "/echo" if kind == 1 else "/cable"
        chosen = draw(st.lists(st.sampled_from([*SUBPROTOCOL_NAMES, "actioncable-unsupported",
                                                "anycable-token.x.y.z", "nonsense"]),
                               min_size=0, max_size=3))  # fmt: skip
        spec["subprotocols"] = chosen
        spec["query"] = draw(st.sampled_from(["", "sid=abc", "pi=1", "pi=0", "pi=x", "jid=a.b.c",
                                              "sid=" + "a" * 40, "%ff%fe=1"]))  # fmt: skip
    spec["data"] = draw(mutated_frame_streams())
    spec["cuts"] = draw(st.lists(st.integers(0, 100_000), max_size=6))
    spec["pause_ms"] = draw(st.sampled_from([0, 0, 1, 20]))
    spec["end"] = draw(st.sampled_from(["linger", "linger", "abort", "close"]))
    return spec


#: Connection specs hypothesis draws per live batch; the rest of the batch are cheap variants of
#: them (drawing dozens of big specs per example makes hypothesis overrun its data budget).
LIVE_BASES = 4


def expand_batch(
    bases: list[dict[str, Any]], size: int, rng: random.Random
) -> list[dict[str, Any]]:
    """*size* connection specs: the *bases*, then variants of them with mutated data, other
    chunkings and endings."""
    batch = list(bases)
    while len(batch) < size:
        spec = dict(rng.choice(bases))
        spec["data"] = random_mutant(spec["data"], rng, "msgpack")
        spec["cuts"] = [rng.randint(0, len(spec["data"]) + 1) for _ in range(rng.randint(0, 6))]
        spec["end"] = rng.choice(["linger", "linger", "abort", "close"])
        batch.append(spec)
    return batch[:size]


@dataclass
class LiveServer:
    """A ``trio-cable serve`` process for the live target, with its log in a file."""

    workdir: Path
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None
    log_offset: int = 0
    restarts: int = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def start(self) -> None:
        """Start the server on a free port and wait until it accepts."""
        from bench.procs import free_port, wait_port

        self.port = free_port()
        cmd = [sys.executable, "-m", "trio_cable", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *FUZZ_SERVER_FLAGS]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        try:
            self.popen = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                          cwd=ROOT)  # fmt: skip
        finally:
            log.close()
        wait_port(self.port, self.popen)

    def stop(self) -> int | None:
        """SIGTERM (then SIGKILL); returns the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def new_log(self) -> str:
        """The log lines written since the last call."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                text = f.read()
        except FileNotFoundError:
            return ""
        self.log_offset += len(text)
        return text.decode("utf-8", "replace")

    def usage(self) -> tuple[float, int]:
        """(RSS in MiB, open file descriptors) of the server process."""
        import psutil

        assert self.popen is not None
        proc = psutil.Process(self.popen.pid)
        return proc.memory_info().rss / 2**20, proc.num_fds()


async def run_connection(port: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Play one :func:`live_connections` spec against the server; report what came back."""
    import trio

    from bench import wsraw

    outcome: dict[str, Any] = {"status": None, "close_code": None, "messages": 0}
    data = spec["data"]
    # The close codes the server will see from this client (parsed as the server parses them):
    # the server may echo those back.
    sent_codes: set[int] = {
        int.from_bytes(event[1][:2], "big")
        for event in parse_events(_speedups_py, [data], max_message_size=65536)
        if event[0] == 8 and len(event[1]) >= 2
    }
    outcome["sent_codes"] = sent_codes
    with trio.move_on_after(4.0) as scope:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError as exc:
            outcome["error"] = f"connect: {exc}"
            return outcome
        try:
            if "raw_request" in spec:
                await stream.send_all(spec["raw_request"])
            else:
                await stream.send_all(wsraw.upgrade_request(
                    "127.0.0.1", port, path=spec["path"], subprotocols=spec["subprotocols"],
                    query=spec["query"]))  # fmt: skip
            head, rest = await wsraw.read_head(stream)
            outcome["status"] = wsraw.status_of(head)
            if outcome["status"] != 101:
                return outcome
            ws = wsraw.RawWS(stream, wsraw.header_value(head, "Sec-WebSocket-Protocol"), head)
            if rest:
                ws.parser.feed(rest)

            async def reader() -> None:
                try:
                    while await ws.recv() is not None:
                        outcome["messages"] += 1
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    outcome["reset"] = True
                except FrameErrorT as exc:  # the server sent something our parser refuses
                    outcome["bad_server_frame"] = str(exc)

            async def writer() -> None:
                try:
                    for chunk in chunked(data, spec["cuts"]):
                        await stream.send_all(chunk)
                        if spec["pause_ms"]:
                            await trio.sleep(spec["pause_ms"] / 1000)
                    if spec["end"] == "close":
                        await ws.send(wsraw.OP_CLOSE, b"\x03\xe8")
                        sent_codes.add(1000)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    outcome["reset"] = True

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                await writer()
                if spec["end"] != "abort":
                    with trio.move_on_after(1.0):
                        while not ws.closed and not outcome.get("reset"):
                            await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
            outcome["close_code"] = ws.close_code
        except wsraw.HandshakeRefused as exc:
            outcome["status"] = exc.status or "eof"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            outcome["reset"] = True
        finally:
            await trio.aclose_forcefully(stream)
    if scope.cancelled_caught:
        outcome["timeout"] = True
    return outcome


def judge_connection(spec: dict[str, Any], outcome: dict[str, Any]) -> str | None:
    """Why an outcome breaks the bad-input table's promises, or ``None``."""
    status = outcome.get("status")
    if isinstance(status, int) and status >= 500 and status != 503:
        return f"HTTP {status}"
    code = outcome.get("close_code")
    if code is not None and code not in ALLOWED_CLOSE_CODES and code not in outcome["sent_codes"]:
        return f"close code {code}"
    if "bad_server_frame" in outcome:
        return f"server sent an invalid frame: {outcome['bad_server_frame']}"
    return None


async def health_check(port: int, serial: int) -> str | None:
    """A well-behaved client connects, subscribes and receives a broadcast; the reason if not."""
    import trio

    from bench import wsraw

    stream_name = f"health-{serial}"
    identifier = json.dumps({"channel": "$pubsub", "stream_name": stream_name})
    with trio.move_on_after(10.0):
        try:
            ws = await wsraw.connect("127.0.0.1", port, subprotocols=["actioncable-v1-ext-json"])
        except (OSError, wsraw.HandshakeRefused) as exc:
            return f"health: connect failed: {exc}"
        try:
            welcome = await ws.expect(lambda m: m.get("type") in ("welcome", "disconnect"))
            if not welcome or welcome.get("type") != "welcome":
                return f"health: no welcome ({welcome})"
            await ws.send_command({"command": "subscribe", "identifier": identifier})
            confirm = await ws.expect(lambda m: m.get("identifier") == identifier)
            if not confirm or confirm.get("type") != "confirm_subscription":
                return f"health: subscription not confirmed ({confirm})"
            body = json.dumps({"stream": stream_name, "data": json.dumps({"n": serial})}).encode()
            status, _ = await wsraw.http_request(
                "127.0.0.1", port, "POST", "/_broadcast", body,
                {"Authorization": "Bearer fuzz-key"},
            )  # fmt: skip
            if status != 201:
                return f"health: broadcast answered {status}"
            got = await ws.expect(lambda m: m.get("identifier") == identifier and "message" in m)
            if not got or got.get("message") != {"n": serial}:
                return f"health: broadcast not received ({got})"
            await ws.close()
            return None
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return f"health: connection broke: {exc!r}"
        finally:
            await ws.aclose()
    return "health: timed out (10 s)"


# =================================================================================================
# The campaign


@dataclass
class Failure:
    """One distinct failure: where, what, and an input that shows it."""

    target: str
    error: str
    example: str
    seed: int | None = None
    count: int = 1

    def key(self) -> tuple[str, str]:
        """Failures with the same target and first line (numbers aside) are the same."""
        first = self.error.splitlines()[0] if self.error else ""
        return self.target, re.sub(r"\d+", "N", first.split(" on the mutant ")[0])[:120]


@dataclass
class TargetStats:
    """Examples run (and inputs checked: examples plus their cheap mutants), time spent and
    outcome labels of one target."""

    examples: int = 0
    inputs: int = 0
    max_cpu_ms: float = 0.0
    max_cpu_bytes: int = 0
    seconds: float = 0.0
    runs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class Campaign:
    """State of a running campaign."""

    deadline: float
    workdir: Path
    live_batch: int = 16
    stats: dict[str, TargetStats] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    server: LiveServer | None = None
    live_samples: list[dict[str, float]] = field(default_factory=list)
    fd_baseline: int | None = None
    rss_baseline: float | None = None
    log_problems: Counter[str] = field(default_factory=Counter)
    harness_errors: Counter[str] = field(default_factory=Counter)
    failing_input: bytes | None = None
    connections: Counter[str] = field(default_factory=Counter)
    health_checks: int = 0
    started: float = field(default_factory=time.monotonic)
    progress: bool = True

    def record(self, target: str, error: str, example: str, seed: int | None) -> None:
        failure = Failure(target, error, example[:MAX_EXAMPLE_REPR], seed)
        for known in self.failures:
            if known.key() == failure.key():
                known.count += 1
                return
        self.failures.append(failure)
        if self.progress:
            print(f"[fuzz] FAILURE in {target}: {error.splitlines()[0][:300]}", file=sys.stderr)

    # -- in-process targets ------------------------------------------------------------------

    def _in_process(self, name: str, strategy: st.SearchStrategy[Any],
                    check: Callable[[Any], str], examples: int) -> None:  # fmt: skip
        stats = self.stats.setdefault(name, TargetStats())
        last: dict[str, Any] = {}
        run_seed = random.getrandbits(64)

        @hypothesis_seed(run_seed)
        # No shrinking in the campaign: a slow input (the failure it looks for besides
        # exceptions) makes every shrink step slow too; the failing input is recorded as is,
        # and tests/test_fuzz.py (which does shrink) reproduces it.
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False)  # fmt: skip
        @given(value=strategy)
        def run(value: Any) -> None:
            if time.monotonic() > self.deadline + 30:
                return  # out of time: let hypothesis finish quickly
            stats.examples += 1
            try:
                stats.outcomes[check(value)] += 1
            except BaseException as exc:
                # The whole input that failed: a cheap mutant when one did, else the example.
                last["value"] = value if self.failing_input is None else self.failing_input
                self.failing_input = None
                last["error"] = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                last["tb"] = traceback.format_exc(limit=6)
                raise

        start = time.monotonic()
        try:
            run()
        except Exception:
            if last:
                self.record(name, last["error"] + "\n" + last["tb"], repr(last["value"]), run_seed)
        stats.seconds += time.monotonic() - start
        stats.runs += 1

    @staticmethod
    def _timed(stats: TargetStats, check: Callable[[Any], str], value: Any, size: int) -> str:
        """Run one check, track its CPU time, and fail it past the budget."""
        start = time.thread_time()
        label = check(value)
        cpu = time.thread_time() - start
        if cpu * 1000 > stats.max_cpu_ms:
            stats.max_cpu_ms, stats.max_cpu_bytes = cpu * 1000, size
        budget = SLOW_BASE_S + SLOW_PER_BYTE_S * size
        if cpu > budget:
            raise SlowInput(f"{cpu * 1000:.0f} ms of CPU for {size} bytes (budget "
                            f"{budget * 1000:.0f} ms)")  # fmt: skip
        return label

    def _with_mutants(self, name: str, check: Callable[[bytes], str], codec: str,
                      data: bytes, rng_seed: int) -> str:  # fmt: skip
        """Check *data*, then :data:`MUTANTS_PER_EXAMPLE` cheap mutants of it."""
        stats = self.stats[name]
        label = self._timed(stats, check, data, len(data))
        stats.inputs += 1
        rng = random.Random(rng_seed)
        for _ in range(MUTANTS_PER_EXAMPLE):
            mutant = random_mutant(data, rng, codec)
            try:
                stats.outcomes[self._timed(stats, check, mutant, len(mutant))] += 1
            except BaseException as exc:
                self.failing_input = mutant
                raise AssertionError(f"{exc!r} on the mutant {mutant[:2000]!r}") from exc
            stats.inputs += 1
        return label

    def decode_target(self, codec_name: str, examples: int) -> None:
        codec = cable.JSON if codec_name == "json" else cable.MSGPACK
        name = f"decode-{codec_name}"
        strategy = st.tuples(command_payloads(codec_name), st.integers(0, 3),
                             st.integers(0, 2**32))  # fmt: skip

        def check(v: tuple[bytes, int, int]) -> str:
            data, kind, rng_seed = v
            return self._with_mutants(
                name, lambda d: check_command(codec, as_payload(d, kind)), codec_name, data,
                rng_seed,
            )  # fmt: skip

        self._in_process(name, strategy, check, examples)

    def publications_target(self, examples: int) -> None:
        strategy = st.tuples(publication_bodies(), st.integers(0, 3), st.integers(0, 2**32))

        def check(v: tuple[bytes, int, int]) -> str:
            data, kind, rng_seed = v
            return self._with_mutants(
                "publications", lambda d: check_publications(as_payload(d, kind)), "json", data,
                rng_seed,
            )  # fmt: skip

        self._in_process("publications", strategy, check, examples)

    def frames_target(self, examples: int) -> None:
        strategy = st.tuples(
            mutated_frame_streams(),
            st.lists(st.integers(0, 200_000), max_size=12),
            st.sampled_from([0, 10, 125, 126, 300, 4096, 65535, 65536, 1048576]),
            st.booleans(),
        )

        def check(v: tuple[bytes, list[int], int, bool]) -> str:
            stats = self.stats["frames"]
            stats.inputs += 1
            return self._timed(stats, lambda w: check_frames(*w), v, len(v[0]))

        self._in_process("frames", strategy, check, examples)

    # -- live target ---------------------------------------------------------------------------

    def live_target(self, batches: int) -> None:
        import trio

        stats = self.stats.setdefault("live", TargetStats())
        if self.server is None or not self.server.alive():
            if self.server is not None:
                self.record("live", f"server process exited with {self.server.popen.returncode}"
                            if self.server.popen else "server gone", "", None)  # fmt: skip
                self.server.restarts += 1
            self.server = self.server or LiveServer(self.workdir)
            self.server.start()
            problem = trio.run(health_check, self.server.port, 0)
            if problem:
                self.record("live", "server unhealthy right after start: " + problem, "", None)
            time.sleep(0.5)
            rss, fds = self.server.usage()
            self.fd_baseline, self.rss_baseline = fds, rss
        server = self.server
        last: dict[str, Any] = {}
        run_seed = random.getrandbits(64)

        @hypothesis_seed(run_seed)
        @settings(max_examples=batches, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), print_blob=False)  # fmt: skip
        @given(bases=st.lists(live_connections(), min_size=LIVE_BASES, max_size=LIVE_BASES),
               variant_seed=st.integers(0, 2**32))  # fmt: skip
        def run(bases: list[dict[str, Any]], variant_seed: int) -> None:
            if time.monotonic() > self.deadline + 30 or not server.alive():
                return
            batch = expand_batch(bases, self.live_batch, random.Random(variant_seed))
            stats.examples += 1
            stats.inputs += len(batch)
            self.health_checks += 1
            serial = self.health_checks
            problems = trio.run(self._live_batch, server.port, batch, serial)
            for spec, reason in problems:
                last["value"] = spec
                self.record("live", reason, repr(spec), run_seed)

        start = time.monotonic()
        try:
            run()
        except Exception as exc:
            self.harness_errors[f"{type(exc).__name__}: {exc}"[:200]] += 1
        stats.seconds += time.monotonic() - start
        stats.runs += 1

    async def _live_batch(self, port: int, batch: list[dict[str, Any]],
                          serial: int) -> list[tuple[Any, str]]:  # fmt: skip
        import trio

        problems: list[tuple[Any, str]] = []
        outcomes: list[tuple[dict[str, Any], dict[str, Any]]] = []

        async def one(spec: dict[str, Any]) -> None:
            try:
                outcomes.append((spec, await run_connection(port, spec)))
            except Exception as exc:  # a bug of this harness, not of the server
                self.harness_errors[f"{type(exc).__name__}: {exc}"[:200]] += 1

        async with trio.open_nursery() as nursery:
            for spec in batch:
                nursery.start_soon(one, spec)
        for spec, outcome in outcomes:
            self.connections[self._label(outcome)] += 1
            self.stats["live"].outcomes[self._label(outcome)] += 1
            reason = judge_connection(spec, outcome)
            if reason:
                problems.append((spec, reason))
        assert self.server is not None
        if not self.server.alive():
            problems.append((None, f"server died (exit {self.server.popen.poll()})"))  # type: ignore[union-attr]
            return problems
        problem = await health_check(port, serial)
        if problem:
            problems.append((batch, problem))
        problems.extend((None, p) for p in self._scan_log())
        await self._sample(problems)
        return problems

    @staticmethod
    def _label(outcome: dict[str, Any]) -> str:
        status = outcome.get("status")
        if status != 101:
            return f"http {status}"
        if outcome.get("close_code") is not None:
            return f"close {outcome['close_code']}"
        if outcome.get("reset"):
            return "reset"
        return "open at end" if not outcome.get("timeout") else "timeout"

    def _scan_log(self) -> list[str]:
        assert self.server is not None
        problems = []
        for line in self.server.new_log().splitlines():
            if "Traceback" in line or " ERROR " in line or "CRITICAL" in line:
                key = line.split(": ", 1)[-1][:160]
                self.log_problems[key] += 1
                if self.log_problems[key] == 1:
                    problems.append(f"server log: {line.strip()[:300]}")
        return problems

    async def _sample(self, problems: list[tuple[Any, str]]) -> None:
        """RSS and fds after a batch; the fds must come back to the baseline once the batch's
        connections are gone (they may take up to the close timeout to go)."""
        import trio

        assert self.server is not None
        rss, fds = self.server.usage()
        with trio.move_on_after(5.0):
            while self.fd_baseline is not None and fds > self.fd_baseline + 2:
                await trio.sleep(0.1)
                rss, fds = self.server.usage()
        self.live_samples.append({"t": time.monotonic() - self.started, "rss_mib": rss,
                                  "fds": float(fds)})  # fmt: skip
        if self.fd_baseline is not None and fds > self.fd_baseline + 2:
            problems.append((None, f"open fds stay at {fds} after the batch (baseline "
                                   f"{self.fd_baseline})"))  # fmt: skip


def run_campaign(minutes: float, *, live: bool = True, progress: bool = True,
                 workdir: Path | None = None, live_batch: int = 32) -> dict[str, Any]:  # fmt: skip
    """Run every target round-robin for *minutes*; return the summary."""
    from bench.conditions import conditions

    started_wall = time.time()
    warnings.filterwarnings("ignore", category=HypothesisWarning)
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="fuzz-")
        workdir = Path(own_tmp.name)
    campaign = Campaign(time.monotonic() + minutes * 60, workdir, live_batch=live_batch,
                        progress=progress)  # fmt: skip
    # Time shares: the live target is slow per example but is the only one that exercises the
    # server; the in-process targets run thousands of examples a second.
    slices: list[tuple[str, float, Callable[[int], None]]] = [
        ("decode-json", 0.15, lambda n: campaign.decode_target("json", n)),
        ("decode-msgpack", 0.15, lambda n: campaign.decode_target("msgpack", n)),
        ("publications", 0.1, campaign.publications_target),
        ("frames", 0.2, campaign.frames_target),
    ]
    if live:
        slices.append(("live", 0.4, campaign.live_target))
    per_run = {name: 50 for name, *_ in slices}
    per_run["live"] = 5
    slice_seconds = max(2.0, min(30.0, minutes * 60 / 20))
    try:
        while time.monotonic() < campaign.deadline:
            # The target furthest behind its share of the time goes next.
            name, _share, fn = min(
                slices,
                key=lambda s: campaign.stats.get(s[0], TargetStats()).seconds / s[1],
            )
            before = campaign.stats.get(name, TargetStats()).seconds
            fn(per_run[name])
            took = campaign.stats[name].seconds - before
            # Size the next run of this target to take about slice_seconds.
            if took > 0:
                scale = slice_seconds / took
                per_run[name] = max(1, min(20_000, int(per_run[name] * min(4.0, max(0.25, scale)))))
            if progress:
                total = sum(s.examples for s in campaign.stats.values())
                left = max(0.0, campaign.deadline - time.monotonic())
                print(f"[fuzz] {name}: {campaign.stats[name].examples} examples; {total} in all, "
                      f"{len(campaign.failures)} failures, {left:.0f} s left",
                      file=sys.stderr)  # fmt: skip
    finally:
        exit_code = campaign.server.stop() if campaign.server is not None else None
        if campaign.server is not None:
            campaign._scan_log()
    summary = _summary(campaign, minutes, started_wall, exit_code)
    summary["conditions"] = conditions()
    if own_tmp is not None:
        own_tmp.cleanup()
    return summary


def _summary(campaign: Campaign, minutes: float, started_wall: float,
             exit_code: int | None) -> dict[str, Any]:  # fmt: skip
    samples = campaign.live_samples
    targets = {}
    for name, stats in campaign.stats.items():
        targets[name] = {
            "examples": stats.examples,
            "inputs": stats.inputs or stats.examples,
            "max_cpu_ms_per_input": round(stats.max_cpu_ms, 2),
            "max_cpu_input_bytes": stats.max_cpu_bytes,
            "seconds": round(stats.seconds, 1),
            "runs": stats.runs,
            "distinct_outcomes": len(stats.outcomes),
            "top_outcomes": stats.outcomes.most_common(12),
        }
    live: dict[str, Any] = {}
    if "live" in campaign.stats:
        live_stats = campaign.stats["live"]
        rss = [s["rss_mib"] for s in samples]
        fds = [s["fds"] for s in samples]
        quarter = max(1, len(rss) // 4)
        live = {
            "batches": live_stats.examples,
            "connections": sum(campaign.connections.values()),
            "frames_bytes_note": "each connection sends one mutated frame stream",
            "health_checks": campaign.health_checks,
            "connection_outcomes": campaign.connections.most_common(20),
            "rss_mib_baseline": campaign.rss_baseline,
            "rss_mib_max": max(rss) if rss else None,
            "rss_mib_first_quarter_median": _median(rss[:quarter]) if rss else None,
            "rss_mib_last_quarter_median": _median(rss[-quarter:]) if rss else None,
            "fds_baseline": campaign.fd_baseline,
            "fds_max_after_batch": max(fds) if fds else None,
            "server_restarts": campaign.server.restarts if campaign.server else 0,
            "server_exit_code": exit_code,
            "log_problems": campaign.log_problems.most_common(20),
            "harness_errors": campaign.harness_errors.most_common(10),
            "samples": samples,
        }
    examples = sum(s.examples for s in campaign.stats.values())
    return {
        "bench": "fuzz",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started_wall)),
        "minutes": minutes,
        "wall_seconds": round(time.time() - started_wall, 1),
        "examples": examples,
        "inputs": sum(s.inputs or s.examples for s in campaign.stats.values()),
        "failures": [f.__dict__ for f in campaign.failures],
        "failure_count": sum(f.count for f in campaign.failures),
        "verdict": "no failures" if not campaign.failures else "failures found",
        "compiled_speedups": _compiled is not None,
        "targets": targets,
        "live": live,
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def markdown(summary: dict[str, Any]) -> str:
    """The campaign as a Markdown section."""
    lines = [
        "## Fuzz campaign",
        "",
        f"- date: {summary['date']}; {summary['minutes']:g} min asked, "
        f"{summary['wall_seconds']:.0f} s wall; compiled speedups: {summary['compiled_speedups']}",
        f"- **{summary['examples']:,} hypothesis examples ({summary['inputs']:,} inputs checked, "
        f"with the cheap mutants), {summary['failure_count']} failures "
        f"({len(summary['failures'])} distinct): {summary['verdict']}**",
        "",
        "| target | examples | inputs checked | seconds | max CPU per input | distinct outcomes "
        "| most common |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, t in summary["targets"].items():
        top = "; ".join(f"{label} x{n}" for label, n in t["top_outcomes"][:4])
        cpu = (f"{t['max_cpu_ms_per_input']:.1f} ms ({t['max_cpu_input_bytes']:,} B)"
               if "max_cpu_ms_per_input" in t and name != "live" else "-")  # fmt: skip
        lines.append(f"| {name} | {t['examples']:,} | {t['inputs']:,} | {t['seconds']:.0f} | "
                     f"{cpu} | {t['distinct_outcomes']} | {top} |")  # fmt: skip
    live = summary.get("live") or {}
    if live:
        lines += [
            "",
            f"Live server: {live['batches']:,} batches, {live['connections']:,} hostile "
            f"connections, {live['health_checks']:,} health checks (connect, subscribe, receive a "
            f"broadcast); server RSS {live['rss_mib_baseline']:.1f} MiB at start, "
            f"{live['rss_mib_first_quarter_median']:.1f} → "
            f"{live['rss_mib_last_quarter_median']:.1f} MiB (median of first → last quarter), "
            f"max {live['rss_mib_max']:.1f} MiB; open fds {live['fds_baseline']} at start, "
            f"at most {live['fds_max_after_batch']:.0f} after a batch; "
            f"server restarts needed: {live['server_restarts']}; exit code at the end: "
            f"{live['server_exit_code']}.",
            "",
            "Connection outcomes: "
            + ", ".join(f"{label} x{n:,}" for label, n in live["connection_outcomes"][:10]),
        ]
        if live["log_problems"]:
            lines += ["", "Server log problems: "
                      + "; ".join(f"`{k}` x{n}" for k, n in live["log_problems"])]  # fmt: skip
    if summary["failures"]:
        lines += ["", "Failures:", ""]
        for f in summary["failures"]:
            first = f["error"].splitlines()[0] if f["error"] else ""
            lines.append(f"- {f['target']} (x{f['count']}, seed {f['seed']}): `{first[:200]}`")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """The live server's RSS and open fds after every batch of hostile connections."""
    samples = (summary.get("live") or {}).get("samples") or []
    if not samples:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [s["t"] / 60 for s in samples]
    rss = [s["rss_mib"] for s in samples]
    fds = [s["fds"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    ax1.plot(ts, rss, ".", color="tab:blue", ms=3)
    ax1.set_ylabel("server RSS (MiB)")
    ax1.set_ylim(0, max(rss) * 1.2)
    ax1.grid(alpha=0.3)
    ax2.plot(ts, fds, ".", color="tab:green", ms=3)
    ax2.set_ylabel("open fds after a batch")
    ax2.set_ylim(0, max(fds) + 4)
    ax2.set_xlabel("minutes into the campaign (the live target runs in slices)")
    ax2.grid(alpha=0.3)
    live = summary["live"]
    fig.suptitle(f"fuzz, live target: {live['batches']:,} batches, {live['connections']:,} "
                 f"hostile connections")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench fuzz [--minutes M]``; returns 0 when the campaign found nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m bench fuzz", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="campaign length (default 10)")
    parser.add_argument("--no-live", action="store_true", help="skip the live-server target")
    parser.add_argument("--batch", type=int, default=32, help="hostile connections per batch")
    parser.add_argument("--out", type=Path, default=RESULTS_JSON)
    parser.add_argument("--md", type=Path, default=RESULTS_MD)
    parser.add_argument("--plot", type=Path, default=PLOT_PNG)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the summary (no samples)")
    args = parser.parse_args(argv)

    def on_term(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt  # run the clean-up: stop the live server

    signal.signal(signal.SIGTERM, on_term)
    summary = run_campaign(args.minutes, live=not args.no_live, progress=not args.quiet,
                           live_batch=args.batch)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    args.md.parent.mkdir(parents=True, exist_ok=True)
    args.md.write_text(markdown(summary))
    plot(summary, args.plot)
    if not args.quiet:
        print(markdown(summary), file=sys.stderr)
        print(f"wrote {args.out}, {args.md} and {args.plot}", file=sys.stderr)
    if args.json:
        brief = {k: v for k, v in summary.items() if k not in ("conditions",)}
        if brief.get("live"):
            brief["live"] = {k: v for k, v in brief["live"].items() if k != "samples"}
        print(json.dumps(brief, default=str))
    return 0 if not summary["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
