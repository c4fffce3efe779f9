"""Hypothesis strategies and mutators of the fuzz campaign's inputs (also used by the tests).

Commands as clients send them (valid, odd-typed, and mutated: bytes flipped, inserted,
deleted, truncated, spliced, nesting deepened, blown up past the size limits, odd tokens
dropped in), ``POST /_broadcast`` bodies, streams of client frames with structural mutations,
and the hostile connections of the live target.  :func:`random_mutant` is the cheap
(non-hypothesis) mutator the campaign applies around every example.
"""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import msgpack
from hypothesis import strategies as st

from bench.fuzz import shapes
from trio_cable import _speedups_py

#: Largest input the generators build (the server's default message limit is 1 MiB; these
#: stay below it so that a campaign explores many inputs rather than copying big ones).
MAX_INPUT = 80 * 1024

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


#: The amplifiers of issue 14 item 2 by codec (:mod:`bench.fuzz.shapes`).
AMPLIFIERS = {
    codec: [name for name, (_b, opcode, _s) in shapes.AMPLIFIERS.items()
            if (opcode == 2) == (codec == "msgpack")]
    for codec in ("json", "msgpack")
}  # fmt: skip


@st.composite
def amplification_payloads(draw: st.DrawFn, codec: str, max_size: int = MAX_INPUT) -> bytes:
    """An amplification frame of issue 14 (a million empty msgpack arrays, JSON made of
    ``[``), 1 KiB to *max_size* bytes, sometimes with a few byte mutations."""
    build = shapes.AMPLIFIERS[draw(st.sampled_from(AMPLIFIERS[codec]))][0]
    data = build(draw(st.integers(1024, max_size)))
    if draw(st.integers(0, 3)) == 0:
        data = random_mutant(data, random.Random(draw(st.integers(0, 2**32))), codec)
    return data[:max_size]


@st.composite
def command_payloads(draw: st.DrawFn, codec: str) -> bytes:
    """One client frame payload for *codec*: a valid, odd-typed or mutated command, or (1 in
    10) an amplification frame."""
    if draw(st.integers(0, 9)) == 0:
        return draw(amplification_payloads(codec))
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


def with_length(frame: bytes, new_length: int, encoding: int) -> bytes:
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
            f = bytearray(with_length(bytes(f), length, draw(st.integers(0, 2))))
        elif op == 5:  # non-minimal length encoding of the true length
            true_len = (
                len(f) - 2 - 4 - (2 if f[1] & 0x7F == 126 else 8 if f[1] & 0x7F == 127 else 0)
            )
            f = bytearray(with_length(bytes(f), max(true_len, 0), draw(st.integers(1, 2))))
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


# -- the live target's connections -----------------------------------------------------------------

SUBPROTOCOL_NAMES = [
    "actioncable-v1-json", "actioncable-v1-ext-json", "actioncable-v1-msgpack",
    "actioncable-v1-ext-msgpack",
]  # fmt: skip


#: Requests that stop half-way (issue 14 items 1 and 5), by name; ``tls-*`` go to the
#: live target's ``--tls-cert`` server.
STALLS = {
    "tls-client-hello": shapes.PARTIAL_CLIENT_HELLO,
    "tls-nothing": b"",
    "http-head": shapes.PARTIAL_HEAD,
    "http-body": shapes.partial_body("fuzz-key"),
    "http-chunked": shapes.partial_chunked("fuzz-key"),
    "http-body-no-key": shapes.partial_body(),
}
ENDS = ["linger", "linger", "abort", "close", "fin"]


@st.composite
def live_connections(draw: st.DrawFn) -> dict[str, Any]:
    """What one hostile (or clumsy) client does: an upgrade, then bytes in chunks; or a
    request that stops half-way (a stall); or an amplification frame (issue 14)."""
    spec: dict[str, Any] = {}
    kind = draw(st.integers(0, 19))
    if kind in (2, 3):  # a stall: the first bytes of a request, then silence
        name = draw(st.sampled_from(sorted(STALLS)))
        return {"stall": name, "data": STALLS[name][: draw(st.integers(0, 200)) or None],
                "cuts": [], "pause_ms": 0, "end": "linger"}  # fmt: skip
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
    if kind in (4, 5):  # amplification frames, within the live server's 64 KiB limit
        codec = "msgpack" if kind == 5 else "json"
        spec["path"] = "/cable"
        spec["subprotocols"] = [f"actioncable-v1-{codec}"]
        payload = draw(amplification_payloads(codec, max_size=65536))
        frame = client_frame(2 if codec == "msgpack" else 1, payload)
        spec["data"] = frame * draw(st.integers(1, 3))
    else:
        spec["data"] = draw(mutated_frame_streams())
    spec["cuts"] = draw(st.lists(st.integers(0, 100_000), max_size=6))
    spec["pause_ms"] = draw(st.sampled_from([0, 0, 1, 20]))
    spec["end"] = draw(st.sampled_from(ENDS))
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
        if rng.randrange(8) == 0:  # every batch has its stalls (issue 14 items 1 and 5)
            spec = {"stall": rng.choice(sorted(STALLS)), "cuts": [], "pause_ms": 0,
                    "end": "linger"}  # fmt: skip
        if "stall" in spec:  # another prefix of the same request
            spec["data"] = STALLS[spec["stall"]][: rng.randint(0, 200) or None]
            batch.append(spec)
            continue
        spec["data"] = random_mutant(spec["data"], rng, "msgpack")
        spec["cuts"] = [rng.randint(0, len(spec["data"]) + 1) for _ in range(rng.randint(0, 6))]
        spec["end"] = rng.choice(ENDS)
        batch.append(spec)
    return batch[:size]
