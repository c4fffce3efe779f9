"""JWT identification (AnyCable semantics, HMAC only)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest

from trio_cable.identity import (
    HMAC_ALGORITHMS,
    JWTIdentifier,
    TokenError,
    issue_token,
    token_from_request,
)

# Long enough for HS512 (64 bytes), so PyJWT has no short-key warning to give.
SECRET = "a-test-secret-that-is-long-enough-for-hs512-0123456789abcdefghijk"
OTHER = "another-secret-that-is-long-enough-for-hs512-0123456789abcdefghij"
IDENTIFIERS = {"current_user": "gid://app/User/42", "tenant": 7}


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def craft(header: dict[str, Any], claims: dict[str, Any], signature: bytes | None = None) -> str:
    """A token built by hand; by default HMAC-SHA256-signed with SECRET whatever the header says
    (the classic algorithm-confusion attack)."""
    signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    if signature is None:
        signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


def claims(**extra: Any) -> dict[str, Any]:
    return {"ext": json.dumps(IDENTIFIERS), **extra}


def expired(secret: str = SECRET) -> str:
    """A token whose exp passed 10 s ago (issue_token refuses to make one)."""
    return jwt.encode(claims(exp=int(time.time()) - 10), secret, algorithm="HS256")


def reason_of(identifier: JWTIdentifier, token: Any) -> str:
    with pytest.raises(TokenError) as info:
        identifier.verify(token)
    return info.value.reason


@pytest.fixture
def ident() -> JWTIdentifier:
    return JWTIdentifier(SECRET)


# -- valid tokens ---------------------------------------------------------------------------------


def test_valid_token(ident: JWTIdentifier) -> None:
    assert ident.verify(issue_token(SECRET, IDENTIFIERS)) == IDENTIFIERS


def test_token_from_pyjwt_directly(ident: JWTIdentifier) -> None:
    token = jwt.encode(claims(exp=int(time.time()) + 60), SECRET, algorithm="HS256")
    assert ident.verify(token) == IDENTIFIERS


@pytest.mark.parametrize("alg", HMAC_ALGORITHMS)
def test_every_hmac_algorithm(ident: JWTIdentifier, alg: str) -> None:
    assert ident.verify(issue_token(SECRET, IDENTIFIERS, algorithm=alg)) == IDENTIFIERS


def test_no_exp_is_accepted_by_default(ident: JWTIdentifier) -> None:
    # AnyCable semantics: exp is enforced when present, not required.
    token = issue_token(SECRET, IDENTIFIERS, ttl=None)
    assert "exp" not in jwt.decode(token, SECRET, algorithms=["HS256"])
    assert ident.verify(token) == IDENTIFIERS


def test_require_exp() -> None:
    strict = JWTIdentifier(SECRET, require_exp=True)
    assert reason_of(strict, issue_token(SECRET, IDENTIFIERS, ttl=None)) == "unauthorized"
    assert strict.verify(issue_token(SECRET, IDENTIFIERS, ttl=60)) == IDENTIFIERS


def test_bytes_secret() -> None:
    token = issue_token(SECRET.encode(), IDENTIFIERS)
    assert JWTIdentifier(SECRET.encode()).verify(token) == IDENTIFIERS
    assert JWTIdentifier(SECRET).verify(token) == IDENTIFIERS


def test_extra_claims_are_ignored(ident: JWTIdentifier) -> None:
    token = jwt.encode(claims(sub="42", iat=int(time.time()), jti="x"), SECRET, algorithm="HS256")
    assert ident.verify(token) == IDENTIFIERS


def test_empty_identifiers(ident: JWTIdentifier) -> None:
    assert ident.verify(issue_token(SECRET, {})) == {}


# -- expiry and time claims -----------------------------------------------------------------------


def test_expired(ident: JWTIdentifier) -> None:
    assert reason_of(ident, expired()) == "token_expired"


def test_expired_error_message() -> None:
    err = TokenError("token_expired", "exp is in the past")
    assert err.reason == "token_expired"
    assert str(err) == "token_expired: exp is in the past"
    assert str(TokenError("unauthorized")) == "unauthorized"


def test_leeway_tolerates_skew() -> None:
    token = expired()
    assert JWTIdentifier(SECRET, leeway=60).verify(token) == IDENTIFIERS
    assert reason_of(JWTIdentifier(SECRET, leeway=1), token) == "token_expired"


def test_expired_with_wrong_key_is_unauthorized(ident: JWTIdentifier) -> None:
    # The signature is checked first: an attacker learns nothing from expiry.
    assert reason_of(ident, expired(OTHER)) == "unauthorized"


def test_nbf_in_the_future(ident: JWTIdentifier) -> None:
    token = jwt.encode(claims(nbf=int(time.time()) + 600), SECRET, algorithm="HS256")
    assert reason_of(ident, token) == "unauthorized"


def test_nbf_in_the_past(ident: JWTIdentifier) -> None:
    token = jwt.encode(claims(nbf=int(time.time()) - 600), SECRET, algorithm="HS256")
    assert ident.verify(token) == IDENTIFIERS


def test_exp_not_a_number(ident: JWTIdentifier) -> None:
    token = jwt.encode(claims(exp="tomorrow"), SECRET, algorithm="HS256")
    assert reason_of(ident, token) == "unauthorized"


def test_issue_token_exp_covers_ttl() -> None:
    before = time.time()
    token = issue_token(SECRET, IDENTIFIERS, ttl=30.2)
    exp = jwt.decode(token, SECRET, algorithms=["HS256"])["exp"]
    assert isinstance(exp, int)
    assert before + 30.2 <= exp <= time.time() + 31.2


# -- forged and malformed tokens ------------------------------------------------------------------


def test_alg_none(ident: JWTIdentifier) -> None:
    token = craft({"alg": "none", "typ": "JWT"}, claims(), signature=b"")
    assert token.endswith(".")
    assert reason_of(ident, token) == "unauthorized"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_spellings_with_a_signature(ident: JWTIdentifier, alg: str) -> None:
    assert reason_of(ident, craft({"alg": alg}, claims())) == "unauthorized"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "PS256", "EdDSA"])
def test_asymmetric_header_is_refused(ident: JWTIdentifier, alg: str) -> None:
    # Signed with HMAC over the shared secret, as an attacker who treats the secret as a public
    # key would: must not verify.
    assert reason_of(ident, craft({"alg": alg, "typ": "JWT"}, claims())) == "unauthorized"


def test_crafted_hs256_is_accepted(ident: JWTIdentifier) -> None:
    # The control for the two tests above: the same construction with the right header passes.
    assert ident.verify(craft({"alg": "HS256", "typ": "JWT"}, claims())) == IDENTIFIERS


def test_wrong_key(ident: JWTIdentifier) -> None:
    assert reason_of(ident, issue_token(OTHER, IDENTIFIERS)) == "unauthorized"


def test_algorithm_not_allowed() -> None:
    only_256 = JWTIdentifier(SECRET, algorithms=["HS256"])
    assert reason_of(only_256, issue_token(SECRET, IDENTIFIERS, algorithm="HS512")) == (
        "unauthorized"
    )


def test_tampered_payload(ident: JWTIdentifier) -> None:
    token = issue_token(SECRET, IDENTIFIERS)
    header, _payload, signature = token.split(".")
    other = b64url(json.dumps(claims(ext=json.dumps({"current_user": "admin"}))).encode())
    assert reason_of(ident, f"{header}.{other}.{signature}") == "unauthorized"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "a.b.c.d",
        "....",
        "eyJhbGciOiJIUzI1NiJ9.bm90IGpzb24.AAAA",  # payload is not JSON
        "\ud800.\ud800.\ud800",
        None,
        b"a.b.c",
        42,
    ],
)
def test_malformed(ident: JWTIdentifier, token: Any) -> None:
    assert reason_of(ident, token) == "unauthorized"


def test_payload_not_an_object(ident: JWTIdentifier) -> None:
    header = b64url(json.dumps({"alg": "HS256"}).encode())
    payload = b64url(b"[1,2]")
    sig = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert reason_of(ident, f"{header}.{payload}.{b64url(sig)}") == "unauthorized"


def test_audience_is_refused(ident: JWTIdentifier) -> None:
    token = jwt.encode(claims(aud="some-other-service"), SECRET, algorithm="HS256")
    assert reason_of(ident, token) == "unauthorized"


# -- the ext claim --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        {},  # missing ext
        {"ext": None},
        {"ext": {"current_user": "42"}},  # an object, not a JSON-encoded string
        {"ext": 42},
        {"ext": ""},
        {"ext": "not json"},
        {"ext": "[1,2]"},
        {"ext": '"a string"'},
        {"ext": "[" * 10_000},  # deep nesting is refused cheaply, not by RecursionError
    ],
)
def test_bad_ext(ident: JWTIdentifier, payload: dict[str, Any]) -> None:
    token = jwt.encode(payload, SECRET, algorithm="HS256")
    assert reason_of(ident, token) == "unauthorized"


def test_detail_says_why(ident: JWTIdentifier) -> None:
    with pytest.raises(TokenError) as info:
        ident.verify(jwt.encode({}, SECRET, algorithm="HS256"))
    assert "ext" in info.value.detail


# -- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "algorithms", [["RS256"], ["HS256", "ES256"], ["none"], [], ["hs256"], "RS256"]
)
def test_non_hmac_algorithms_are_refused(algorithms: Any) -> None:
    with pytest.raises(ValueError):
        JWTIdentifier(SECRET, algorithms=algorithms)


def test_single_algorithm_string_is_not_split_into_characters() -> None:
    assert JWTIdentifier(SECRET, algorithms="HS384").algorithms == ("HS384",)


@pytest.mark.parametrize("secret", ["", b""])
def test_empty_secret_is_refused(secret: str | bytes) -> None:
    with pytest.raises(ValueError):
        JWTIdentifier(secret)
    with pytest.raises(ValueError):
        issue_token(secret, IDENTIFIERS)


def test_issue_token_refuses_non_hmac() -> None:
    with pytest.raises(ValueError):
        issue_token(SECRET, IDENTIFIERS, algorithm="RS256")
    with pytest.raises(ValueError):
        issue_token(SECRET, IDENTIFIERS, algorithm="none")


def test_issue_token_ext_is_a_json_string() -> None:
    token = issue_token(SECRET, IDENTIFIERS)
    ext = jwt.decode(token, SECRET, algorithms=["HS256"])["ext"]
    assert isinstance(ext, str)
    assert json.loads(ext) == IDENTIFIERS


# -- where the token comes from -------------------------------------------------------------------


def test_token_from_header_first() -> None:
    assert (
        token_from_request(
            {"x-jid": "h"}, ["actioncable-v1-json", "anycable-token.s"], {"jid": "q"}
        )
        == "h"
    )


def test_token_from_subprotocol_second() -> None:
    offered = ["actioncable-v1-json", "anycable-token.s1", "anycable-token.s2"]
    assert token_from_request({}, offered, {"jid": "q"}) == "s1"


def test_token_from_query_last() -> None:
    assert token_from_request({}, ["actioncable-v1-json"], {"jid": "q"}) == "q"


def test_token_query_param_name() -> None:
    assert token_from_request({}, [], {"jid": "q", "token": "t"}, param="token") == "t"
    assert token_from_request({}, [], {"jid": "q"}, param="token") is None


def test_no_token() -> None:
    assert token_from_request({"x-other": "h"}, ["actioncable-v1-json"], {"sid": "x"}) is None


def test_empty_values_count_as_absent() -> None:
    assert token_from_request({"x-jid": ""}, ["anycable-token."], {"jid": "q"}) == "q"
    assert token_from_request({"x-jid": ""}, ["anycable-token."], {"jid": ""}) is None


def test_end_to_end_from_request(ident: JWTIdentifier) -> None:
    token = issue_token(SECRET, IDENTIFIERS)
    found = token_from_request({}, ["actioncable-v1-ext-json", f"anycable-token.{token}"], {})
    assert found == token
    assert ident.verify(found) == IDENTIFIERS
