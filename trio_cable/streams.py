"""Signed stream names, compatible with Rails ``ActiveSupport::MessageVerifier``.

Turbo Streams and AnyCable's ``$pubsub`` channel let a client subscribe to a stream the application
pre-authorized by signing its name. The format is MessageVerifier's with the SHA256 digest and the
JSON serializer (what ``turbo-rails`` and ``anycable-rails`` use)::

    signed = base64_std(json(stream_name)) + "--" + hex(HMAC_SHA256(secret, <that base64 text>))

so a name signed by a Rails app verifies here and vice versa, given the same secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json

__all__ = ["sign_stream", "verify_stream"]

_SEPARATOR = "--"


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)


def _digest(key: bytes, data: str) -> str:
    return hmac.new(key, data.encode("ascii"), hashlib.sha256).hexdigest()


def sign_stream(secret: str | bytes, stream: str) -> str:
    """Sign ``stream`` the way Rails' ``MessageVerifier`` (SHA256, JSON serializer) does.

    Raises ``ValueError`` for an empty secret (anyone could forge such signatures) and
    ``TypeError`` if ``stream`` is not a string.
    """
    key = _key(secret)
    if not key:
        raise ValueError("an empty secret cannot sign streams")
    if not isinstance(stream, str):
        raise TypeError(f"stream name must be a str, not {type(stream).__name__}")
    # ensure_ascii=False matches Ruby's JSON.generate, which writes non-ASCII characters as UTF-8.
    serialized = json.dumps(stream, ensure_ascii=False).encode("utf-8")
    data = base64.b64encode(serialized).decode("ascii")
    return data + _SEPARATOR + _digest(key, data)


def verify_stream(secret: str | bytes, signed: str) -> str | None:
    """The stream name signed in ``signed``, or ``None`` if it does not verify.

    Never raises: any malformed input, a wrong signature, an empty secret, or a payload that is not
    a JSON string all give ``None``. The signature is checked (in constant time) before the payload
    is decoded, so nothing unauthenticated reaches the decoders.
    """
    key = _key(secret) if isinstance(secret, (str, bytes)) else b""
    if not key or not isinstance(signed, str):
        return None
    parts = signed.split(_SEPARATOR)
    if len(parts) != 2:
        return None
    data, digest = parts
    # hmac.compare_digest on str accepts ASCII only (TypeError otherwise): check that first.
    if not data or not digest or not data.isascii() or not digest.isascii():
        return None
    if not hmac.compare_digest(_digest(key, data), digest):
        return None
    try:
        stream = json.loads(base64.b64decode(data, validate=True).decode("utf-8"))
    except (binascii.Error, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    return stream if isinstance(stream, str) else None
