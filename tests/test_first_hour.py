"""Issue 13, "the first hour": what a new user meets first, each over real processes, sockets and
a real redis-server where it needs one."""

from __future__ import annotations

import math

import pytest

from tests.procs import ROOT
from trio_cable.identity import JWTIdentifier, issue_token

README = (ROOT / "README.md").read_text()

# -- tokens that would be born expired ----------------------------------------------------------

SECRET = "a-test-secret-that-is-long-enough-for-hs256!"


@pytest.mark.parametrize("ttl", [0, -5, -0.0, math.nan, math.inf, -math.inf])
def test_issue_token_refuses_a_ttl_that_is_not_positive_and_finite(ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl must be a finite number of seconds > 0"):
        issue_token(SECRET, {"user_id": 1}, ttl=ttl)


def test_issue_token_still_takes_short_and_no_ttls() -> None:
    for ttl in (0.5, None):
        assert JWTIdentifier(SECRET).verify(issue_token(SECRET, {"u": 1}, ttl=ttl)) == {"u": 1}
