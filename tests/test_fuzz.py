"""Fuzzing the protocol layer with hypothesis: mutated commands, publications and frame streams.

The strategies and checks live in :mod:`bench.fuzz.strategies` and :mod:`bench.fuzz.checks`,
so that the ten-minute campaign (``python -m bench fuzz``) and these quick runs test exactly
the same contract:

- :func:`~trio_cable.protocol.cable.decode_command` (JSON and msgpack),
  :func:`~trio_cable.protocol.cable.parse_identifier`,
  :func:`~trio_cable.protocol.cable.parse_action` and
  :func:`~trio_cable.protocol.cable.parse_publications` raise nothing but
  :class:`~trio_cable.protocol.cable.InvalidCommand` on valid commands that were mutated
  (bytes flipped, inserted, deleted, truncated, spliced, nesting deepened, blown up past the
  limits), return well-typed values that both codecs can re-encode, and return promptly;
- the compiled and pure frame parsers agree on every event and error for mutated streams of
  valid client frames in random chunkings (``tests/test_frames.py`` covers random and lightly
  corrupted streams; these are structural mutations of real command traffic: FIN, RSV, opcode
  and mask bits, lying and non-minimal length fields, frames dropped, duplicated and swapped).
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz import checks, strategies
from trio_cable import _speedups_py
from trio_cable.protocol import cable
from trio_cable.protocol.cable import InvalidCommand

# Results, not speed: no deadlines on a shared machine.  Big generated inputs are intended.
quick = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
needs_compiled = pytest.mark.skipif(
    checks.COMPILED is None, reason="trio_cable._speedups is not built"
)


# --- the Action Cable decoder -------------------------------------------------------------------


@quick
@given(payload=strategies.command_payloads("json"), kind=st.integers(0, 3))
def test_decode_command_json_mutated(payload: bytes, kind: int) -> None:
    checks.check_command(cable.JSON, strategies.as_payload(payload, kind))


@quick
@given(payload=strategies.command_payloads("msgpack"), kind=st.integers(0, 2))
def test_decode_command_msgpack_mutated(payload: bytes, kind: int) -> None:
    checks.check_command(cable.MSGPACK, strategies.as_payload(payload, kind))


@quick
@given(data=st.binary(max_size=300), codec=st.sampled_from([cable.JSON, cable.MSGPACK]))
def test_decode_command_random_bytes(data: bytes, codec: cable.Codec) -> None:
    checks.check_command(codec, data)


@quick
@given(obj=strategies.odd_commands(), codec=st.sampled_from(["json", "msgpack"]))
def test_decode_command_wrong_types(obj: object, codec: str) -> None:
    # Well-formed JSON / msgpack whose fields are missing or of the wrong type.
    checks.check_command(
        cable.JSON if codec == "json" else cable.MSGPACK, strategies.encode(codec, obj)
    )


@quick
@given(identifier=strategies.identifiers())
def test_parse_identifier_any_string(identifier: str) -> None:
    try:
        channel, params = cable.parse_identifier(identifier)
    except InvalidCommand as exc:
        assert exc.identifier == identifier
        return
    assert isinstance(channel, str) and channel
    assert isinstance(params, dict) and "channel" not in params


@quick
@given(data=st.one_of(st.text(max_size=200), strategies.command_payloads("json").map(
    lambda b: b.decode("utf-8", "replace"))))  # fmt: skip
def test_parse_action_any_string(data: str) -> None:
    try:
        action, obj = cable.parse_action(data, identifier="id")
    except InvalidCommand as exc:
        assert exc.identifier == "id" and exc.command == "message"
        return
    assert isinstance(action, str) and isinstance(obj, dict)


@quick
@given(body=strategies.publication_bodies(), kind=st.integers(0, 3))
def test_parse_publications_mutated(body: bytes, kind: int) -> None:
    checks.check_publications(strategies.as_payload(body, kind))


@quick
@given(data=st.binary(min_size=1, max_size=400), seed=st.integers(0, 2**32))
def test_cheap_mutants_of_valid_commands(data: bytes, seed: int) -> None:
    # The campaign's cheap mutator around a valid command, for both codecs.
    import random

    base = {"command": "subscribe", "identifier": '{"channel":"$pubsub","stream_name":"a"}'}
    rng = random.Random(seed)
    for codec_name, codec in (("json", cable.JSON), ("msgpack", cable.MSGPACK)):
        valid = strategies.encode(codec_name, base)
        for _ in range(4):
            checks.check_command(codec, strategies.random_mutant(valid + data[:4], rng, codec_name))


# Inputs that break naive decoders: recursion bombs, 4-GiB length prefixes, values JSON
# cannot carry, unpaired surrogates, integers past the digit limit.
NASTY_JSON = [
    b"[" * 100_000,
    b"{" * 50_000,
    b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
    b'{"command":"subscribe","identifier":"' + b"[" * 50_000 + b'"}',
    b'{"command":"message","identifier":"{\\"channel\\":\\"x\\"}","data":"' + b"[" * 50_000 + b'"}',
    b'{"command":"whisper","identifier":"x","data":' + b"[" * 33 + b"]" * 33 + b"}",
    b'{"command":"subscribe","identifier":"x","history":{"since":1e999}}',
    b'{"command":"subscribe","identifier":"x","history":{"since":NaN}}',
    b'{"command":"whisper","identifier":"x","data":"\\ud800"}',
    b'{"command":"whisper","identifier":"x","data":' + b"9" * 5000 + b"}",
    b'{"command":"whisper","identifier":"x","data":' + b"9" * 4000 + b"}",
    b'{"command":"history","identifier":"x","history":{"streams":{"s":{"epoch":"e","offset":'
    + b"9" * 40
    + b"}}}}",
    b'\xef\xbb\xbf{"command":"ping"}',
    b'{"command":"ping"}\x00',
    b'{"command":"ping"} {"command":"ping"}',
    "\ufeff".encode("utf-16"),
    b'{"command":"subscribe","identifier":"' + b"a" * 4097 + b'"}',
]

NASTY_MSGPACK = [
    b"\x91" * 100_000,
    b"\x81\xa1a" * 50_000 + b"\xc0",
    b"\xdd\xff\xff\xff\xff",
    b"\xdf\xff\xff\xff\xff",
    b"\xdb\xff\xff\xff\xff",
    b"\xc6\xff\xff\xff\xff",
    b"\x82\xa7command\xa7whisper\xaaidentifier\xa1x",  # map of 2 with a missing value
    b"\x83\xa7command\xa7whisper\xaaidentifier\xa1x\xa4data\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00",
    b"\x83\xa7command\xa7whisper\xaaidentifier\xa1x\xa4data\xd6\xff\x00\x00\x00\x01",
    b"\x83\xa7command\xa7whisper\xaaidentifier\xa1x\xa4data\xc7\x05\xff\x00\x00\x00\x00\x00",
    b"\x83\xa7command\xa7whisper\xaaidentifier\xa1x\xa4data\xd4\x01\x00",
    b"\x83\xa7command\xa7whisper\xaaidentifier\xa1x\xa4data\xc4\x03abc",
    b"\x83\xa7command\xa7whisper\xaaidentifier\xa1x\xa4data\x81\x01\x02",
    b"\x82\xa7command\xa9subscribe\xaaidentifier\xa3\xed\xa0\x80",
    b"\x81\xa7command\xa4ping\xc0",  # trailing data
    b"\xc1",
    b"",
]


@pytest.mark.parametrize("payload", NASTY_JSON, ids=range(len(NASTY_JSON)))
def test_nasty_json(payload: bytes) -> None:
    for kind in range(4):
        checks.check_command(cable.JSON, strategies.as_payload(payload, kind))


@pytest.mark.parametrize("payload", NASTY_MSGPACK, ids=range(len(NASTY_MSGPACK)))
def test_nasty_msgpack(payload: bytes) -> None:
    checks.check_command(cable.MSGPACK, payload)


def test_nasty_publications() -> None:
    for body in [
        b"[" * 100_000,
        json.dumps({"stream": "s", "data": json.dumps(strategies.nested("x", 300))}).encode(),
        json.dumps([{"stream": "s", "data": "\ud800"}] * 3).encode("utf-8", "surrogatepass"),
        b'{"stream":"s","data":' + b"9" * 4000 + b"}",
        b'{"command":"disconnect","payload":{"identifier":"' + b"[" * 1000 + b'"}}',
    ]:
        checks.check_publications(body)


def test_whisper_values_survive_both_codecs() -> None:
    # A msgpack client's NaN is no JSON value: refused (an invalid command), never relayed
    # to JSON clients; a JSON client's 4,000-digit integer is a JSON value and relays.
    assert checks.check_command(cable.MSGPACK, NASTY_MSGPACK[7]) == (
        "invalid: whisper data is not a JSON value"
    )
    assert checks.check_command(cable.JSON, NASTY_JSON[10]) == "ok: whisper, bad identifier"


# A JSON text with more than 32 brackets (so the exact depth scan runs) followed by many
# escaped quotes (an unterminated string literal): a scan whose regex matched whole string
# literals retried from every quote (quadratic; found by the fuzz campaign, fixed).
QUADRATIC = ("[]" * 40 + '"\\' * 10_000).encode()


def test_depth_scan_is_linear_on_escaped_quotes() -> None:
    with checks.hang_alarm(0.3), pytest.raises(InvalidCommand):
        cable.decode_command(cable.JSON, QUADRATIC)
    big = ("[]" * 40 + '"\\' * 500_000).encode()  # 1 MB: seconds at most, not hours
    with checks.hang_alarm(3.0), pytest.raises(InvalidCommand):
        cable.decode_command(cable.JSON, big)


def test_worst_case_inputs_are_fast() -> None:
    # Linear-time paths: a 1 MiB recursion bomb and 1 MiB of escaped quotes without brackets
    # are refused within a fraction of a second each.
    for payload in [b"[" * 2**20, b'"' + b'\\"' * 2**19, b'{"a":"' + b"\\u0000" * 2**17 + b'"}']:
        start = time.perf_counter()
        with checks.hang_alarm(5.0), pytest.raises(InvalidCommand):
            cable.decode_command(cable.JSON, payload)
        assert time.perf_counter() - start < 2.0


# --- the frame parser: compiled and pure twins on mutated command traffic -------------------------

frame_settings = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@needs_compiled
@frame_settings
@given(
    data=strategies.mutated_frame_streams(),
    cuts=st.lists(st.integers(0, 200_000), max_size=12),
    max_size=st.sampled_from([0, 10, 125, 126, 300, 4096, 65535, 65536, 1048576]),
    require_mask=st.booleans(),
)
def test_twins_agree_on_mutated_command_streams(
    data: bytes, cuts: list[int], max_size: int, require_mask: bool
) -> None:
    checks.check_frames(data, cuts, max_size, require_mask)


@needs_compiled
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=strategies.frame_list(), seed=st.integers(0, 2**32))
def test_twins_agree_byte_by_byte(frames: list[bytes], seed: int) -> None:
    # One byte per feed: every header and payload boundary falls between two reads.
    import random

    data = b"".join(frames)[:4000]
    data = strategies.random_mutant(data, random.Random(seed), "msgpack")
    checks.check_frames(data, list(range(1, len(data))), 65536, True)


@pytest.mark.parametrize(
    "length",
    [126, 65535, 65536, 2**31, 2**32 + 5, 2**63 - 1, 2**63, 2**64 - 1],
)
@pytest.mark.parametrize("encoding", [1, 2])
def test_lying_length_fields(length: int, encoding: int) -> None:
    frame = strategies.client_frame(1, b'{"command":"ping"}')
    lied = strategies.with_length(frame, length, encoding)
    for max_size in (125, 65536, 1048576):
        checks.check_frames(lied, [3, 7], max_size, True)


def test_parse_events_keeps_raising_after_an_error() -> None:
    events = checks.parse_events(_speedups_py, [b"\x81\x05hello"], max_message_size=100)
    assert events == [("error", 1002, "client frame not masked")]
