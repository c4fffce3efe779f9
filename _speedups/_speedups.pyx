# cython: language_level=3
"""Compiled WebSocket kernels for trio_cable: masking, UTF-8 validation, frame parsing.

The pure-Python twin ``trio_cable/_speedups_py.py`` has the same API and gives byte-for-byte
the same results (the tests compare them); read it first for the semantics.  This module
differs only in how: masking a word at a time (which gcc vectorizes), an ASCII fast path in
front of a branch-free UTF-8 automaton, and a parser that unmasks and validates a payload in
one pass straight into the output buffer.

setup.py compiles with boundscheck/wraparound off and cdivision on: every index below is
checked by hand against the lengths it is derived from.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy, memmove, memset

import operator

# One exception class for both implementations, so `except FrameError` catches either.
from trio_cable._speedups_py import FrameError

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

# The numbers and words both kernels share come from trio_cable.protocol.codes.  The read
# path compares opcodes and raises close codes in C, so the ones it needs are mirrored as C
# constants below and checked against that module right here, at import: a mismatch is an
# ImportError, never a silent drift.
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
    FrameRefusal as _R,
)

cdef extern from *:
    """
    #define TC_HIGH_BITS 0x8080808080808080ULL
    """
    const uint64_t TC_HIGH_BITS  # the high bit of each byte of a word: non-ASCII if any set

cdef enum:
    C_OP_CONT = 0
    C_OP_TEXT = 1
    C_OP_BINARY = 2
    C_OP_CLOSE = 8
    C_OP_PONG = 10
    C_MAX_CONTROL = 125
    C_MAX_CLOSE_REASON = 123
    C_PROTOCOL_ERROR = 1002
    C_INVALID_PAYLOAD = 1007
    C_MESSAGE_TOO_BIG = 1009
    C_COMPRESSED = 0x40
    # When idle, a parser gives back buffers grown past this (a server holds thousands).
    _KEEP_CAPACITY = 16384
    # The receive buffer's first allocation, so that tiny reads don't realloc one by one.
    _MIN_CAPACITY = 1024

if (
    (C_OP_CONT, C_OP_TEXT, C_OP_BINARY, C_OP_CLOSE, C_OP_PONG)
    != (OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PONG)
    or (C_MAX_CONTROL, C_MAX_CLOSE_REASON) != (MAX_CONTROL_PAYLOAD, MAX_CLOSE_REASON)
    or C_COMPRESSED != COMPRESSED
    or (C_PROTOCOL_ERROR, C_INVALID_PAYLOAD, C_MESSAGE_TOO_BIG)
    != (CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_PAYLOAD, CloseCode.MESSAGE_TOO_BIG)
    or CLOSE_CODE_RANGES != ((1000, 1003), (1007, 1014), (3000, 4999))
):
    raise ImportError("trio_cable._speedups is out of step with trio_cable.protocol.codes")

# A frame length or a message size can never exceed this (the 64-bit length's top bit is 0).
_MAX_LENGTH = (1 << 63) - 1


# --- UTF-8 automaton -------------------------------------------------------------------------
#
# A state says what the next byte must be.  ACCEPT is "between characters"; the others wait
# for continuation bytes, with the range of the next one narrowed where the lead byte demands
# it (E0: no overlong, ED: no surrogate, F0: no overlong, F4: not past U+10FFFF).  Rejecting
# at the first byte that cannot continue makes validation fail-fast and prefix-exact,
# matching the pure twin.
#
# Shift-based encoding: a state is a bit offset (6 * its number), and _rows[byte] packs the
# next state for every current state, so a step is `(_rows[byte] >> state) & 63`.  The row
# load depends only on the data, leaving a shift and an AND on the serial path: about two
# cycles a byte with no branch to mispredict, however ASCII and other characters are mixed.

cdef enum:
    U_ACCEPT = 0
    U_CONT1 = 6     # one more 80..BF
    U_CONT2 = 12    # 80..BF, then one more
    U_CONT3 = 18    # 80..BF, then two more
    U_E0 = 24       # A0..BF, then one more
    U_ED = 30       # 80..9F, then one more
    U_F0 = 36       # 90..BF, then two more
    U_F4 = 42       # 80..8F, then two more
    U_REJECT = 48   # absorbing
    U_STATES = 9
    # Non-ASCII bytes handed to the two-chain automaton at once, before looking for ASCII.
    _DUAL_SPAN = 256

cdef uint64_t _rows[256]


cdef void _utf8_set(int state, int lo, int hi, int target) noexcept:
    cdef int c
    for c in range(lo, hi + 1):
        _rows[c] = (_rows[c] & ~(<uint64_t>63 << state)) | (<uint64_t>target << state)


cdef void _utf8_init() noexcept:
    cdef int c, s
    for c in range(256):
        _rows[c] = 0
        for s in range(U_STATES):
            _rows[c] |= <uint64_t>U_REJECT << (6 * s)
    _utf8_set(U_ACCEPT, 0x00, 0x7F, U_ACCEPT)
    _utf8_set(U_ACCEPT, 0xC2, 0xDF, U_CONT1)
    _utf8_set(U_ACCEPT, 0xE0, 0xE0, U_E0)
    _utf8_set(U_ACCEPT, 0xE1, 0xEC, U_CONT2)
    _utf8_set(U_ACCEPT, 0xED, 0xED, U_ED)
    _utf8_set(U_ACCEPT, 0xEE, 0xEF, U_CONT2)
    _utf8_set(U_ACCEPT, 0xF0, 0xF0, U_F0)
    _utf8_set(U_ACCEPT, 0xF1, 0xF3, U_CONT3)
    _utf8_set(U_ACCEPT, 0xF4, 0xF4, U_F4)
    _utf8_set(U_CONT1, 0x80, 0xBF, U_ACCEPT)
    _utf8_set(U_CONT2, 0x80, 0xBF, U_CONT1)
    _utf8_set(U_CONT3, 0x80, 0xBF, U_CONT2)
    _utf8_set(U_E0, 0xA0, 0xBF, U_CONT1)
    _utf8_set(U_ED, 0x80, 0x9F, U_CONT1)
    _utf8_set(U_F0, 0x90, 0xBF, U_CONT2)
    _utf8_set(U_F4, 0x80, 0x8F, U_CONT2)


_utf8_init()


cdef inline uint64_t _load64(const uint8_t* p) noexcept nogil:
    # memcpy compiles to one unaligned load on x86 and arm64, without alignment UB.
    cdef uint64_t w
    memcpy(&w, p, 8)
    return w


cdef int _utf8_dual(const uint8_t* p, size_t n, uint64_t st) noexcept nogil:
    """The automaton over n >= 64 bytes as two interleaved chains, for twice the throughput.

    The second chain starts at a character boundary near the middle, in the accept state;
    the first must end there in the accept state too, or the byte after it (not a
    continuation) rejects.  So the result is exactly that of one chain over all n bytes.
    """
    cdef size_t s = n >> 1
    cdef size_t j, common
    cdef uint64_t sb = U_ACCEPT
    while (p[s] & 0xC0) == 0x80:
        s += 1
        if s - (n >> 1) > 3:
            return U_REJECT  # four continuation bytes in a row are never valid
    common = s if s < n - s else n - s
    for j in range(common):
        st = (_rows[p[j]] >> st) & 63
        sb = (_rows[p[s + j]] >> sb) & 63
    for j in range(common, s):
        st = (_rows[p[j]] >> st) & 63
    for j in range(s + common, n):
        sb = (_rows[p[j]] >> sb) & 63
    if st != U_ACCEPT:
        return U_REJECT
    return <int>sb


cdef int _utf8_run(const uint8_t* p, size_t n, int state) noexcept nogil:
    """Advance the validation state over n bytes; U_REJECT as soon as they cannot be UTF-8.

    Between characters, ASCII is skipped 16 or 32 bytes at a time; other bytes go through
    the automaton, two chains at once over long stretches, 16 at a time near the end.
    REJECT is absorbing, so it is checked once per stretch, not per byte.
    """
    cdef size_t i = 0
    cdef size_t span
    cdef uint64_t st = <uint64_t>state
    cdef int j
    while i + 16 <= n:
        if st == U_ACCEPT and not (_load64(p + i) | _load64(p + i + 8)) & TC_HIGH_BITS:
            i += 16
            while i + 32 <= n and not (_load64(p + i) | _load64(p + i + 8)
                                       | _load64(p + i + 16) | _load64(p + i + 24)
                                       ) & TC_HIGH_BITS:
                i += 32
            continue
        span = n - i
        if span >= 64:
            if span > _DUAL_SPAN:
                span = _DUAL_SPAN
            st = <uint64_t>_utf8_dual(p + i, span, st)
            if st == U_REJECT:
                return U_REJECT
            i += span
            continue
        for j in range(16):
            st = (_rows[p[i + j]] >> st) & 63
        if st == U_REJECT:
            return U_REJECT
        i += 16
    while i < n:
        st = (_rows[p[i]] >> st) & 63
        i += 1
    return <int>st


# --- Masking ---------------------------------------------------------------------------------

cdef inline uint64_t _mask64(const uint8_t* mask, size_t phase) noexcept nogil:
    """The mask repeated to 8 bytes, starting at byte *phase* of the mask."""
    cdef uint8_t m[8]
    cdef int j
    for j in range(8):
        m[j] = mask[(phase + j) & 3]
    cdef uint64_t w
    memcpy(&w, m, 8)
    return w


cdef void _xor_into(const uint8_t* src, uint8_t* dst, size_t n, uint64_t m64) noexcept nogil:
    """dst = src XOR the repeating mask; m64 holds the mask bytes for dst[0..7]."""
    cdef size_t i = 0
    cdef uint64_t w
    # Whole words: a branch-free loop that gcc -O3 turns into SIMD.
    cdef size_t words = n >> 3
    cdef size_t k
    for k in range(words):
        memcpy(&w, src + (k << 3), 8)
        w ^= m64
        memcpy(dst + (k << 3), &w, 8)
    i = words << 3
    cdef const uint8_t* mb = <const uint8_t*>&m64
    while i < n:
        dst[i] = src[i] ^ mb[i & 7]
        i += 1


cdef int _xor_validate_into(const uint8_t* src, uint8_t* dst, size_t n, uint64_t m64,
                            int state) noexcept nogil:
    """Unmask into dst and validate the result as UTF-8 in the same pass.

    Blocks of 256 bytes are unmasked while OR-ing their words together; only a block with
    a high bit set (or a character pending from the previous one) is then validated, from
    L1 cache.  So ASCII costs a single streaming pass.
    """
    cdef size_t i = 0
    cdef size_t k, words
    cdef uint64_t w, seen
    cdef const uint8_t* mb = <const uint8_t*>&m64
    while i < n:
        words = (n - i) >> 3
        if words > 32:
            words = 32
        if words == 0:
            break
        seen = 0
        for k in range(words):
            w = _load64(src + i + (k << 3)) ^ m64
            memcpy(dst + i + (k << 3), &w, 8)
            seen |= w
        if state != U_ACCEPT or seen & TC_HIGH_BITS:
            state = _utf8_run(dst + i, words << 3, state)
            if state == U_REJECT:
                return U_REJECT
        i += words << 3
    cdef size_t start = i
    while i < n:
        dst[i] = src[i] ^ mb[i & 7]
        i += 1
    return _utf8_run(dst + start, n - start, state)


# --- Buffers ---------------------------------------------------------------------------------

cdef inline int _get_buffer(object obj, Py_buffer* view) except -1:
    # PyBUF_SIMPLE: any C-contiguous buffer, seen as raw bytes (bytes, bytearray, memoryview).
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)


cdef inline bytes _new_bytes(Py_ssize_t n):
    # Uninitialised: every caller fills all n bytes before the object escapes.
    return PyBytes_FromStringAndSize(NULL, n)


cdef int _read_mask(object mask, uint8_t* out) except -1:
    cdef Py_buffer view
    _get_buffer(mask, &view)
    try:
        if view.len != 4:
            raise ValueError("mask must be 4 bytes")
        memcpy(out, view.buf, 4)
    finally:
        PyBuffer_Release(&view)
    return 0


cdef inline bint _close_code_ok(int code) noexcept:
    # RFC 6455 section 7.4 plus the IANA registry's 1012-1014; see the pure twin.
    # CLOSE_CODE_RANGES, written out for C (checked against it at import).
    return (1000 <= code <= 1003) or (1007 <= code <= 1014) or (3000 <= code <= 4999)


# --- Public kernels --------------------------------------------------------------------------

def unmask(data, mask):
    """Return *data* XORed with the repeating 4-byte *mask* (masking is its own inverse)."""
    cdef uint8_t m[4]
    _read_mask(mask, m)
    cdef Py_buffer view
    cdef bytes out
    _get_buffer(data, &view)
    try:
        out = _new_bytes(view.len)
        _xor_into(<const uint8_t*>view.buf, <uint8_t*>PyBytes_AS_STRING(out), <size_t>view.len,
                  _mask64(m, 0))
    finally:
        PyBuffer_Release(&view)
    return out


def validate_utf8(data):
    """True if *data* is strict UTF-8: no surrogates, no overlong forms, nothing past U+10FFFF."""
    cdef Py_buffer view
    cdef int state
    _get_buffer(data, &view)
    state = _utf8_run(<const uint8_t*>view.buf, <size_t>view.len, U_ACCEPT)
    PyBuffer_Release(&view)
    return state == U_ACCEPT


@cython.auto_pickle(False)
cdef class Utf8Validator:
    """Incremental UTF-8 validation for a text message that arrives in pieces."""

    cdef int _state

    def __init__(self):
        self._state = U_ACCEPT

    def feed(self, data, bint final):
        """Validate the next piece; False once the bytes so far cannot start valid UTF-8.

        Fails fast: False as soon as no continuation could make the bytes seen so far valid.
        With ``final=True`` an unfinished sequence at the end is also invalid.  Once False,
        it stays False until :meth:`reset`; after a valid final piece it starts over.
        """
        if self._state == U_REJECT:
            return False
        cdef Py_buffer view
        _get_buffer(data, &view)
        self._state = _utf8_run(<const uint8_t*>view.buf, <size_t>view.len, self._state)
        PyBuffer_Release(&view)
        if final and self._state != U_ACCEPT:
            self._state = U_REJECT
        return self._state != U_REJECT

    def reset(self):
        """Forget everything fed so far: start a new message."""
        self._state = U_ACCEPT


def build_frame(opcode, payload, fin=True, mask=None, rsv=0):
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
    cdef Py_buffer view
    cdef uint8_t m[4]
    cdef bint masked = mask is not None
    cdef bytes out
    cdef uint8_t* p
    cdef uint64_t n
    cdef Py_ssize_t header
    cdef int k
    cdef int first = (0x80 if fin else 0) | (rsv << 4) | opcode
    _get_buffer(payload, &view)
    try:
        if masked:
            _read_mask(mask, m)
        n = <uint64_t>view.len
        header = 2 if n < 126 else (4 if n < 65536 else 10)
        if masked:
            header += 4
        out = _new_bytes(header + view.len)
        p = <uint8_t*>PyBytes_AS_STRING(out)
        p[0] = <uint8_t>first
        if n < 126:
            p[1] = <uint8_t>n
        elif n < 65536:
            p[1] = 126
            p[2] = <uint8_t>(n >> 8)
            p[3] = <uint8_t>n
        else:
            p[1] = 127
            for k in range(8):
                p[2 + k] = <uint8_t>(n >> (56 - 8 * k))
        if not masked:
            memcpy(p + header, view.buf, view.len)
        else:
            p[1] |= 0x80
            memcpy(p + header - 4, m, 4)
            _xor_into(<const uint8_t*>view.buf, p + header, <size_t>n, _mask64(m, 0))
    finally:
        PyBuffer_Release(&view)
    return out


def build_close(code=None, str reason=""):
    """Encode a server close frame; ``code=None`` sends an empty payload.

    The code must be one a peer may send (1000-1003, 1007-1014, 3000-4999).  A reason longer
    than fits a control frame (123 bytes of UTF-8) is cut at a character boundary.
    """
    if code is None:
        if reason:
            raise ValueError("a close reason needs a close code")
        return b"\x88\x00"
    code = operator.index(code)
    if not (1000 <= code <= 4999 and _close_code_ok(code)):
        raise ValueError(f"close code {code} may not be sent")
    cdef bytes encoded = reason.encode("utf-8")
    if len(encoded) > C_MAX_CLOSE_REASON:
        encoded = encoded[:C_MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
    cdef int c = code
    return bytes((0x88, 2 + len(encoded), c >> 8, c & 0xFF)) + encoded


def close_code_and_reason(payload):
    """Decode a close payload that :class:`FrameParser` has validated: ``(None, "")`` if empty."""
    cdef Py_buffer view
    cdef const uint8_t* p
    _get_buffer(payload, &view)
    try:
        if view.len == 0:
            return None, ""
        if view.len < 2:
            raise ValueError("close payload of 1 byte")
        p = <const uint8_t*>view.buf
        return (p[0] << 8) | p[1], (<char*>view.buf)[2:view.len].decode("utf-8", "strict")
    finally:
        PyBuffer_Release(&view)


# --- Parser ----------------------------------------------------------------------------------

@cython.auto_pickle(False)
cdef class FrameParser:
    """Parses the frames a client sends to the server (RFC 6455; with ``compression`` on,
    permessage-deflate's RSV1 too).

    Sans-I/O: :meth:`feed` the bytes read from the socket, then call :meth:`next_message`
    until it returns None.  Data frame payloads are unmasked (and text validated) as their
    bytes arrive rather than once the whole frame is in, so invalid UTF-8 fails fast and a
    large frame is not buffered twice.
    """

    # Received bytes not yet parsed: _buf[_start:_end], malloc'd so that appending and
    # consuming are pointer arithmetic, not Python objects.
    cdef uint8_t* _buf
    cdef size_t _start, _end, _cap
    cdef uint64_t _max
    cdef bint _require_mask
    cdef bint _compression
    cdef object _error  # (code, reason) once dead
    # The frame whose payload is being read (valid while _f_in).
    cdef bint _f_in, _f_fin
    cdef int _f_opcode
    cdef uint64_t _f_len      # payload bytes still to read
    cdef uint8_t _f_mask[4]
    cdef size_t _f_phase      # payload bytes read so far, mod 4
    # The data message being assembled when it spans frames or reads (_m_opcode 0: none).
    cdef int _m_opcode
    cdef bint _m_compressed   # RSV1 on its first frame: bytes to inflate, not validate
    cdef uint64_t _m_size
    cdef int _m_utf8
    cdef uint8_t* _mbuf
    cdef size_t _mcap

    def __cinit__(self):
        self._buf = NULL
        self._mbuf = NULL

    def __init__(self, max_message_size=1048576, require_mask=True, compression=False):
        if max_message_size < 0:
            raise ValueError("max_message_size must be >= 0")
        self._max = min(int(max_message_size), _MAX_LENGTH)
        self._require_mask = bool(require_mask)
        self._compression = bool(compression)
        self._m_compressed = False
        self._start = self._end = self._cap = 0
        self._error = None
        self._f_in = False
        self._m_opcode = 0
        self._m_size = 0
        self._m_utf8 = U_ACCEPT

    def __dealloc__(self):
        free(self._buf)
        free(self._mbuf)

    @property
    def max_message_size(self):
        """Largest message (all fragments together) accepted, in bytes."""
        return self._max

    @property
    def pending(self):
        """Bytes held for what is not a whole message yet: the unfinished message's payload
        so far, and received bytes not parsed (a partial header or control frame)."""
        return (self._m_size if self._m_opcode else 0) + (self._end - self._start)

    @property
    def require_mask(self):
        """Whether unmasked frames are a protocol error (they are for a server)."""
        return self._require_mask

    @property
    def compression(self):
        """Whether RSV1 marks a compressed message (permessage-deflate was negotiated)."""
        return self._compression

    def feed(self, data):
        """Append bytes received from the client; *data* is copied, so its buffer can be reused."""
        if self._error is not None:
            raise FrameError(*self._error)
        cdef Py_buffer view
        _get_buffer(data, &view)
        try:
            self._append(<const uint8_t*>view.buf, <size_t>view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _append(self, const uint8_t* data, size_t n) except -1:
        cdef size_t live, cap
        cdef uint8_t* grown
        if n == 0:
            return 0
        if self._end + n > self._cap:
            live = self._end - self._start
            if self._start:
                memmove(self._buf, self._buf + self._start, live)
                self._start = 0
                self._end = live
            if live + n > self._cap:
                cap = self._cap * 2
                if cap < live + n:
                    cap = live + n
                if cap < _MIN_CAPACITY:
                    cap = _MIN_CAPACITY
                grown = <uint8_t*>realloc(self._buf, cap)
                if grown == NULL:
                    raise MemoryError()
                self._buf = grown
                self._cap = cap
        memcpy(self._buf + self._end, data, n)
        self._end += n
        return 0

    cdef _fail(self, int code, reason):
        self._error = (code, reason)
        return FrameError(code, reason)

    cdef int _need_more(self) noexcept:
        # What is left is at most a partial header or a partial control frame (data payloads
        # are consumed as they arrive), so moving it to the front is cheap.
        cdef size_t live = self._end - self._start
        if live == 0:
            # Nothing pending: an idle connection holds no receive buffer at all (a server
            # holds thousands of idle ones; one malloc per read is cheaper than that memory).
            free(self._buf)
            self._buf = NULL
            self._cap = 0
        elif self._start and live:
            memmove(self._buf, self._buf + self._start, live)
        self._start = 0
        self._end = live
        return 0

    cdef int _parse_header(self) except -1:
        """Consume one frame header if it is all there; 0 when more bytes are needed.

        Checks run in the same order as the pure twin's, each as soon as its bytes are in.
        """
        cdef size_t avail = self._end - self._start
        if avail < 2:
            return 0
        cdef const uint8_t* p = self._buf + self._start
        cdef uint8_t b0 = p[0]
        cdef uint8_t b1 = p[1]
        cdef int opcode = b0 & 0x0F
        cdef bint fin = (b0 & 0x80) != 0
        cdef bint masked = (b1 & 0x80) != 0
        cdef uint64_t length = b1 & 0x7F
        cdef size_t size = 2
        cdef int k
        cdef bint compressed = False
        if b0 & 0x70:
            # RSV1 alone, with permessage-deflate, on the first frame of a data message.
            if (b0 & 0x70) != 0x40 or not self._compression:
                raise self._fail(C_PROTOCOL_ERROR, _R.RSV)
            if opcode != C_OP_TEXT and opcode != C_OP_BINARY:
                raise self._fail(C_PROTOCOL_ERROR, _R.RSV1_NOT_FIRST)
            compressed = True
        if opcode >= C_OP_CLOSE:
            if opcode > C_OP_PONG:
                raise self._fail(C_PROTOCOL_ERROR, _R.OPCODE)
            if not fin:
                raise self._fail(C_PROTOCOL_ERROR, _R.CONTROL_FRAGMENTED)
            if length > C_MAX_CONTROL:
                raise self._fail(C_PROTOCOL_ERROR, _R.CONTROL_TOO_LONG)
        elif opcode > C_OP_BINARY:
            raise self._fail(C_PROTOCOL_ERROR, _R.OPCODE)
        elif opcode == C_OP_CONT:
            if self._m_opcode == C_OP_CONT:
                raise self._fail(C_PROTOCOL_ERROR, _R.NO_MESSAGE)
        elif self._m_opcode != 0:
            raise self._fail(C_PROTOCOL_ERROR, _R.MESSAGE_IN_PROGRESS)
        if not masked and self._require_mask:
            raise self._fail(C_PROTOCOL_ERROR, _R.UNMASKED)
        if length == 126:
            size = 4
            if avail < size:
                return 0
            length = (<uint64_t>p[2] << 8) | p[3]
            if length < 126:
                raise self._fail(C_PROTOCOL_ERROR, _R.LENGTH_NOT_MINIMAL)
        elif length == 127:
            size = 10
            if avail < size:
                return 0
            length = 0
            for k in range(8):
                length = (length << 8) | p[2 + k]
            if length >> 63:
                raise self._fail(C_PROTOCOL_ERROR, _R.LENGTH)
            if length < 65536:
                raise self._fail(C_PROTOCOL_ERROR, _R.LENGTH_NOT_MINIMAL)
        if opcode < C_OP_CLOSE and length > self._max - self._m_size:
            raise self._fail(C_MESSAGE_TOO_BIG, _R.TOO_BIG)
        if masked:
            if avail < size + 4:
                return 0
            memcpy(self._f_mask, p + size, 4)
            size += 4
        else:
            memset(self._f_mask, 0, 4)
        self._start += size
        self._f_in = True
        self._f_fin = fin
        self._f_opcode = opcode
        self._f_len = length
        self._f_phase = 0
        if opcode == C_OP_TEXT or opcode == C_OP_BINARY:
            self._m_opcode = opcode
            self._m_compressed = compressed
            self._m_size = 0
            self._m_utf8 = U_ACCEPT
        return 1

    cdef int _reserve(self, uint64_t extra) except -1:
        """Room in the message buffer for *extra* more bytes (bounded by max_message_size)."""
        cdef uint64_t need = self._m_size + extra
        cdef uint64_t cap
        cdef uint8_t* grown
        if need <= self._mcap:
            return 0
        cap = <uint64_t>self._mcap * 2
        if cap < need:
            cap = need
        # Never more than the frame can still bring: a client cannot make us reserve memory
        # for bytes it has only announced.
        if cap > self._m_size + self._f_len:
            cap = self._m_size + self._f_len
        grown = <uint8_t*>realloc(self._mbuf, <size_t>cap)
        if grown == NULL:
            raise MemoryError()
        self._mbuf = grown
        self._mcap = <size_t>cap
        return 0

    def next_message(self):
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
        cdef size_t avail, take
        cdef uint64_t remaining
        cdef int opcode, state
        cdef bint text
        cdef bytes payload
        cdef uint64_t m64
        while True:
            if not self._f_in and not self._parse_header():
                self._need_more()
                return None
            avail = self._end - self._start
            opcode = self._f_opcode
            remaining = self._f_len
            if opcode >= C_OP_CLOSE:
                if avail < remaining:
                    self._need_more()
                    return None
                payload = _new_bytes(<Py_ssize_t>remaining)
                _xor_into(self._buf + self._start, <uint8_t*>PyBytes_AS_STRING(payload),
                          <size_t>remaining, _mask64(self._f_mask, 0))
                self._start += <size_t>remaining
                self._f_in = False
                if opcode == C_OP_CLOSE:
                    self._check_close(payload)
                return opcode, payload
            # A compressed text message is validated once inflated, by whoever inflates it.
            text = self._m_opcode == C_OP_TEXT and not self._m_compressed
            m64 = _mask64(self._f_mask, self._f_phase)
            if self._f_fin and self._m_size == 0 and avail >= remaining:
                # The whole message is one frame that is all here: unmask (and validate)
                # straight into the bytes object handed out, the only copy made.
                payload = _new_bytes(<Py_ssize_t>remaining)
                if text:
                    state = _xor_validate_into(self._buf + self._start,
                                               <uint8_t*>PyBytes_AS_STRING(payload),
                                               <size_t>remaining, m64, U_ACCEPT)
                    if state != U_ACCEPT:
                        raise self._fail(C_INVALID_PAYLOAD, _R.TEXT_UTF8)
                else:
                    _xor_into(self._buf + self._start, <uint8_t*>PyBytes_AS_STRING(payload),
                              <size_t>remaining, m64)
                self._start += <size_t>remaining
                self._f_in = False
                opcode = self._m_opcode
                self._m_opcode = 0
                if self._m_compressed:
                    opcode |= C_COMPRESSED
                return opcode, payload
            take = avail if avail < remaining else <size_t>remaining
            if take:
                self._reserve(take)
                if text:
                    self._m_utf8 = _xor_validate_into(self._buf + self._start,
                                                      self._mbuf + self._m_size, take, m64,
                                                      self._m_utf8)
                    if self._m_utf8 == U_REJECT:
                        raise self._fail(C_INVALID_PAYLOAD, _R.TEXT_UTF8)
                else:
                    _xor_into(self._buf + self._start, self._mbuf + self._m_size, take, m64)
                self._m_size += take
                self._start += take
                self._f_phase = (self._f_phase + take) & 3
                remaining -= take
                self._f_len = remaining
            if remaining:
                self._need_more()
                return None
            self._f_in = False
            if self._f_fin:
                if text and self._m_utf8 != U_ACCEPT:
                    raise self._fail(C_INVALID_PAYLOAD, _R.TEXT_UTF8)
                payload = PyBytes_FromStringAndSize(<char*>self._mbuf, <Py_ssize_t>self._m_size)
                opcode = self._m_opcode
                if self._m_compressed:
                    opcode |= C_COMPRESSED
                self._m_opcode = 0
                self._m_size = 0
                if self._mcap > _KEEP_CAPACITY:
                    free(self._mbuf)
                    self._mbuf = NULL
                    self._mcap = 0
                return opcode, payload

    cdef int _check_close(self, bytes payload) except -1:
        cdef Py_ssize_t n = len(payload)
        cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(payload)
        if n == 1:
            raise self._fail(C_PROTOCOL_ERROR, _R.CLOSE_1)
        if n:
            if not _close_code_ok((p[0] << 8) | p[1]):
                raise self._fail(C_PROTOCOL_ERROR, _R.CLOSE_CODE)
            if _utf8_run(p + 2, <size_t>(n - 2), U_ACCEPT) != U_ACCEPT:
                raise self._fail(C_INVALID_PAYLOAD, _R.CLOSE_UTF8)
        return 0
