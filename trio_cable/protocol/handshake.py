"""The HTTP side of the WebSocket opening handshake (RFC 6455 section 4), sans-I/O.

h11 parses and serializes HTTP; wsproto computes the accept token.  This module decides what
a request is (a WebSocket upgrade, or a plain HTTP request) and what the answer must be; the
server does the socket work.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import h11
from wsproto.utilities import generate_accept_token

from trio_cable.protocol.cable import UNSUPPORTED, Subprotocol, select_subprotocol
from trio_cable.protocol.deflate import DeflateParams, DeflateSettings, negotiate_deflate


@dataclass(slots=True)
class Request:
    """An HTTP request head, with headers lower-cased.  Repeated headers are joined by ", "
    (which is how RFC 9110 says lists combine)."""

    method: str
    target: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    http_version: str = "1.1"
    remote: str = ""

    @property
    def is_websocket_upgrade(self) -> bool:
        """True when the client asks to switch to WebSocket (even if it asks badly)."""
        upgrade = self.headers.get("upgrade", "").lower()
        return "websocket" in [v.strip() for v in upgrade.split(",")]

    @property
    def subprotocols(self) -> list[str]:
        """Offered ``Sec-WebSocket-Protocol`` values, in the client's order."""
        raw = self.headers.get("sec-websocket-protocol", "")
        return [p.strip() for p in raw.split(",") if p.strip()]


def request_from_h11(event: h11.Request, remote: str = "") -> Request:
    """Convert h11's event into a :class:`Request`."""
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("latin-1")
    parts = urlsplit(target)
    return Request(
        method=event.method.decode("ascii", "replace"),
        target=target,
        path=parts.path or "/",
        query=dict(parse_qsl(parts.query, keep_blank_values=True)),
        headers=headers,
        http_version=event.http_version.decode("ascii", "replace"),
        remote=remote,
    )


@dataclass
class Refusal:
    """An HTTP error answer to a request that will not become a WebSocket."""

    status: int
    message: str
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Acceptance:
    """The parts of a ``101 Switching Protocols`` answer."""

    subprotocol: Subprotocol | None
    selected: str | None  # the value echoed in Sec-WebSocket-Protocol
    headers: list[tuple[str, str]]
    #: permessage-deflate as negotiated, or None: the connection goes uncompressed.
    deflate: DeflateParams | None = None


def origin_allowed(origin: str | None, allowed: Sequence[str]) -> bool:
    """Check the ``Origin`` header against an allow-list.

    An empty list allows everything.  Entries match the origin's host (``example.com``), or
    the full origin (``https://example.com``); a leading ``*`` matches any prefix
    (``*.example.com``).  A request with no Origin (not a browser) passes only with the
    empty list, because browsers always send it and cross-site WebSocket hijacking is a
    browser attack.
    """
    if not allowed:
        return True
    if not origin:
        return False
    origin = origin.strip().lower()
    host = urlsplit(origin).netloc or origin
    for entry in allowed:
        entry = entry.strip().lower()
        if entry == "*":
            return True
        for candidate in (origin, host):
            if entry.startswith("*"):
                if candidate.endswith(entry[1:]):
                    return True
            elif candidate == entry:
                return True
    return False


def negotiate(
    request: Request,
    *,
    allowed_origins: Sequence[str] = (),
    require_subprotocol: bool = True,
    compression: DeflateSettings | None = None,
) -> Acceptance | Refusal:
    """Decide whether *request* (already known to target a WebSocket path) is accepted.

    ``require_subprotocol`` is False only for the raw echo endpoint used to test framing.
    With *compression* (None: the server does not compress), a permessage-deflate offer
    the server can honour is accepted.
    """
    if request.method != "GET":
        return Refusal(405, "WebSocket upgrade needs GET", [("allow", "GET")])
    if request.http_version != "1.1":
        return Refusal(505, "WebSocket upgrade needs HTTP/1.1")
    connection = [v.strip().lower() for v in request.headers.get("connection", "").split(",")]
    if "upgrade" not in connection or not request.is_websocket_upgrade:
        return Refusal(426, "this endpoint speaks WebSocket only", [("upgrade", "websocket")])
    if request.headers.get("sec-websocket-version", "").strip() != "13":
        return Refusal(
            426, "unsupported WebSocket version (need 13)", [("sec-websocket-version", "13")]
        )
    key = request.headers.get("sec-websocket-key", "").strip()
    if not _valid_key(key):
        return Refusal(400, "missing or malformed Sec-WebSocket-Key")
    if not origin_allowed(request.headers.get("origin"), allowed_origins):
        return Refusal(403, "origin not allowed")

    offered = request.subprotocols
    subprotocol = select_subprotocol(offered)
    selected: str | None = subprotocol.name if subprotocol else None
    if subprotocol is None and require_subprotocol:
        if UNSUPPORTED in offered:
            selected = UNSUPPORTED
        else:
            supported = (
                "actioncable-v1-json, actioncable-v1-ext-json, "
                "actioncable-v1-msgpack, actioncable-v1-ext-msgpack"
            )
            return Refusal(400, f"no supported subprotocol offered (supported: {supported})")
    headers = [
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-accept", generate_accept_token(key.encode("ascii")).decode("ascii")),
    ]
    if selected:
        headers.append(("sec-websocket-protocol", selected))
    deflate = None
    offers = request.headers.get("sec-websocket-extensions")
    if compression is not None and offers:
        deflate = negotiate_deflate(offers, compression)
        if deflate is not None:
            headers.append(("sec-websocket-extensions", deflate.response()))
    return Acceptance(subprotocol, selected, headers, deflate)


def _valid_key(key: str) -> bool:
    # RFC 6455 4.2.1: a base64-encoded 16-byte value, i.e. 24 characters ending in "==".
    if len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False
