"""Pure-Python twin of the compiled ``trio_cable._speedups`` WebSocket kernels.

Same API and byte-for-byte the same results as ``_speedups/_speedups.pyx``; the tests run
both and compare them.  It is the fallback when the extension is not built (no compiler)
or ``TRIO_CABLE_NO_EXTENSIONS`` is set, so it leans on C-implemented built-ins
(``int.from_bytes`` for masking, the ``utf-8`` codec for validation) to stay usable.

``FrameError`` lives here only: the compiled module imports it, so ``except FrameError``
catches errors from either implementation.
"""

from __future__ import annotations

import codecs
import operator
from typing import TYPE_CHECKING

from trio_cable.protocol.codes import (
    CLOSE_CODE_RANGES,
    COMPRESSED,
    MAX_CLOSE_REASON,
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    CloseCode,
    FrameRefusal,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "FrameError",
    "FrameParser",
    "Utf8Validator",
    "build_close",
    "build_frame",
    "close_code_and_reason",
    "unmask",
    "validate_utf8",
]

# The numbers and words both kernels share (trio_cable.protocol.codes); the compiled module
# imports the same names.
_PROTOCOL_ERROR = int(CloseCode.PROTOCOL_ERROR)
_INVALID_PAYLOAD = int(CloseCode.INVALID_PAYLOAD)
_MESSAGE_TOO_BIG = int(CloseCode.MESSAGE_TOO_BIG)
_R = FrameRefusal

# A frame length or a message size can never exceed this (the 64-bit length's top bit is 0).
_MAX_LENGTH = (1 << 63) - 1


class FrameError(Exception):
    """A client violated RFC 6455.

    ``code`` is the close code to send back (1002 protocol error, 1007 invalid payload data
    such as bad UTF-8, 1009 message too big) and ``reason`` a short text for the close frame
    and the logs.
    """

    code: int
    reason: str

    def __init__(self, code: int, reason: str) -> None:
        # Plain int and str whatever the caller passed (the kernels pass CloseCode and
        # FrameRefusal members), so that errors of both kernels compare and print alike.
        code, reason = int(code), str(reason)
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.reason} (close code {self.code})"


def _byte_view(data: Buffer) -> memoryview:
    """A flat byte view of any contiguous buffer (TypeError for str, int and friends)."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _mask_bytes(mask: Buffer) -> bytes:
    m = bytes(_byte_view(mask))
    if len(m) != 4:
        raise ValueError("mask must be 4 bytes")
    return m


def _xor(view: memoryview, mask: bytes) -> bytes:
    """XOR *view* with the repeating 4-byte *mask*, which starts at view[0]."""
    n = len(view)
    if not n:
        return b""
    # One big-integer XOR does the whole buffer in C; far faster than a Python byte loop.
    key = (mask * ((n >> 2) + 1))[:n]
    return (int.from_bytes(view, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


def unmask(data: Buffer, mask: Buffer) -> bytes:
    """Return *data* XORed with the repeating 4-byte *mask* (masking is its own inverse)."""
    return _xor(_byte_view(data), _mask_bytes(mask))


def validate_utf8(data: Buffer) -> bool:
    """True if *data* is strict UTF-8: no surrogates, no overlong forms, nothing past U+10FFFF."""
    try:
        codecs.utf_8_decode(data, "strict", True)
    except UnicodeDecodeError:
        return False
    return True


class Utf8Validator:
    """Incremental UTF-8 validation for a text message that arrives in pieces."""

    __slots__ = ("_decoder", "_ok")

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._ok = True

    def feed(self, data: Buffer, final: bool) -> bool:
        """Validate the next piece; False once the bytes so far cannot start valid UTF-8.

        Fails fast: False as soon as no continuation could make the bytes seen so far valid.
        With ``final=True`` an unfinished sequence at the end is also invalid.  Once False,
        it stays False until :meth:`reset`; after a valid final piece it starts over.
        """
        if not self._ok:
            return False
        decoder = self._decoder
        try:
            decoder.decode(data, final)
        except UnicodeDecodeError:
            self._ok = False
            return False
        if not final:
            # CPython's decoder keeps ED A0..ED BF pending rather than rejecting it at once (an
            # error handler could still want the surrogate), but no strict UTF-8 starts so.
            pending = decoder.getstate()[0]
            if len(pending) >= 2 and pending[0] == 0xED and pending[1] >= 0xA0:
                self._ok = False
                return False
        return True

    def reset(self) -> None:
        """Forget everything fed so far: start a new message."""
        self._decoder.reset()
        self._ok = True


def _close_code_ok(code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in CLOSE_CODE_RANGES)


def build_frame(
    opcode: int,
    payload: Buffer,
    fin: bool = True,
    mask: Buffer | None = None,
    rsv: int = 0,
) -> bytes:
    """Encode one frame.

    Server frames are unmasked (``mask=None``); a 4-byte *mask* builds a masked client frame.
    *rsv* is the three RSV bits as an int 0..7.  The payload length uses the shortest of the
    7-, 16- and 64-bit encodings.  No protocol rule is enforced beyond the field ranges, so
    tests can build invalid frames on purpose.
    """
    if not 0 <= opcode <= 15:
        raise ValueError("opcode must be 0..15")
    if not 0 <= rsv <= 7:
        raise ValueError("rsv must be 0..7")
    view = _byte_view(payload)
    n = len(view)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0 if mask is None else 0x80
    if n < 126:
        header = bytes((first, mask_bit | n))
    elif n < 65536:
        header = bytes((first, mask_bit | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, mask_bit | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return header + view
    m = _mask_bytes(mask)
    return header + m + _xor(view, m)


def build_close(code: int | None = None, reason: str = "") -> bytes:
    """Encode a server close frame; ``code=None`` sends an empty payload.

    The code must be one a peer may send (1000-1003, 1007-1014, 3000-4999).  A reason longer
    than fits a control frame (123 bytes of UTF-8) is cut at a character boundary.
    """
    if code is None:
        if reason:
            raise ValueError("a close reason needs a close code")
        return b"\x88\x00"
    code = operator.index(code)
    if not _close_code_ok(code):
        raise ValueError(f"close code {code} may not be sent")
    encoded = reason.encode("utf-8")
    if len(encoded) > MAX_CLOSE_REASON:
        encoded = encoded[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
    payload = code.to_bytes(2, "big") + encoded
    return bytes((0x88, len(payload))) + payload


def close_code_and_reason(payload: Buffer) -> tuple[int | None, str]:
    """Decode a close payload that :class:`FrameParser` has validated: ``(None, "")`` if empty."""
    view = _byte_view(payload)
    if not len(view):
        return None, ""
    if len(view) < 2:
        raise ValueError("close payload of 1 byte")
    return (view[0] << 8) | view[1], codecs.utf_8_decode(view[2:], "strict", True)[0]


class FrameParser:
    """Parses the frames a client sends to the server (RFC 6455; with ``compression`` on,
    permessage-deflate's RSV1 too: a message whose first frame has RSV1 set comes out as
    ``opcode | COMPRESSED``, its payload deflated and not yet UTF-8 checked).

    Sans-I/O: :meth:`feed` the bytes read from the socket, then call :meth:`next_message`
    until it returns None.  Data frame payloads are unmasked (and text validated) as their
    bytes arrive rather than once the whole frame is in, so invalid UTF-8 fails fast and a
    large frame is not buffered twice.
    """

    __slots__ = (
        "_buf",
        "_compression",
        "_error",
        "_f_fin",
        "_f_in",
        "_f_len",
        "_f_mask",
        "_f_opcode",
        "_f_phase",
        "_m_compressed",
        "_m_opcode",
        "_m_parts",
        "_m_size",
        "_max",
        "_pos",
        "_require_mask",
        "_validator",
    )

    def __init__(
        self, max_message_size: int = 1048576, require_mask: bool = True, compression: bool = False
    ) -> None:
        if max_message_size < 0:
            raise ValueError("max_message_size must be >= 0")
        self._max = min(int(max_message_size), _MAX_LENGTH)
        self._require_mask = bool(require_mask)
        self._compression = bool(compression)
        self._m_compressed = False
        self._buf = bytearray()
        self._pos = 0
        self._error: tuple[int, str] | None = None
        # The frame whose payload is being read (valid while _f_in).
        self._f_in = False
        self._f_fin = False
        self._f_opcode = 0
        self._f_len = 0  # payload bytes still to read
        self._f_mask = b"\x00\x00\x00\x00"
        self._f_phase = 0  # payload bytes read so far, mod 4: where in the mask we are
        # The data message being assembled (_m_opcode 0: none).
        self._m_opcode = 0
        self._m_size = 0
        self._m_parts = bytearray()
        self._validator = Utf8Validator()

    @property
    def max_message_size(self) -> int:
        """Largest message (all fragments together) accepted, in bytes."""
        return self._max

    @property
    def pending(self) -> int:
        """Bytes held for what is not a whole message yet: the unfinished message's payload
        so far, and received bytes not parsed (a partial header or control frame)."""
        return (self._m_size if self._m_opcode else 0) + len(self._buf) - self._pos

    @property
    def require_mask(self) -> bool:
        """Whether unmasked frames are a protocol error (they are for a server)."""
        return self._require_mask

    @property
    def compression(self) -> bool:
        """Whether RSV1 marks a compressed message (permessage-deflate was negotiated)."""
        return self._compression

    def feed(self, data: Buffer) -> None:
        """Append bytes received from the client; *data* is copied, so its buffer can be reused."""
        if self._error is not None:
            raise FrameError(*self._error)
        self._buf += data

    def _fail(self, code: int, reason: str) -> FrameError:
        self._error = (code, reason)
        return FrameError(code, reason)

    def _parse_header(self) -> bool:
        """Consume one frame header if it is all there; False when more bytes are needed.

        Every check is made as soon as the bytes it needs are in, so an error does not wait
        for the rest of the header.
        """
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < 2:
            return False
        b0 = buf[pos]
        b1 = buf[pos + 1]
        opcode = b0 & 0x0F
        compressed = False
        if b0 & 0x70:
            # RSV1 alone, with permessage-deflate, on the first frame of a data message.
            if (b0 & 0x70) != 0x40 or not self._compression:
                raise self._fail(_PROTOCOL_ERROR, _R.RSV)
            if opcode not in (OP_TEXT, OP_BINARY):
                raise self._fail(_PROTOCOL_ERROR, _R.RSV1_NOT_FIRST)
            compressed = True
        fin = bool(b0 & 0x80)
        length = b1 & 0x7F
        if opcode >= 8:
            if opcode > 10:
                raise self._fail(_PROTOCOL_ERROR, _R.OPCODE)
            if not fin:
                raise self._fail(_PROTOCOL_ERROR, _R.CONTROL_FRAGMENTED)
            if length > MAX_CONTROL_PAYLOAD:
                raise self._fail(_PROTOCOL_ERROR, _R.CONTROL_TOO_LONG)
        elif opcode > 2:
            raise self._fail(_PROTOCOL_ERROR, _R.OPCODE)
        elif opcode == OP_CONT:
            if not self._m_opcode:
                raise self._fail(_PROTOCOL_ERROR, _R.NO_MESSAGE)
        elif self._m_opcode:
            raise self._fail(_PROTOCOL_ERROR, _R.MESSAGE_IN_PROGRESS)
        masked = b1 & 0x80
        if not masked and self._require_mask:
            raise self._fail(_PROTOCOL_ERROR, _R.UNMASKED)
        size = 2
        if length == 126:
            size = 4
            if avail < size:
                return False
            length = (buf[pos + 2] << 8) | buf[pos + 3]
            if length < 126:
                raise self._fail(_PROTOCOL_ERROR, _R.LENGTH_NOT_MINIMAL)
        elif length == 127:
            size = 10
            if avail < size:
                return False
            length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            if length > _MAX_LENGTH:
                raise self._fail(_PROTOCOL_ERROR, _R.LENGTH)
            if length < 65536:
                raise self._fail(_PROTOCOL_ERROR, _R.LENGTH_NOT_MINIMAL)
        if opcode < 8 and length > self._max - self._m_size:
            raise self._fail(_MESSAGE_TOO_BIG, _R.TOO_BIG)
        if masked:
            if avail < size + 4:
                return False
            self._f_mask = bytes(buf[pos + size : pos + size + 4])
            size += 4
        else:
            self._f_mask = b"\x00\x00\x00\x00"
        self._pos = pos + size
        self._f_in = True
        self._f_fin = fin
        self._f_opcode = opcode
        self._f_len = length
        self._f_phase = 0
        if opcode in (OP_TEXT, OP_BINARY):
            self._m_opcode = opcode
            self._m_compressed = compressed
            self._m_size = 0
        return True

    def _need_more(self) -> None:
        # What is left is at most a partial header or a partial control frame (data payloads
        # are consumed as they arrive), so moving it to the front is cheap.
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0

    def next_message(self) -> tuple[int, bytes] | None:
        """Return the next complete message or control frame, or None when more bytes are needed.

        ``(OP_TEXT | OP_BINARY, payload)`` is a whole message, reassembled from its fragments
        and unmasked; text has been checked to be UTF-8.  ``(OP_PING | OP_PONG | OP_CLOSE,
        payload)`` is a control frame, which may come between the fragments of a message; a
        close payload has been validated.  Raises :class:`FrameError` at the first violation
        of RFC 6455; the messages before it are returned first, and afterwards every call
        raises the same error again.
        """
        if self._error is not None:
            raise FrameError(*self._error)
        buf = self._buf
        while True:
            if not self._f_in and not self._parse_header():
                self._need_more()
                return None
            pos = self._pos
            avail = len(buf) - pos
            opcode = self._f_opcode
            remaining = self._f_len
            if opcode >= 8:
                if avail < remaining:
                    self._need_more()
                    return None
                payload = _xor(memoryview(buf)[pos : pos + remaining], self._f_mask)
                self._pos = pos + remaining
                self._f_in = False
                if opcode == OP_CLOSE:
                    self._check_close(payload)
                return opcode, payload
            # A compressed text message is validated once inflated, by whoever inflates it.
            text = self._m_opcode == OP_TEXT and not self._m_compressed
            if self._f_fin and not self._m_size and avail >= remaining:
                # The whole message is one frame that is all here: no reassembly needed.
                payload = _xor(memoryview(buf)[pos : pos + remaining], self._f_mask)
                self._pos = pos + remaining
                self._f_in = False
                if text and not validate_utf8(payload):
                    raise self._fail(_INVALID_PAYLOAD, _R.TEXT_UTF8)
                opcode = self._m_opcode
                self._m_opcode = 0
                if self._m_compressed:
                    opcode |= COMPRESSED
                return opcode, payload
            take = min(avail, remaining)
            if take:
                phase = self._f_phase
                mask = self._f_mask
                if phase:
                    mask = mask[phase:] + mask[:phase]
                chunk = _xor(memoryview(buf)[pos : pos + take], mask)
                if text and not self._validator.feed(chunk, False):
                    raise self._fail(_INVALID_PAYLOAD, _R.TEXT_UTF8)
                self._m_parts += chunk
                self._m_size += take
                self._pos = pos + take
                self._f_phase = (phase + take) & 3
                remaining -= take
                self._f_len = remaining
            if remaining:
                self._need_more()
                return None
            self._f_in = False
            if self._f_fin:
                if text and not self._validator.feed(b"", True):
                    raise self._fail(_INVALID_PAYLOAD, _R.TEXT_UTF8)
                self._validator.reset()
                payload = bytes(self._m_parts)
                self._m_parts = bytearray()
                opcode = self._m_opcode
                if self._m_compressed:
                    opcode |= COMPRESSED
                self._m_opcode = 0
                self._m_size = 0
                return opcode, payload

    def _check_close(self, payload: bytes) -> None:
        n = len(payload)
        if n == 1:
            raise self._fail(_PROTOCOL_ERROR, _R.CLOSE_1)
        if n:
            if not _close_code_ok((payload[0] << 8) | payload[1]):
                raise self._fail(_PROTOCOL_ERROR, _R.CLOSE_CODE)
            if not validate_utf8(payload[2:]):
                raise self._fail(_INVALID_PAYLOAD, _R.CLOSE_UTF8)
