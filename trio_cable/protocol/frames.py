"""WebSocket framing (RFC 6455), sans-I/O: parse client frames, build server frames.

The work is done by byte kernels: the compiled ``trio_cable._speedups`` when it was built
and ``TRIO_CABLE_NO_EXTENSIONS`` is not set, else its pure-Python twin
``trio_cable._speedups_py``.  Both have the same API and give the same bytes; ``SPEEDUPS``
says which one is in use and ``SPEEDUPS_STATUS`` why: ``"compiled"``, ``"disabled by
TRIO_CABLE_NO_EXTENSIONS=1"`` or ``"not compiled (<the ImportError>)"``.  This module
imports no trio.

Typical server loop::

    parser = FrameParser(max_message_size)
    parser.feed(received)
    while (message := parser.next_message()) is not None:
        opcode, payload = message
        ...
    # on FrameError as exc: send build_close(exc.code, exc.reason), then hang up
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_PONG",
    "OP_TEXT",
    "SPEEDUPS",
    "SPEEDUPS_STATUS",
    "FrameError",
    "FrameParser",
    "Utf8Validator",
    "build_close",
    "build_frame",
    "close_code_and_reason",
    "unmask",
    "validate_utf8",
]


def _load_kernels() -> tuple[ModuleType, bool, str]:
    """The compiled kernels if allowed and importable, else the pure twin; and why."""
    disabled = os.environ.get("TRIO_CABLE_NO_EXTENSIONS")
    if disabled:
        status = f"disabled by TRIO_CABLE_NO_EXTENSIONS={disabled}"
    else:
        try:
            from trio_cable import _speedups
        except ImportError as exc:
            status = f"not compiled ({exc})"
        else:
            return _speedups, True, "compiled"
    from trio_cable import _speedups_py

    return _speedups_py, False, status


_kernels, SPEEDUPS, SPEEDUPS_STATUS = _load_kernels()

if TYPE_CHECKING:
    # Both modules share one API; the pure one carries the annotations.
    from trio_cable._speedups_py import (
        OP_BINARY,
        OP_CLOSE,
        OP_CONT,
        OP_PING,
        OP_PONG,
        OP_TEXT,
        FrameError,
        FrameParser,
        Utf8Validator,
        build_close,
        build_frame,
        close_code_and_reason,
        unmask,
        validate_utf8,
    )
else:
    OP_CONT = _kernels.OP_CONT
    OP_TEXT = _kernels.OP_TEXT
    OP_BINARY = _kernels.OP_BINARY
    OP_CLOSE = _kernels.OP_CLOSE
    OP_PING = _kernels.OP_PING
    OP_PONG = _kernels.OP_PONG
    FrameError = _kernels.FrameError
    FrameParser = _kernels.FrameParser
    Utf8Validator = _kernels.Utf8Validator
    build_close = _kernels.build_close
    build_frame = _kernels.build_frame
    close_code_and_reason = _kernels.close_code_and_reason
    unmask = _kernels.unmask
    validate_utf8 = _kernels.validate_utf8
