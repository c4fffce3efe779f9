"""permessage-deflate (RFC 7692), sans-I/O: the handshake's offer and answer, and the
compression of messages, shaped for a broadcast server.

The usual cost of WebSocket compression is a zlib context per connection in each direction
(about 300 KiB at the default settings) and one compression per recipient.  A broadcast
server needs neither:

- The server always answers ``server_no_context_takeover``: every message it sends is
  compressed on its own, so a broadcast compressed once is the same bytes for every
  recipient that negotiated the same window size.  One compressor per (level, window) serves
  the whole process: after each message a full flush resets its dictionary, so no message
  refers back to another (this is what makes the output context-free; a fresh compressor per
  message would cost an allocation of a few hundred KiB each time).
- The server always asks ``client_no_context_takeover`` (RFC 7692 7.1.1.2 lets a server
  include it whatever the offer said): every client message is inflated on its own, with a
  decompressor made for that message, so an idle connection keeps no zlib state at all.

Inflating is bounded: a message may not inflate past the connection's maximum message size
(a zip bomb is refused with 1009 after at most that many bytes of work, and that client
alone is closed).

This module imports no trio.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from trio_cable.protocol.codes import CloseCode

__all__ = [
    "EXTENSION",
    "DeflateParams",
    "DeflateSettings",
    "InflateError",
    "compressor",
    "inflate",
    "negotiate_deflate",
    "parse_offers",
]

#: The extension's token in ``Sec-WebSocket-Extensions``.
EXTENSION = "permessage-deflate"

# The four bytes a sync flush ends with; RFC 7692 7.2.1 removes them from the frame and the
# receiver puts them back before inflating.
_TAIL = b"\x00\x00\xff\xff"

# zlib cannot deflate with a 256-byte window (asked for 8, it uses 9), so an offer that
# limits the server's window to 8 bits cannot be honoured and is declined.
_MIN_SERVER_WINDOW_BITS = 9
_MAX_WINDOW_BITS = 15


@dataclass(frozen=True, slots=True)
class DeflateSettings:
    """The server's compression settings (``--compression`` and friends)."""

    #: zlib level 1..9.  A broadcast is compressed once for all its recipients, so a higher
    #: level costs little there; messages to one client (welcome, confirmations, echoes) are
    #: compressed each time, which is why the default is the fastest level.
    level: int = 1
    #: Messages shorter than this (bytes) go out uncompressed: deflating a 100-byte ping or
    #: confirmation costs more CPU than the bytes it could save.
    threshold: int = 1024


@dataclass(frozen=True, slots=True)
class DeflateParams:
    """What one connection negotiated: how the server compresses for it."""

    #: The window the server compresses with (the client's ``server_max_window_bits``, else 15).
    window_bits: int = _MAX_WINDOW_BITS
    level: int = 1
    threshold: int = 1024

    def response(self) -> str:
        """The ``Sec-WebSocket-Extensions`` value of the 101 answer."""
        parts = [EXTENSION, "server_no_context_takeover", "client_no_context_takeover"]
        if self.window_bits != _MAX_WINDOW_BITS:
            parts.append(f"server_max_window_bits={self.window_bits}")
        return "; ".join(parts)


class InflateError(Exception):
    """A client's compressed message was refused: ``code`` is the close code (1009 when it
    inflates past the limit, 1007 when it is not valid DEFLATE data)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = int(code)
        self.reason = str(reason)


def parse_offers(header: str) -> list[dict[str, str | None]]:
    """The permessage-deflate offers of a ``Sec-WebSocket-Extensions`` value, in order.

    Each offer is its parameters, name -> value (None for a parameter without one); values
    lose their optional quotes.  Offers of other extensions are left out.  An offer that
    repeats a parameter is malformed and is returned with the key ``""`` so that
    :func:`negotiate_deflate` declines it.
    """
    offers: list[dict[str, str | None]] = []
    for item in header.split(","):
        fields = [f.strip() for f in item.split(";")]
        if fields[0].lower() != EXTENSION:
            continue
        params: dict[str, str | None] = {}
        for field in fields[1:]:
            if not field:
                continue
            name, eq, value = field.partition("=")
            name = name.strip().lower()
            if name in params:
                params[""] = None  # a repeated parameter: RFC 7692 5 says decline
            params[name] = value.strip().strip('"') if eq else None
        offers.append(params)
    return offers


def _window_bits(value: str | None, lowest: int) -> int | None:
    if value is None or not value.isdigit() or len(value) > 2:
        return None
    bits = int(value)
    return bits if lowest <= bits <= _MAX_WINDOW_BITS else None


def _accept(params: dict[str, str | None], settings: DeflateSettings) -> DeflateParams | None:
    window = _MAX_WINDOW_BITS
    for name, value in params.items():
        if name in ("server_no_context_takeover", "client_no_context_takeover"):
            if value is not None:
                return None
        elif name == "server_max_window_bits":
            bits = _window_bits(value, _MIN_SERVER_WINDOW_BITS)
            if bits is None:
                return None
            window = bits
        elif name == "client_max_window_bits":
            # The client may limit its own window; any window inflates with 15 bits, so
            # there is nothing to answer.  A value must be a valid one, though.
            if value is not None and _window_bits(value, 8) is None:
                return None
        else:
            return None  # an unknown parameter (or a repeated one): decline this offer
    return DeflateParams(window, settings.level, settings.threshold)


def negotiate_deflate(header: str, settings: DeflateSettings) -> DeflateParams | None:
    """The first offer in *header* the server can accept, or None: then the connection
    goes uncompressed (declining is always allowed; the client may not insist)."""
    for params in parse_offers(header):
        accepted = _accept(params, settings)
        if accepted is not None:
            return accepted
    return None


class _Compressor:
    """One zlib stream for every message of one (level, window): each message is followed
    by a full flush, after which nothing refers back to it (see the module docstring)."""

    __slots__ = ("_flush", "_zlib")

    def __init__(self, level: int, window_bits: int) -> None:
        self._zlib = zlib.compressobj(level, zlib.DEFLATED, -window_bits)
        self._flush = zlib.Z_FULL_FLUSH

    def compress(self, payload: bytes) -> bytes:
        """The payload deflated for one frame (without the 4-byte tail RFC 7692 drops)."""
        z = self._zlib
        data = z.compress(payload) + z.flush(self._flush)
        return data[:-4]


_COMPRESSORS: dict[tuple[int, int], _Compressor] = {}


def compressor(params: DeflateParams) -> _Compressor:
    """The process's compressor for *params*' level and window."""
    key = (params.level, params.window_bits)
    found = _COMPRESSORS.get(key)
    if found is None:
        found = _COMPRESSORS[key] = _Compressor(*key)
    return found


def inflate(data: bytes, max_size: int) -> bytes:
    """Inflate one client message, at most *max_size* bytes of it.

    A decompressor is made for each message (the server asked ``client_no_context_takeover``,
    so no message refers to an earlier one); its output is capped, so a message that
    inflates past *max_size* costs at most that much work before it is refused.
    """
    d = zlib.decompressobj(-_MAX_WINDOW_BITS)
    try:
        out = d.decompress(data, max_size + 1)
        if len(out) <= max_size and not d.unconsumed_tail:
            out += d.decompress(_TAIL, max_size + 1 - len(out))
    except zlib.error:
        raise InflateError(CloseCode.INVALID_PAYLOAD, "invalid compressed data") from None
    if len(out) > max_size or d.unconsumed_tail:
        raise InflateError(CloseCode.MESSAGE_TOO_BIG, "message too big once inflated")
    return out
