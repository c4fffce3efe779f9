"""Signed stream names (Rails MessageVerifier, SHA256, JSON serializer)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trio_cable.streams import sign_stream, verify_stream

SECRET = "s3Krit"
VECTOR = "ImNoYXQvMjAyMyI=--2b2e054b6413bf3bc7e8bbad2f68962aa2ba19821800ccbd8de6fd7314e8320c"

# Stream names a Rails app could sign: any text without lone surrogates.
stream_names = st.text(st.characters(exclude_categories=["Cs"]))


def forge(secret: str, data: str) -> str:
    """A correctly signed message around arbitrary (possibly bogus) data."""
    digest = hmac.new(secret.encode(), data.encode(), hashlib.sha256).hexdigest()
    return f"{data}--{digest}"


def test_vector_signs() -> None:
    assert sign_stream(SECRET, "chat/2023") == VECTOR


def test_vector_verifies() -> None:
    assert verify_stream(SECRET, VECTOR) == "chat/2023"


def test_bytes_secret_is_the_same_key() -> None:
    assert sign_stream(SECRET.encode(), "chat/2023") == VECTOR
    assert verify_stream(SECRET.encode(), VECTOR) == "chat/2023"


def test_non_ascii_name_is_serialized_like_ruby_json() -> None:
    # Ruby's JSON.generate writes non-ASCII characters raw, as UTF-8.
    signed = sign_stream(SECRET, "café/ü")
    data = signed.split("--")[0]
    assert base64.b64decode(data) == '"café/ü"'.encode()
    assert verify_stream(SECRET, signed) == "café/ü"


@given(stream_names)
def test_roundtrip(stream: str) -> None:
    assert verify_stream(SECRET, sign_stream(SECRET, stream)) == stream


@given(stream_names, st.text())
def test_wrong_secret_never_verifies(stream: str, other: str) -> None:
    if other == SECRET:
        return
    assert verify_stream(other, sign_stream(SECRET, stream)) is None


def test_empty_secret() -> None:
    with pytest.raises(ValueError):
        sign_stream("", "chat")
    # Even a message "signed" with the empty key must not verify.
    assert verify_stream("", forge("", base64.b64encode(b'"chat"').decode())) is None
    assert verify_stream(b"", VECTOR) is None


def test_sign_requires_a_string() -> None:
    with pytest.raises(TypeError):
        sign_stream(SECRET, 42)  # type: ignore[arg-type]


def flip(text: str, index: int) -> str:
    ch = text[index]
    replacement = "A" if ch != "A" else "B"
    if ch in "0123456789abcdef":
        replacement = "0" if ch != "0" else "1"
    return text[:index] + replacement + text[index + 1 :]


@pytest.mark.parametrize("index", range(len(VECTOR)))
def test_any_single_character_change_is_refused(index: int) -> None:
    if VECTOR[index] == "-":
        return  # covered by the separator tests
    tampered = flip(VECTOR, index)
    assert tampered != VECTOR
    assert verify_stream(SECRET, tampered) is None


@pytest.mark.parametrize(
    "signed",
    [
        "",
        "--",
        "ImNoYXQvMjAyMyI=",  # no separator
        "ImNoYXQvMjAyMyI=--",  # no digest
        "--2b2e054b6413bf3bc7e8bbad2f68962aa2ba19821800ccbd8de6fd7314e8320c",  # no data
        VECTOR + "--",  # three parts
        VECTOR + "--" + "00",
        "ImNoYXQv--MjAyMyI=--2b2e054b6413bf3bc7e8bbad2f68962aa2ba19821800ccbd8de6fd7314e8320c",
        VECTOR.upper(),  # upper-case hex (and data) is a different message
        VECTOR[:-1],  # truncated digest
        VECTOR + "0",  # extended digest
        " " + VECTOR,
        VECTOR + "\n",
        "ImNoYXQvMjAyMyI=--2b2e054b6413bf3bc7e8bbad2f68962aa2ba19821800ccbd8de6fd7314e832é",
        "ImNoYXQvMjAyMyI=é--2b2e054b6413bf3bc7e8bbad2f68962aa2ba19821800ccbd8de6fd7314e8320c",
        "\ud800--\udfff",  # lone surrogates: cannot even be encoded
    ],
)
def test_malformed_is_refused(signed: str) -> None:
    assert verify_stream(SECRET, signed) is None


@pytest.mark.parametrize("signed", [None, b"ImNoYXQvMjAyMyI=--00", 42, ["a", "b"]])
def test_non_string_input_is_refused(signed: object) -> None:
    assert verify_stream(SECRET, signed) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [
        "!!!!",  # not base64 at all
        "ImNoYXQvMjAyMyI",  # bad padding
        "ImNo YXQvMjAyMyI=",  # characters outside the alphabet (validate=True)
        base64.b64encode(b"chat").decode(),  # not JSON
        base64.b64encode(b"\xff\xfe").decode(),  # not UTF-8
        base64.b64encode(b"123").decode(),  # JSON, but not a string
        base64.b64encode(b'{"stream":"chat"}').decode(),
        base64.b64encode(b"null").decode(),
        base64.b64encode(b"[" * 100_000).decode(),  # deep nesting must not escape as an error
    ],
)
def test_correctly_signed_garbage_is_refused(data: str) -> None:
    # The HMAC matches, so this exercises the decoding steps after the signature check.
    assert verify_stream(SECRET, forge(SECRET, data)) is None


def test_verify_never_raises_on_arbitrary_text() -> None:
    @given(st.text(), st.text())
    def check(secret: str, signed: str) -> None:
        result = verify_stream(secret, signed)
        assert result is None or isinstance(result, str)

    check()
