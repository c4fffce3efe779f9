"""The byte kernels: masking, UTF-8 validation, frame building.

Every kernel test runs against both implementations, the compiled ``trio_cable._speedups``
and its pure twin; hypothesis checks that the two agree byte for byte.
"""

from __future__ import annotations

import codecs
import itertools

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

MASK = b"\x37\xfa\x21\x3d"

# These tests check results, not speed: on a busy shared machine a deadline only adds flakes.
no_deadline = settings(deadline=None)


def naive_unmask(data: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def prefix_ok(data: bytes) -> bool:
    """Reference: can *data* be extended into valid UTF-8?  (Spelled out from RFC 3629.)"""
    i = 0
    n = len(data)
    while i < n:
        c = data[i]
        i += 1
        if c < 0x80:
            continue
        if 0xC2 <= c <= 0xDF:
            need, lo, hi = 1, 0x80, 0xBF
        elif c == 0xE0:
            need, lo, hi = 2, 0xA0, 0xBF
        elif c == 0xED:
            need, lo, hi = 2, 0x80, 0x9F
        elif 0xE1 <= c <= 0xEF:
            need, lo, hi = 2, 0x80, 0xBF
        elif c == 0xF0:
            need, lo, hi = 3, 0x90, 0xBF
        elif 0xF1 <= c <= 0xF3:
            need, lo, hi = 3, 0x80, 0xBF
        elif c == 0xF4:
            need, lo, hi = 3, 0x80, 0x8F
        else:
            return False
        for _ in range(need):
            if i >= n:
                return True
            if not lo <= data[i] <= hi:
                return False
            lo, hi = 0x80, 0xBF
            i += 1
    return True


# --- module shape ----------------------------------------------------------------------------


@both
def test_opcodes(k):
    assert (k.OP_CONT, k.OP_TEXT, k.OP_BINARY) == (0, 1, 2)
    assert (k.OP_CLOSE, k.OP_PING, k.OP_PONG) == (8, 9, 10)


@needs_compiled
def test_same_api():
    public = {name for name in dir(_speedups_py) if not name.startswith("_")}
    assert set(_speedups_py.__all__) <= public
    assert set(_compiled.__all__) == set(_speedups_py.__all__)
    for name in _speedups_py.__all__:
        assert hasattr(_compiled, name), name


@needs_compiled
def test_frame_error_is_one_class():
    assert _compiled.FrameError is _speedups_py.FrameError
    assert frames.FrameError is _speedups_py.FrameError


def test_frame_error_fields():
    exc = _speedups_py.FrameError(1007, "bad text")
    assert (exc.code, exc.reason) == (1007, "bad text")
    assert str(exc) == "bad text (close code 1007)"
    assert isinstance(exc, Exception)


# --- unmask ----------------------------------------------------------------------------------


@both
def test_unmask_rfc_example(k):
    # RFC 6455 section 5.7: a masked "Hello".
    assert k.unmask(b"\x7f\x9f\x4d\x51\x58", MASK) == b"Hello"


@both
@pytest.mark.parametrize("n", [*range(0, 70), 255, 256, 4095, 4096, 4097, 65537])
def test_unmask_every_length(k, n):
    # Covers empty input, the byte tail, and every split of words and 32-byte blocks.
    data = bytes((i * 7 + 3) & 0xFF for i in range(n))
    out = k.unmask(data, MASK)
    assert type(out) is bytes
    assert out == naive_unmask(data, MASK)
    assert k.unmask(out, MASK) == data


@both
def test_unmask_accepts_buffers(k):
    data = bytes(range(40))
    expected = naive_unmask(data, MASK)
    assert k.unmask(bytearray(data), bytearray(MASK)) == expected
    assert k.unmask(memoryview(data), memoryview(MASK)) == expected
    # A view that does not start at the buffer's first byte (unaligned source).
    assert k.unmask(memoryview(b"x" + data)[1:], MASK) == expected


@both
@pytest.mark.parametrize("mask", [b"", b"abc", b"abcde"])
def test_unmask_mask_must_be_4_bytes(k, mask):
    with pytest.raises(ValueError):
        k.unmask(b"data", mask)


@both
@pytest.mark.parametrize("bad", ["text", 5, None])
def test_unmask_rejects_non_buffers(k, bad):
    with pytest.raises(TypeError):
        k.unmask(bad, MASK)


@both
@no_deadline
@given(data=st.binary(max_size=300), mask=st.binary(min_size=4, max_size=4))
def test_unmask_matches_naive(k, data, mask):
    assert k.unmask(data, mask) == naive_unmask(data, mask)


@needs_compiled
@no_deadline
@given(
    data=st.binary(max_size=2000), mask=st.binary(min_size=4, max_size=4), skip=st.integers(0, 7)
)
def test_unmask_implementations_agree(data, mask, skip):
    view = memoryview(data)[skip:]
    assert _compiled.unmask(view, mask) == _speedups_py.unmask(view, mask)


# --- validate_utf8 ---------------------------------------------------------------------------

VALID_UTF8 = [
    b"",
    b"plain ascii",
    b"\x00\x7f",
    "\u0080\u07ff".encode(),  # 2-byte boundaries
    "\u0800\uffff".encode(),  # 3-byte boundaries
    "\U00010000\U0010ffff".encode(),  # 4-byte boundaries
    "\ud7ff\ue000".encode(),  # around the surrogates
    "\ufffe\uffff".encode(),  # non-characters are still valid UTF-8
    "κόσμε".encode(),
    ("a" * 37 + "é" + "b" * 50 + "\U0001f600").encode(),
]

INVALID_UTF8 = [
    b"\x80",  # lone continuation
    b"\xbf",
    b"\xc0\x80",  # overlong NUL
    b"\xc1\xbf",  # overlong
    b"\xe0\x80\x80",  # overlong 3-byte
    b"\xe0\x9f\xbf",
    b"\xf0\x80\x80\x80",  # overlong 4-byte
    b"\xf0\x8f\xbf\xbf",
    b"\xed\xa0\x80",  # U+D800
    b"\xed\xbf\xbf",  # U+DFFF
    b"\xed\xa0\x80\xed\xb0\x80",  # surrogate pair spelled as CESU-8
    b"\xf4\x90\x80\x80",  # U+110000
    b"\xf5\x80\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xfe",
    b"\xff",
    b"\xc2",  # truncated
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xc2A",  # continuation missing
    b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",  # Autobahn 6.3.1
]


@both
@pytest.mark.parametrize("data", VALID_UTF8)
def test_validate_utf8_valid(k, data):
    assert k.validate_utf8(data) is True
    assert k.validate_utf8(bytearray(data)) is True
    assert k.validate_utf8(memoryview(data)) is True


@both
@pytest.mark.parametrize("data", INVALID_UTF8)
def test_validate_utf8_invalid(k, data):
    assert k.validate_utf8(data) is False


@both
@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 32, 33, 64, 100])
def test_validate_utf8_bad_byte_anywhere(k, n):
    # One bad byte at every position of an ASCII run: the word-at-a-time fast path must not
    # skip over it, whatever its offset in a word or a block.
    for i in range(n):
        data = bytearray(b"a" * n)
        data[i] = 0xFF
        assert k.validate_utf8(bytes(data)) is False, i
        data[i] = 0xC3  # truncated at the end, or followed by an ASCII byte
        assert k.validate_utf8(bytes(data)) is False, i
    assert k.validate_utf8(b"a" * n) is True


# Long enough (and non-ASCII enough) for the compiled automaton's two-chain path.
LONG_TEXT = ("aé€\U0001f600" * 40 + "κόσμε " * 20 + "x" * 100 + "漢字" * 30).encode()


@both
def test_validate_utf8_long_text_with_one_bad_byte_anywhere(k):
    assert k.validate_utf8(LONG_TEXT) is True
    for i in range(len(LONG_TEXT)):
        for bad in (0x41, 0x80, 0xBF, 0xC0, 0xE0, 0xED, 0xF4, 0xFF):
            data = bytearray(LONG_TEXT)
            data[i] = bad
            assert k.validate_utf8(bytes(data)) is is_utf8(bytes(data)), (i, bad)


@both
def test_validator_long_text_every_split(k):
    for i in range(len(LONG_TEXT) + 1):
        v = k.Utf8Validator()
        assert v.feed(LONG_TEXT[:i], False) is True
        assert v.feed(LONG_TEXT[i:], True) is True
    damaged = LONG_TEXT[:300] + b"\xed\xa0\x80" + LONG_TEXT[300:]
    for i in range(len(damaged) + 1):
        v = k.Utf8Validator()
        assert v.feed(damaged[:i], False) is prefix_ok(damaged[:i]), i


@st.composite
def damaged_text(draw):
    data = bytearray(draw(st.text(min_size=20, max_size=300)).encode("utf-8", "surrogatepass"))
    for _ in range(draw(st.integers(0, 2))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@both
@no_deadline
@given(data=st.binary(max_size=200))
def test_validate_utf8_matches_python(k, data):
    assert k.validate_utf8(data) is is_utf8(data)


@both
@no_deadline
@given(text=st.text(max_size=200))
def test_validate_utf8_accepts_all_text(k, text):
    encoded = text.encode("utf-8", "surrogatepass")
    assert k.validate_utf8(encoded) is is_utf8(encoded)


@needs_compiled
@no_deadline
@given(
    data=st.one_of(
        st.binary(max_size=500),
        st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
        damaged_text(),
    )
)
def test_validate_utf8_implementations_agree(data):
    assert _compiled.validate_utf8(data) is _speedups_py.validate_utf8(data)


# --- Utf8Validator ---------------------------------------------------------------------------


@both
def test_validator_fails_fast(k):
    # Autobahn case 6.4.1: U+110000 (F4 90 80 80) is rejected at 0x90, before the rest arrives.
    v = k.Utf8Validator()
    assert v.feed(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5", False) is True
    assert v.feed(b"\xf4", False) is True
    assert v.feed(b"\x90", False) is False


@both
@pytest.mark.parametrize(
    "prefix", [b"\xed\xa0", b"\xe0\x80", b"\xf0\x80", b"\xf4\x90", b"\xc0", b"\xf5", b"\x80"]
)
def test_validator_rejects_impossible_prefixes(k, prefix):
    v = k.Utf8Validator()
    assert v.feed(prefix, False) is False


@both
def test_validator_split_sequences(k):
    v = k.Utf8Validator()
    encoded = "a€\U0001f600b".encode()
    for i in range(len(encoded)):
        assert v.feed(encoded[i : i + 1], False) is True
    assert v.feed(b"", True) is True


@both
def test_validator_incomplete_at_final(k):
    v = k.Utf8Validator()
    assert v.feed(b"abc\xe2\x82", False) is True
    assert v.feed(b"", True) is False


@both
def test_validator_stays_invalid_until_reset(k):
    v = k.Utf8Validator()
    assert v.feed(b"\xff", False) is False
    assert v.feed(b"fine", False) is False
    assert v.feed(b"fine", True) is False
    v.reset()
    assert v.feed(b"fine", True) is True


@both
def test_validator_restarts_after_final(k):
    v = k.Utf8Validator()
    assert v.feed("é".encode(), True) is True
    assert v.feed(b"\xe2", False) is True
    v.reset()  # drop the pending lead byte
    assert v.feed(b"ok", True) is True


def _feed_split(k, data: bytes, cuts: list[int]) -> list[bool]:
    v = k.Utf8Validator()
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    results = []
    for lo, hi in itertools.pairwise(bounds):
        results.append(v.feed(data[lo:hi], False))
    results.append(v.feed(b"", True))
    return results


@both
@no_deadline
@given(data=st.binary(max_size=60), cuts=st.lists(st.integers(0, 1000), max_size=6))
def test_validator_matches_reference(k, data, cuts):
    results = _feed_split(k, data, cuts)
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for seen, ok in zip(bounds[1:], results, strict=False):
        assert ok is prefix_ok(data[:seen]), seen
    assert results[-1] is is_utf8(data)


@needs_compiled
@no_deadline
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
        damaged_text(),
    ),
    cuts=st.lists(st.integers(0, 1000), max_size=8),
)
def test_validator_implementations_agree(data, cuts):
    assert _feed_split(_compiled, data, cuts) == _feed_split(_speedups_py, data, cuts)


def test_pure_validator_fails_fast_on_surrogates():
    # CPython's incremental decoder alone would hold ED A0 back; the twin must not.
    decoder = codecs.getincrementaldecoder("utf-8")()
    decoder.decode(b"\xed\xa0", False)  # no error from the codec ...
    assert _speedups_py.Utf8Validator().feed(b"\xed\xa0", False) is False  # ... but from us


# --- build_frame -----------------------------------------------------------------------------


@both
@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((1, b"Hello"), {}, b"\x81\x05Hello"),
        ((2, b""), {}, b"\x82\x00"),
        ((1, b"Hel"), {"fin": False}, b"\x01\x03Hel"),
        ((0, b"lo"), {}, b"\x80\x02lo"),
        ((9, b"Hello"), {}, b"\x89\x05Hello"),
        ((10, b""), {}, b"\x8a\x00"),
        ((8, b""), {}, b"\x88\x00"),
        ((1, b"x"), {"rsv": 4}, b"\xc1\x01x"),
        ((1, b"x"), {"rsv": 7}, b"\xf1\x01x"),
        ((3, b""), {"fin": False}, b"\x03\x00"),
        ((15, b""), {}, b"\x8f\x00"),
        # RFC 6455 section 5.7, a masked "Hello" from a client.
        ((1, b"Hello"), {"mask": MASK}, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"),
        ((1, b""), {"mask": MASK}, b"\x81\x80\x37\xfa\x21\x3d"),
    ],
)
def test_build_frame_bytes(k, args, kwargs, expected):
    assert k.build_frame(*args, **kwargs) == expected


@both
@pytest.mark.parametrize(
    ("n", "header"),
    [
        (125, b"\x82\x7d"),
        (126, b"\x82\x7e\x00\x7e"),
        (256, b"\x82\x7e\x01\x00"),
        (65535, b"\x82\x7e\xff\xff"),
        (65536, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x82\x7f\x00\x00\x00\x00\x00\x01\x11\x70"),
    ],
)
def test_build_frame_length_encodings(k, n, header):
    payload = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    frame = k.build_frame(2, payload)
    assert frame == header + payload
    masked = k.build_frame(2, payload, mask=MASK)
    assert masked[: len(header)] == bytes([header[0], header[1] | 0x80]) + header[2:]
    assert masked[len(header) : len(header) + 4] == MASK
    assert masked[len(header) + 4 :] == naive_unmask(payload, MASK)


@both
def test_build_frame_accepts_buffers(k):
    assert k.build_frame(1, bytearray(b"hi")) == b"\x81\x02hi"
    assert k.build_frame(1, memoryview(b"xhi")[1:]) == b"\x81\x02hi"


@both
@pytest.mark.parametrize(
    "kwargs",
    [
        {"opcode": -1},
        {"opcode": 16},
        {"rsv": -1},
        {"rsv": 8},
        {"mask": b"abc"},
        {"mask": b"abcde"},
    ],
)
def test_build_frame_rejects_bad_fields(k, kwargs):
    args = {"opcode": 1, "payload": b"x", **kwargs}
    with pytest.raises(ValueError):
        k.build_frame(**args)


@both
def test_build_frame_rejects_text_payload(k):
    with pytest.raises(TypeError):
        k.build_frame(1, "text")


@needs_compiled
@no_deadline
@given(
    opcode=st.integers(0, 15),
    payload=st.one_of(
        st.binary(max_size=300),
        st.integers(65530, 65540).map(lambda n: b"z" * n),
    ),
    fin=st.booleans(),
    mask=st.none() | st.binary(min_size=4, max_size=4),
    rsv=st.integers(0, 7),
)
def test_build_frame_implementations_agree(opcode, payload, fin, mask, rsv):
    built = _compiled.build_frame(opcode, payload, fin, mask, rsv)
    assert built == _speedups_py.build_frame(opcode, payload, fin, mask, rsv)


# --- build_close / close_code_and_reason ---------------------------------------------------


@both
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((), b"\x88\x00"),
        ((None, ""), b"\x88\x00"),
        ((1000,), b"\x88\x02\x03\xe8"),
        ((1000, "bye"), b"\x88\x05\x03\xe8bye"),
        ((1002, "protocol error"), b"\x88\x10\x03\xea" + b"protocol error"),
        ((1009,), b"\x88\x02\x03\xf1"),
        ((1013, "é"), b"\x88\x04\x03\xf5\xc3\xa9"),
        ((4999,), b"\x88\x02\x13\x87"),
    ],
)
def test_build_close_bytes(k, args, expected):
    assert k.build_close(*args) == expected


@both
def test_build_close_cuts_long_reason_on_a_character(k):
    frame = k.build_close(1000, "é" * 100)  # 200 bytes of UTF-8: only 123 fit
    assert frame[:2] == b"\x88\x7c"  # 2 + 122: the 62nd "é" would be cut in half
    assert frame[2:4] == b"\x03\xe8"
    assert frame[4:] == ("é" * 61).encode()
    assert k.build_close(1000, "x" * 200) == b"\x88\x7d\x03\xe8" + b"x" * 123


@both
@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_build_close_refuses_codes_not_for_the_wire(k, code):
    with pytest.raises(ValueError):
        k.build_close(code)


@both
def test_build_close_reason_needs_code(k):
    with pytest.raises(ValueError):
        k.build_close(None, "why")


@both
def test_close_code_and_reason(k):
    assert k.close_code_and_reason(b"") == (None, "")
    assert k.close_code_and_reason(b"\x03\xe8") == (1000, "")
    assert k.close_code_and_reason(b"\x0f\xa0h\xc3\xa9") == (4000, "hé")
    assert k.close_code_and_reason(bytearray(b"\x03\xe9x")) == (1001, "x")
    with pytest.raises(ValueError):
        k.close_code_and_reason(b"\x03")


@both
@no_deadline
@given(code=st.sampled_from([1000, 1001, 1003, 1011, 1014, 3000, 4999]), reason=st.text())
def test_build_close_round_trip(k, code, reason):
    frame = k.build_close(code, reason)
    assert frame[0] == 0x88
    assert frame[1] == len(frame) - 2 <= 125
    got_code, got_reason = k.close_code_and_reason(frame[2:])
    assert got_code == code
    assert reason.encode("utf-8", "surrogatepass").startswith(got_reason.encode())


@needs_compiled
@no_deadline
@given(code=st.none() | st.sampled_from([1000, 1008, 1012, 3001]), reason=st.text())
def test_build_close_implementations_agree(code, reason):
    if code is None:
        reason = ""

    def outcome(k):
        try:
            return k.build_close(code, reason)
        except UnicodeEncodeError:  # lone surrogates in the reason
            return "UnicodeEncodeError"

    assert outcome(_compiled) == outcome(_speedups_py)
