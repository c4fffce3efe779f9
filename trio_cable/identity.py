"""JWT identification, compatible with AnyCable's ``jwt`` identifier.

An application (e.g. ``anycable-rails``'s ``AnyCable::JWT.encode``) issues a token whose claim
``ext`` is a JSON-encoded *string* of the connection identifiers (``{"current_user": "gid://..."}``).
A connection presenting a valid token is welcomed without calling the application's connect
callback; its identifiers come from the token.

Semantics (AnyCable's):

* HMAC only (HS256/HS384/HS512). ``none`` and asymmetric algorithms are refused even if the header
  asks for them: the verifier only ever uses the algorithms it was configured with.
* ``exp`` is enforced when present, but not required (tokens without ``exp`` never expire; pass
  ``require_exp=True`` to refuse them). ``nbf`` and ``iat`` are checked when present. A token with
  an ``aud`` claim is refused, since no audience is configured.
* An expired token gives the disconnect reason ``token_expired`` (the client may fetch a new token
  and reconnect); anything else wrong gives ``unauthorized``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jwt

from .protocol.cable import JSON, InvalidCommand, token_from_subprotocols

__all__ = [
    "HMAC_ALGORITHMS",
    "JWTIdentifier",
    "TokenError",
    "issue_token",
    "token_from_request",
]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")

# The PyJWT errors a bad token can produce; TypeError/ValueError guard against odd inputs (a claim
# of an unexpected type) reaching code that does not wrap its errors. Verification fails closed.
_VERIFY_ERRORS = (jwt.PyJWTError, TypeError, ValueError)


class TokenError(Exception):
    """A token that does not identify a connection.

    ``reason`` is the disconnect reason to send: ``"token_expired"`` or ``"unauthorized"``.
    ``detail`` says why, for the log (never sent to the client).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _check_algorithms(algorithms: Sequence[str]) -> tuple[str, ...]:
    if isinstance(algorithms, str):  # a classic slip: ("HS256") is a str, not a tuple
        algorithms = (algorithms,)
    algs = tuple(algorithms)
    if not algs:
        raise ValueError("at least one algorithm is required")
    refused = [alg for alg in algs if alg not in HMAC_ALGORITHMS]
    if refused:
        raise ValueError(f"only HMAC algorithms {HMAC_ALGORITHMS} are supported, not {refused}")
    return algs


class JWTIdentifier:
    """Verifies connection tokens signed with a shared ``secret``.

    ``leeway`` (seconds) tolerates clock skew on ``exp``, ``nbf`` and ``iat``.
    """

    def __init__(
        self,
        secret: str | bytes,
        *,
        algorithms: Sequence[str] = HMAC_ALGORITHMS,
        leeway: float = 0.0,
        require_exp: bool = False,
    ) -> None:
        if not secret:
            raise ValueError("an empty JWT secret would accept forged tokens")
        self.secret = secret
        self.algorithms = _check_algorithms(algorithms)
        self.leeway = leeway
        self.require_exp = require_exp
        self._options: dict[str, Any] = {"require": ["exp"] if require_exp else []}

    def verify(self, token: str) -> dict[str, Any]:
        """The connection identifiers carried by ``token``; raises :class:`TokenError`.

        The signature is checked before any claim, so an expired token with a bad signature is
        ``unauthorized``, not ``token_expired``.
        """
        if not isinstance(token, str) or not token:
            raise TokenError("unauthorized", "no token")
        try:
            claims = jwt.decode(
                token,
                self.secret,
                algorithms=list(self.algorithms),
                options=self._options,  # type: ignore[arg-type]
                leeway=self.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token_expired", "exp is in the past") from None
        except _VERIFY_ERRORS as exc:
            raise TokenError("unauthorized", f"{type(exc).__name__}: {exc}") from None
        ext = claims.get("ext")
        if not isinstance(ext, str):
            raise TokenError("unauthorized", "claim ext missing or not a string")
        try:
            identifiers = JSON.decode(ext)
        except InvalidCommand as exc:
            raise TokenError("unauthorized", f"claim ext: {exc.reason}") from None
        if not isinstance(identifiers, dict):
            raise TokenError("unauthorized", "claim ext is not a JSON object")
        return identifiers


def issue_token(
    secret: str | bytes,
    identifiers: Mapping[str, Any],
    ttl: float | None = 3600,
    algorithm: str = "HS256",
) -> str:
    """A token for ``identifiers``, valid ``ttl`` seconds from now (``None``: no ``exp``).

    ``exp`` is rounded up to the next whole second, so the token lives at least ``ttl`` seconds.
    A ``ttl`` that is not a finite number > 0 is a :class:`ValueError`: the token would be
    expired when issued (or, for ``inf``/``nan``, not a token PyJWT can encode).
    """
    if not secret:
        raise ValueError("an empty JWT secret would accept forged tokens")
    if ttl is not None and not (math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"ttl must be a finite number of seconds > 0, not {ttl!r}")
    _check_algorithms((algorithm,))
    claims: dict[str, Any] = {"ext": json.dumps(dict(identifiers), separators=(",", ":"))}
    if ttl is not None:
        claims["exp"] = math.ceil(time.time() + ttl)
    return jwt.encode(claims, secret, algorithm=algorithm)


def token_from_request(
    headers: Mapping[str, str],
    subprotocols: Sequence[str],
    query: Mapping[str, str],
    param: str = "jid",
) -> str | None:
    """Where a connection's token comes from, in order: the ``X-JID`` header, an
    ``anycable-token.<token>`` subprotocol entry, the query parameter ``param``.

    ``headers`` keys are expected lower-case. Empty values count as absent.
    """
    token = headers.get("x-jid")
    if token:
        return token
    token = token_from_subprotocols(subprotocols)
    if token:
        return token
    return query.get(param) or None
