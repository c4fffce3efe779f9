"""The sans-I/O frame parser and the ``trio_cable.protocol.frames`` facade.

Every parser test runs against both kernel implementations; hypothesis checks that they
agree on any byte stream in any chunking, and that the chunking does not change the result.
"""

from __future__ import annotations

import ast
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trio_cable import _speedups_py
from trio_cable.protocol import frames

try:
    from trio_cable import _speedups as _compiled  # type: ignore[attr-defined]
except ImportError:
    _compiled = None

NOT_BUILT = "trio_cable._speedups is not built (run: python setup.py build_ext --inplace)"
KERNELS = [
    pytest.param(_speedups_py, id="pure"),
    pytest.param(
        _compiled, id="compiled", marks=pytest.mark.skipif(_compiled is None, reason=NOT_BUILT)
    ),
]
both = pytest.mark.parametrize("k", KERNELS)
needs_compiled = pytest.mark.skipif(_compiled is None, reason=NOT_BUILT)

ROOT = Path(__file__).resolve().parent.parent
FrameError = _speedups_py.FrameError
OP_CONT, OP_TEXT, OP_BINARY = 0, 1, 2
OP_CLOSE, OP_PING, OP_PONG = 8, 9, 10
MASK = b"\x37\xfa\x21\x3d"


def cf(opcode: int, payload: bytes = b"", fin: bool = True, rsv: int = 0) -> bytes:
    """A masked client frame (built by the pure twin, checked in test_speedups)."""
    return _speedups_py.build_frame(opcode, payload, fin, MASK, rsv)


def parse_all(k, *chunks: bytes, **options) -> list:
    """Feed *chunks* one by one, draining after each; an error ends the list as a tuple."""
    parser = k.FrameParser(**options)
    events: list = []
    try:
        for chunk in chunks:
            parser.feed(chunk)
            while (message := parser.next_message()) is not None:
                events.append(message)
    except FrameError as exc:
        events.append(("error", exc.code, exc.reason))
    return events


def error_code(k, *chunks: bytes, **options) -> int:
    events = parse_all(k, *chunks, **options)
    assert events, "no error raised"
    assert events[-1][0] == "error", events
    return events[-1][1]


# --- the facade ------------------------------------------------------------------------------


def test_frames_picks_the_compiled_kernels_when_built():
    expected = _compiled is not None and not os.environ.get("TRIO_CABLE_NO_EXTENSIONS")
    assert frames.SPEEDUPS is expected
    kernels = _compiled if expected else _speedups_py
    assert frames.FrameParser is kernels.FrameParser
    assert frames.build_frame is kernels.build_frame
    assert frames.FrameError is _speedups_py.FrameError


@pytest.mark.parametrize("value", ["1", ""])
def test_frames_env_var_selects_pure(value):
    env = {**os.environ, "TRIO_CABLE_NO_EXTENSIONS": value}
    code = (
        "from trio_cable.protocol import frames;"
        "print(frames.SPEEDUPS, frames.FrameParser.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    if value or _compiled is None:
        assert out == ["False", "trio_cable._speedups_py"]
    else:
        assert out == ["True", "trio_cable._speedups"]


@pytest.mark.parametrize("path", ["trio_cable/protocol/frames.py", "trio_cable/_speedups_py.py"])
def test_sans_io_imports_no_trio(path):
    tree = ast.parse((ROOT / path).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert not {name for name in imported if name.split(".")[0] in ("trio", "trio_websocket")}


def test_frames_exports():
    for name in frames.__all__:
        assert hasattr(frames, name), name
    assert frames.OP_TEXT == 1 and frames.OP_PONG == 10


# --- well-formed traffic ---------------------------------------------------------------------


@both
def test_single_messages(k):
    stream = (
        cf(OP_TEXT, "héllo".encode())
        + cf(OP_BINARY, b"\x00\xff")
        + cf(OP_TEXT)
        + cf(OP_PING, b"p")
        + cf(OP_PONG)
        + cf(OP_CLOSE, b"\x03\xe8bye")
    )
    assert parse_all(k, stream) == [
        (OP_TEXT, "héllo".encode()),
        (OP_BINARY, b"\x00\xff"),
        (OP_TEXT, b""),
        (OP_PING, b"p"),
        (OP_PONG, b""),
        (OP_CLOSE, b"\x03\xe8bye"),
    ]


@both
def test_payloads_are_bytes(k):
    parser = k.FrameParser()
    parser.feed(cf(OP_TEXT, b"a") + cf(OP_PING, b"b"))
    for _ in range(2):
        _, payload = parser.next_message()
        assert type(payload) is bytes
    assert parser.next_message() is None


@both
@pytest.mark.parametrize("n", [0, 1, 125, 126, 127, 65535, 65536, 100_000])
def test_length_encodings(k, n):
    payload = bytes(i & 0xFF for i in range(n))
    frame = cf(OP_BINARY, payload)
    header = 6 if n < 126 else (8 if n < 65536 else 14)
    assert len(frame) == header + n
    assert parse_all(k, frame) == [(OP_BINARY, payload)]
    # And arriving in two pieces, split inside the extended length.
    assert parse_all(k, frame[:3], frame[3:]) == [(OP_BINARY, payload)]


@both
def test_fragmented_text_with_interleaved_control_frames(k):
    stream = (
        cf(OP_TEXT, b"Hel", fin=False)
        + cf(OP_PING, b"1")
        + cf(OP_CONT, b"lo \xc3", fin=False)  # "é" split across fragments
        + cf(OP_PONG, b"2")
        + cf(OP_CONT, b"", fin=False)
        + cf(OP_PING)
        + cf(OP_CONT, b"\xa9!")
        + cf(OP_BINARY, b"next")
    )
    assert parse_all(k, stream) == [
        (OP_PING, b"1"),
        (OP_PONG, b"2"),
        (OP_PING, b""),
        (OP_TEXT, "Hello é!".encode()),
        (OP_BINARY, b"next"),
    ]


@both
def test_fragmented_binary(k):
    stream = cf(OP_BINARY, b"\xff" * 200, fin=False) + cf(OP_CONT, b"\x00" * 70000)
    assert parse_all(k, stream) == [(OP_BINARY, b"\xff" * 200 + b"\x00" * 70000)]


@both
def test_fragmented_message_of_empty_frames(k):
    stream = cf(OP_TEXT, fin=False) + cf(OP_CONT, fin=False) + cf(OP_CONT)
    assert parse_all(k, stream) == [(OP_TEXT, b"")]


@both
def test_close_between_fragments(k):
    stream = cf(OP_TEXT, b"a", fin=False) + cf(OP_CLOSE, b"\x03\xe9")
    assert parse_all(k, stream) == [(OP_CLOSE, b"\x03\xe9")]


@both
def test_byte_by_byte(k):
    stream = (
        cf(OP_TEXT, "κόσμε".encode())
        + cf(OP_BINARY, bytes(range(256)) * 2)
        + cf(OP_TEXT, "\U0001f600".encode(), fin=False)
        + cf(OP_PING, b"ping")
        + cf(OP_CONT, b" done")
        + cf(OP_CLOSE, b"\x03\xe8")
    )
    expected = parse_all(k, stream)
    assert len(expected) == 5
    parser = k.FrameParser()
    got = []
    for i in range(len(stream)):
        parser.feed(stream[i : i + 1])
        while (message := parser.next_message()) is not None:
            got.append(message)
    assert got == expected


@both
def test_many_messages_in_one_feed(k):
    stream = b"".join(cf(OP_TEXT, str(i).encode()) for i in range(1000))
    assert parse_all(k, stream) == [(OP_TEXT, str(i).encode()) for i in range(1000)]


@both
def test_large_message_in_socket_sized_reads(k):
    payload = ("x" * 1000 + "ü").encode() * 1000  # about 1 MiB with multi-byte characters
    frame = cf(OP_TEXT, payload)
    chunks = [frame[i : i + 65536] for i in range(0, len(frame), 65536)]
    assert parse_all(k, *chunks, max_message_size=len(payload)) == [(OP_TEXT, payload)]


@both
def test_feed_copies_its_input(k):
    # The server reads into one reusable buffer: the parser must not keep a reference to it.
    parser = k.FrameParser()
    buffer = bytearray(cf(OP_TEXT, b"first"))
    parser.feed(memoryview(buffer)[:8])
    buffer[:] = b"\x00" * len(buffer)
    frame = cf(OP_TEXT, b"first")
    buffer[:] = frame
    parser.feed(memoryview(buffer)[8:])
    assert parser.next_message() == (OP_TEXT, b"first")


@both
def test_feed_accepts_buffers(k):
    frame = cf(OP_BINARY, b"abc")
    for data in (frame, bytearray(frame), memoryview(frame)):
        assert parse_all(k, data) == [(OP_BINARY, b"abc")]


@both
def test_feed_empty_and_next_message_idle(k):
    parser = k.FrameParser()
    assert parser.next_message() is None
    parser.feed(b"")
    assert parser.next_message() is None


@both
def test_unmasked_frames_when_mask_not_required(k):
    stream = _speedups_py.build_frame(OP_TEXT, b"hi") + _speedups_py.build_frame(OP_PING, b"x")
    assert parse_all(k, stream, require_mask=False) == [(OP_TEXT, b"hi"), (OP_PING, b"x")]
    # Masked frames are still fine too.
    assert parse_all(k, cf(OP_TEXT, b"hi"), require_mask=False) == [(OP_TEXT, b"hi")]


@both
def test_options_are_readable(k):
    parser = k.FrameParser(max_message_size=10, require_mask=False)
    assert parser.max_message_size == 10
    assert parser.require_mask is False
    assert k.FrameParser().max_message_size == 1048576
    with pytest.raises(ValueError):
        k.FrameParser(max_message_size=-1)


@both
def test_message_of_exactly_max_size(k):
    assert parse_all(k, cf(OP_BINARY, b"x" * 100), max_message_size=100) == [
        (OP_BINARY, b"x" * 100)
    ]
    stream = cf(OP_TEXT, b"x" * 60, fin=False) + cf(OP_CONT, b"y" * 40)
    assert parse_all(k, stream, max_message_size=100) == [(OP_TEXT, b"x" * 60 + b"y" * 40)]


@both
def test_control_frames_do_not_count_toward_message_size(k):
    stream = cf(OP_TEXT, b"x" * 10, fin=False) + cf(OP_PING, b"p" * 125) + cf(OP_CONT, b"y")
    assert parse_all(k, stream, max_message_size=11) == [
        (OP_PING, b"p" * 125),
        (OP_TEXT, b"x" * 10 + b"y"),
    ]


# --- close frames ----------------------------------------------------------------------------

VALID_CLOSE_CODES = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999]
# 1012-1014 were added to the IANA registry after RFC 6455 (service restart, try again later,
# bad gateway); Autobahn accepts them too.
REGISTERED_LATER = [1012, 1013, 1014]
INVALID_CLOSE_CODES = [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535]


@both
@pytest.mark.parametrize("code", VALID_CLOSE_CODES + REGISTERED_LATER)
def test_valid_close_codes(k, code):
    payload = code.to_bytes(2, "big") + "ok é".encode()
    assert parse_all(k, cf(OP_CLOSE, payload)) == [(OP_CLOSE, payload)]
    assert k.close_code_and_reason(payload) == (code, "ok é")


@both
@pytest.mark.parametrize("code", INVALID_CLOSE_CODES)
def test_invalid_close_codes(k, code):
    assert error_code(k, cf(OP_CLOSE, code.to_bytes(2, "big"))) == 1002


@both
def test_empty_close(k):
    assert parse_all(k, cf(OP_CLOSE)) == [(OP_CLOSE, b"")]
    assert k.close_code_and_reason(b"") == (None, "")


@both
def test_one_byte_close(k):
    assert error_code(k, cf(OP_CLOSE, b"\x03")) == 1002


@both
def test_close_reason_must_be_utf8(k):
    assert error_code(k, cf(OP_CLOSE, b"\x03\xe8\xce\xba\xed\xa0\x80")) == 1007
    assert error_code(k, cf(OP_CLOSE, b"\x03\xe8ab\xc3")) == 1007


@both
def test_close_with_longest_reason(k):
    payload = b"\x03\xe8" + b"r" * 123
    assert parse_all(k, cf(OP_CLOSE, payload)) == [(OP_CLOSE, payload)]


# --- protocol errors -------------------------------------------------------------------------


@both
def test_unmasked_frame(k):
    assert error_code(k, _speedups_py.build_frame(OP_TEXT, b"hi")) == 1002
    assert error_code(k, _speedups_py.build_frame(OP_PING, b"")) == 1002


@both
@pytest.mark.parametrize("rsv", range(1, 8))
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY, OP_PING])
def test_rsv_bits(k, rsv, opcode):
    assert error_code(k, cf(opcode, b"x", rsv=rsv)) == 1002


@both
@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 11, 12, 13, 14, 15])
def test_reserved_opcodes(k, opcode):
    assert error_code(k, cf(opcode, b"x")) == 1002


@both
@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_fragmented_control_frame(k, opcode):
    assert error_code(k, cf(opcode, b"", fin=False)) == 1002


@both
@pytest.mark.parametrize("opcode", [OP_PING, OP_PONG, OP_CLOSE])
def test_control_frame_too_long(k, opcode):
    payload = b"\x03\xe8" + b"x" * 124
    assert error_code(k, cf(opcode, payload)) == 1002
    # Detected from the header alone.
    assert error_code(k, cf(opcode, payload)[:2]) == 1002


@both
def test_control_frame_of_125_bytes_is_fine(k):
    assert parse_all(k, cf(OP_PING, b"x" * 125)) == [(OP_PING, b"x" * 125)]


@both
def test_continuation_without_message(k):
    assert error_code(k, cf(OP_CONT, b"x")) == 1002
    assert error_code(k, cf(OP_TEXT, b"done") + cf(OP_CONT, b"x")) == 1002


@both
@pytest.mark.parametrize("opcode", [OP_TEXT, OP_BINARY])
def test_new_message_during_fragmented_one(k, opcode):
    stream = cf(OP_BINARY, b"a", fin=False) + cf(opcode, b"b")
    assert error_code(k, stream) == 1002


@both
def test_64_bit_length_with_top_bit(k):
    header = b"\x82\xff" + b"\x80" + b"\x00" * 7 + MASK
    assert error_code(k, header) == 1002


@both
@pytest.mark.parametrize(
    ("header", "payload_len"),
    [
        (b"\x81\xfe\x00\x02", 2),  # 16-bit length for 2 bytes (fits in 7 bits)
        (b"\x81\xfe\x00\x7d", 125),  # the largest 7-bit length, in 16 bits
        (b"\x82\xff" + (2).to_bytes(8, "big"), 2),  # 64-bit length for 2 bytes
        (b"\x82\xff" + (65535).to_bytes(8, "big"), 65535),  # fits in 16 bits
    ],
)
def test_non_minimal_length_is_a_protocol_error(k, header, payload_len):
    # RFC 6455 5.2: the minimal number of bytes MUST be used to encode the length.  Both
    # kernels refuse (as wsproto does) from the header alone, before any payload arrives.
    events = parse_all(k, header + MASK)
    assert events == [("error", 1002, "frame length not minimally encoded")]
    assert error_code(k, header + MASK + b"x" * payload_len) == 1002


@both
@pytest.mark.parametrize("n", [126, 65535, 65536])
def test_minimal_lengths_at_the_boundaries_are_accepted(k, n):
    assert parse_all(k, cf(OP_BINARY, b"x" * n), max_message_size=1 << 20) == [
        (OP_BINARY, b"x" * n)
    ]


@both
def test_frame_too_big_detected_from_header(k):
    # Only the header arrives: the error must not wait for 2 MiB of payload.
    header = cf(OP_BINARY, b"x" * 2_000_000)[:14]
    assert error_code(k, header) == 1009
    assert error_code(k, cf(OP_BINARY, b"x" * 101)[:8], max_message_size=100) == 1009
    assert error_code(k, cf(OP_TEXT, b"x" * 11)[:2], max_message_size=10) == 1009


@both
def test_huge_64_bit_length_is_too_big_not_a_crash(k):
    header = b"\x82\xff" + b"\x7f" + b"\xff" * 7 + MASK
    assert error_code(k, header) == 1009


@both
def test_message_too_big_over_fragments(k):
    stream = cf(OP_TEXT, b"x" * 60, fin=False) + cf(OP_PING) + cf(OP_CONT, b"y" * 41)
    events = parse_all(k, stream, max_message_size=100)
    assert events == [(OP_PING, b""), ("error", 1009, "message too big")]


@both
@pytest.mark.parametrize(
    "payload",
    [b"\xff", b"abc\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"ok\xe2\x82"],
)
def test_invalid_utf8_text(k, payload):
    assert error_code(k, cf(OP_TEXT, payload)) == 1007
    # Binary messages are not validated.
    assert parse_all(k, cf(OP_BINARY, payload)) == [(OP_BINARY, payload)]


@both
def test_text_incomplete_at_end_of_fragmented_message(k):
    stream = cf(OP_TEXT, b"ab", fin=False) + cf(OP_CONT, b"\xe2\x82")
    assert error_code(k, stream) == 1007


# --- fail fast -------------------------------------------------------------------------------

# Autobahn case 6.4.1: valid, then U+110000 (invalid at its 2nd byte), then more text.
PART1 = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5"
PART2 = b"\xf4\x90\x80\x80"
PART3 = b"\x65\x64\x69\x74\x65\x64"


@both
def test_fail_fast_across_fragments(k):
    parser = k.FrameParser()
    parser.feed(cf(OP_TEXT, PART1, fin=False))
    assert parser.next_message() is None
    parser.feed(cf(OP_CONT, PART2, fin=False))
    with pytest.raises(FrameError) as info:  # before the last fragment arrives
        parser.next_message()
    assert info.value.code == 1007


@both
def test_fail_fast_within_one_frame(k):
    # Autobahn case 6.4.3: one frame whose payload arrives in three chops.
    frame = cf(OP_TEXT, PART1 + PART2 + PART3)
    cut1 = 6 + len(PART1)
    cut2 = cut1 + len(PART2)
    parser = k.FrameParser()
    parser.feed(frame[:cut1])
    assert parser.next_message() is None
    parser.feed(frame[cut1:cut2])
    with pytest.raises(FrameError) as info:
        parser.next_message()
    assert info.value.code == 1007


@both
def test_fail_fast_on_the_first_bad_byte(k):
    # Autobahn case 6.4.4: the same, chopped right after the byte that cannot continue.
    frame = cf(OP_TEXT, PART1 + PART2 + PART3)
    bad = 6 + len(PART1) + 1  # index of 0x90
    parser = k.FrameParser()
    parser.feed(frame[:bad])
    assert parser.next_message() is None  # 0xF4 alone could still be valid
    parser.feed(frame[bad : bad + 1])
    with pytest.raises(FrameError):
        parser.next_message()


@both
def test_fail_fast_surrogate_prefix(k):
    parser = k.FrameParser()
    parser.feed(cf(OP_TEXT, b"ab\xed", fin=False))
    assert parser.next_message() is None
    parser.feed(cf(OP_CONT, b"\xa0", fin=False))
    with pytest.raises(FrameError):
        parser.next_message()


# --- after an error --------------------------------------------------------------------------


@both
def test_messages_before_the_error_come_first(k):
    parser = k.FrameParser()
    parser.feed(cf(OP_TEXT, b"one") + cf(OP_PING, b"two") + cf(OP_TEXT, b"\xff") + cf(OP_TEXT))
    assert parser.next_message() == (OP_TEXT, b"one")
    assert parser.next_message() == (OP_PING, b"two")
    with pytest.raises(FrameError) as info:
        parser.next_message()
    assert (info.value.code, info.value.reason) == (1007, "invalid UTF-8 in text message")


@both
def test_parser_is_dead_after_an_error(k):
    parser = k.FrameParser()
    parser.feed(cf(OP_TEXT, b"x", rsv=1))
    with pytest.raises(FrameError) as first:
        parser.next_message()
    with pytest.raises(FrameError) as again:
        parser.next_message()
    assert (again.value.code, again.value.reason) == (first.value.code, first.value.reason)
    with pytest.raises(FrameError):
        parser.feed(cf(OP_TEXT, b"fine"))
    with pytest.raises(FrameError):
        parser.next_message()


@both
def test_error_is_a_frames_frame_error(k):
    parser = k.FrameParser()
    parser.feed(cf(OP_CONT))
    with pytest.raises(frames.FrameError):
        parser.next_message()


# --- property tests --------------------------------------------------------------------------
# No deadlines: they check results, not speed, and CI machines are shared.


@st.composite
def messages(draw):
    """A data message as (opcode, payload, fragment boundaries) or a ping/pong."""
    kind = draw(st.integers(0, 9))
    if kind < 2:
        return draw(st.sampled_from([OP_PING, OP_PONG])), draw(st.binary(max_size=125)), []
    if kind == 2:
        code = draw(st.sampled_from([*VALID_CLOSE_CODES, *REGISTERED_LATER]))
        reason = draw(st.text(max_size=40)).encode("utf-8", "surrogatepass")[:123]
        if not _speedups_py.validate_utf8(reason):
            reason = b""
        return OP_CLOSE, code.to_bytes(2, "big") + reason, []
    if draw(st.booleans()):
        payload = draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
        if not _speedups_py.validate_utf8(payload):
            payload = b"?"
        opcode = OP_TEXT
    else:
        payload = draw(st.binary(max_size=300))
        opcode = OP_BINARY
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=4)))
    return opcode, payload, cuts


def encode(message, draw_controls: list) -> tuple[bytes, list]:
    """Frames for one message, with control frames between its fragments; and the events."""
    opcode, payload, cuts = message
    if opcode >= 8:
        return cf(opcode, payload), [(opcode, payload)]
    bounds = [0, *cuts, len(payload)]
    out = []
    events = []
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        last = i == len(bounds) - 2
        out.append(cf(opcode if i == 0 else OP_CONT, payload[lo:hi], fin=last))
        if not last and draw_controls:
            control = draw_controls.pop()
            out.append(cf(*control))
            events.append(control)
    events.append((opcode, payload))
    return b"".join(out), events


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[lo:hi] for lo, hi in itertools.pairwise(bounds)]


@both
@settings(max_examples=150, deadline=None)
@given(
    msgs=st.lists(messages(), max_size=8),
    controls=st.lists(
        st.tuples(st.sampled_from([OP_PING, OP_PONG]), st.binary(max_size=20)), max_size=6
    ),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_valid_streams_round_trip(k, msgs, controls, cuts):
    stream = []
    expected = []
    for message in msgs:
        data, events = encode(message, controls)
        stream.append(data)
        expected.extend(events)
    data = b"".join(stream)
    assert parse_all(k, *chunked(data, cuts)) == expected


@st.composite
def corrupted_streams(draw):
    """A valid stream with a few bytes overwritten or cut: errors at arbitrary places."""
    msgs = draw(st.lists(messages(), min_size=1, max_size=5))
    data = bytearray(b"".join(encode(m, [])[0] for m in msgs))
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    # Arbitrary close payloads exercise the close code and reason checks.
    extra = draw(st.binary(max_size=20) | st.binary(max_size=125).map(lambda p: cf(OP_CLOSE, p)))
    return bytes(data[: draw(st.integers(0, len(data)))]) + extra


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(
    data=corrupted_streams(),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    max_size=st.sampled_from([0, 10, 100, 300, 1048576]),
    require_mask=st.booleans(),
)
def test_implementations_agree_on_any_stream(data, cuts, max_size, require_mask):
    options = {"max_message_size": max_size, "require_mask": require_mask}
    chunks = chunked(data, cuts)
    compiled = parse_all(_compiled, *chunks, **options)
    assert compiled == parse_all(_speedups_py, *chunks, **options)


@both
@settings(max_examples=150, deadline=None)
@given(
    data=corrupted_streams(),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    max_size=st.sampled_from([10, 300, 1048576]),
)
def test_chunking_does_not_change_the_outcome(k, data, cuts, max_size):
    whole = parse_all(k, data, max_message_size=max_size)
    assert parse_all(k, *chunked(data, cuts), max_message_size=max_size) == whole


@needs_compiled
@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=300), cuts=st.lists(st.integers(0, 1000), max_size=10))
def test_implementations_agree_on_random_bytes(data, cuts):
    chunks = chunked(data, cuts)
    for require_mask in (True, False):
        compiled = parse_all(_compiled, *chunks, require_mask=require_mask)
        assert compiled == parse_all(_speedups_py, *chunks, require_mask=require_mask)


@both
def test_pending_counts_what_is_not_a_whole_message_yet(k):
    parser = k.FrameParser(1 << 20)
    assert parser.pending == 0
    first = cf(OP_TEXT, b"a" * 1000, fin=False)
    parser.feed(first[:300])  # a partial frame: header (8 bytes) and part of its payload
    assert parser.next_message() is None
    assert parser.pending == 292
    parser.feed(first[300:])
    assert parser.next_message() is None
    assert parser.pending == 1000  # the first fragment, assembled
    parser.feed(cf(OP_PING, b"p")[:3])  # a control frame's first bytes between fragments
    assert parser.next_message() is None
    assert parser.pending == 1003
    parser.feed(cf(OP_PING, b"p")[3:] + cf(OP_CONT, b"b"))
    assert parser.next_message() == (OP_PING, b"p")
    assert parser.next_message() == (OP_TEXT, b"a" * 1000 + b"b")
    assert parser.pending == 0
