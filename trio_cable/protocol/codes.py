"""The protocol's numbers and words, in one place: WebSocket opcodes and close codes, the
reasons the frame kernels give for refusing a frame, and Action Cable's disconnect reasons.

Both frame kernels (the compiled ``_speedups`` and its pure twin ``_speedups_py``) take their
reason strings and close codes from here, so they cannot drift apart; the compiled module
mirrors the numbers it needs as C constants and checks them against this module when it is
imported.  This module imports nothing of trio_cable, so anything may import it.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = [
    "CLOSE_CODE_RANGES",
    "COMPRESSED",
    "MAX_CLOSE_REASON",
    "MAX_CONTROL_PAYLOAD",
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "CloseCode",
    "DisconnectReason",
    "FrameRefusal",
]

# Opcodes (RFC 6455 section 5.2).  Plain ints, not an enum: the read path compares them for
# every frame, and a module-level int is the cheapest thing to compare with.
OP_CONT = 0
OP_TEXT = 1
OP_BINARY = 2
OP_CLOSE = 8
OP_PING = 9
OP_PONG = 10

#: Added to the opcode a frame parser returns for a data message the client sent compressed
#: (permessage-deflate sets RSV1 on its first frame): ``OP_TEXT | COMPRESSED``.  Opcodes are
#: four bits, so the flag never collides with one, and an uncompressed message (the hot
#: path) still compares equal to plain ``OP_TEXT`` / ``OP_BINARY``.
COMPRESSED = 0x40

#: A control frame's payload is at most 125 bytes ...
MAX_CONTROL_PAYLOAD = 125
#: ... so a close reason (after the 2-byte code) at most 123.
MAX_CLOSE_REASON = 123


class CloseCode(IntEnum):
    """WebSocket close codes the server sends (RFC 6455 section 7.4.1)."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the server restarts (drain): come back
    PROTOCOL_ERROR = 1002  # a frame broke RFC 6455
    INVALID_PAYLOAD = 1007  # bad UTF-8 in a text message or close reason
    POLICY_VIOLATION = 1008  # bad Action Cable commands, too slow
    MESSAGE_TOO_BIG = 1009
    TRY_AGAIN_LATER = 1013  # the server is over a budget: come back later


#: Close codes a peer may put on the wire: RFC 6455 section 7.4 plus the IANA registry, which
#: added 1012 (service restart), 1013 (try again later) and 1014 (bad gateway).  1004 is
#: reserved, 1005/1006/1015 are for local reporting only, the rest of 1000-2999 unassigned.
CLOSE_CODE_RANGES: tuple[tuple[int, int], ...] = ((1000, 1003), (1007, 1014), (3000, 4999))


class FrameRefusal(StrEnum):
    """Why a frame kernel refused a client's bytes (the close reason and the log's words)."""

    RSV = "reserved bits set"
    # permessage-deflate marks a message's first frame only (RFC 7692 6.1).
    RSV1_NOT_FIRST = "RSV1 set on a continuation or control frame"
    OPCODE = "reserved opcode"
    CONTROL_FRAGMENTED = "fragmented control frame"
    CONTROL_TOO_LONG = "control frame payload too long"
    NO_MESSAGE = "continuation frame without a message in progress"
    MESSAGE_IN_PROGRESS = "new message before the previous one was finished"
    UNMASKED = "client frame not masked"
    LENGTH = "frame length has its most significant bit set"
    # RFC 6455 5.2: "the minimal number of bytes MUST be used to encode the length".  Browsers
    # and every client library do; wsproto refuses such frames too.
    LENGTH_NOT_MINIMAL = "frame length not minimally encoded"
    TOO_BIG = "message too big"
    TEXT_UTF8 = "invalid UTF-8 in text message"
    CLOSE_1 = "close frame payload of 1 byte"
    CLOSE_CODE = "invalid close code"
    CLOSE_UTF8 = "invalid UTF-8 in close reason"


class DisconnectReason(StrEnum):
    """The ``reason`` of an Action Cable ``disconnect`` message (PROTOCOL.md)."""

    SERVER_RESTART = "server_restart"  # a drain: reconnect, after the advice
    UNAUTHORIZED = "unauthorized"  # the connect callback or JWT refused
    TOKEN_EXPIRED = "token_expired"  # the JWT's exp passed: refresh it, then reconnect
    REMOTE = "remote"  # the application disconnected this identity
    NO_PONG = "no_pong"  # an ext client stopped answering pings
    TOO_SLOW = "too_slow"  # the send queue overflowed
    INVALID_REQUEST = "invalid_request"  # a frame that is not the protocol
