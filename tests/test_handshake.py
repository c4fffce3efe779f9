"""The opening handshake's decisions, sans-I/O."""

from __future__ import annotations

import h11
import pytest

from trio_cable.protocol.handshake import (
    Acceptance,
    Refusal,
    negotiate,
    origin_allowed,
    request_from_h11,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def make_request(**headers: str) -> h11.Request:
    base = {
        "host": "x",
        "upgrade": "websocket",
        "connection": "keep-alive, Upgrade",
        "sec-websocket-version": "13",
        "sec-websocket-key": KEY,
        "sec-websocket-protocol": "actioncable-v1-json",
    }
    base.update({k.replace("_", "-"): v for k, v in headers.items()})
    return h11.Request(
        method="GET", target="/cable?sid=abc&pi=5", headers=[(k, v) for k, v in base.items() if v]
    )


def test_rfc6455_accept_token_and_subprotocol():
    outcome = negotiate(request_from_h11(make_request()))
    assert isinstance(outcome, Acceptance)
    headers = dict(outcome.headers)
    # The example of RFC 6455 section 1.3.
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert headers["sec-websocket-protocol"] == "actioncable-v1-json"


def test_query_and_headers_are_parsed():
    request = request_from_h11(make_request(x_jid="tok"), remote="1.2.3.4:5")
    assert request.path == "/cable"
    assert request.query == {"sid": "abc", "pi": "5"}
    assert request.headers["x-jid"] == "tok"
    assert request.remote == "1.2.3.4:5"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"sec_websocket_version": "8"}, 426),
        ({"sec_websocket_key": ""}, 400),
        ({"sec_websocket_key": "bm90IDE2IGJ5dGVz"}, 400),
        ({"connection": "keep-alive"}, 426),
        ({"sec_websocket_protocol": "graphql-ws"}, 400),
        ({"sec_websocket_protocol": ""}, 400),
    ],
)
def test_refusals(headers, status):
    outcome = negotiate(request_from_h11(make_request(**headers)))
    assert isinstance(outcome, Refusal)
    assert outcome.status == status


def test_echo_endpoint_needs_no_subprotocol():
    outcome = negotiate(
        request_from_h11(make_request(sec_websocket_protocol="")), require_subprotocol=False
    )
    assert isinstance(outcome, Acceptance) and outcome.selected is None


@pytest.mark.parametrize(
    ("origin", "allowed", "ok"),
    [
        ("https://a.com", [], True),
        (None, [], True),
        (None, ["a.com"], False),
        ("https://a.com", ["a.com"], True),
        ("https://a.com:8443", ["a.com:8443"], True),
        ("https://b.com", ["a.com"], False),
        ("https://x.a.com", ["*.a.com"], True),
        ("https://evila.com", ["*.a.com"], False),
        ("https://a.com", ["https://a.com"], True),
        ("http://a.com", ["https://a.com"], False),
        ("https://anything", ["*"], True),
        ("HTTPS://A.COM", ["a.com"], True),
    ],
)
def test_origin_allowed(origin, allowed, ok):
    assert origin_allowed(origin, allowed) is ok
