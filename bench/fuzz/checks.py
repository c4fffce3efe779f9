"""The contract every fuzz input is checked against: the Action Cable decoder, the broadcast
parser and the frame parser twins.  Each check raises ``AssertionError`` (or lets an
unexpected exception out) on a violation, and returns a short label of the outcome for the
statistics.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from collections.abc import Iterator
from typing import Any

from bench.fuzz.strategies import COMMAND_NAMES, chunked
from trio_cable import _speedups_py
from trio_cable.protocol import cable
from trio_cable.protocol.cable import InvalidCommand

try:
    from trio_cable import _speedups as COMPILED
except ImportError:  # pragma: no cover - the extension is built in CI
    COMPILED = None

#: A single decode / parse call taking longer than this is reported as a hang.
HANG_SECONDS = 5.0

FrameErrorT = _speedups_py.FrameError


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
        if COMPILED is not None:
            compiled = parse_events(COMPILED, chunks, **options)
            assert compiled == pure, f"twins disagree:\n compiled {compiled!r}\n pure     {pure!r}"
            whole = parse_events(COMPILED, [data], **options)
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
