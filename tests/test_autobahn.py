"""The Autobahn test suite's framing cases (1-7, 9, 10) against the server's own data path.

The server runs as a real process (``trio-cable serve --echo-path /echo``) with the compiled
kernels and again with the pure-Python twin; kosoku drives the Autobahn case files.
Compression (12.*, 13.*) is not negotiated by trio_cable and is not run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.procs import running_server

kosoku = pytest.importorskip("kosoku", reason="kosoku (the Autobahn runner) is a dev dependency")

pytestmark = pytest.mark.slow  # two server processes, ~300 cases each: ~10 s

CASES = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
ACCEPTED = {"OK", "NON-STRICT", "INFORMATIONAL"}
ACCEPTED_CLOSE = {"OK", "INFORMATIONAL"}


def _kernels() -> list[str]:
    try:
        from trio_cable import _speedups  # noqa: F401
    except ImportError:
        return ["pure"]
    return ["compiled", "pure"]


@pytest.fixture(params=_kernels())
def echo_url(request: pytest.FixtureRequest) -> Iterator[str]:
    pure = request.param == "pure"
    args = ["serve", "--port", "0", "--echo-path", "/echo"]
    # 9.1.6 / 9.2.6 send 16 MiB messages.
    args += ["--max-message-size", str(20 * 1024 * 1024)]
    env: dict[str, str | None] = {"TRIO_CABLE_NO_EXTENSIONS": "1" if pure else None}
    with running_server(args, env=env) as (url, _proc, startup):
        # The server says once at start-up when it runs on the pure-Python kernels.
        said_pure = any("pure-Python" in line for line in startup)
        assert said_pure == pure, startup
        yield url.rsplit("/", 1)[0] + "/echo"


def test_autobahn_framing_cases(echo_url: str) -> None:
    async def run() -> list:
        try:
            return await kosoku.run_fuzzingclient(echo_url, cases=CASES, concurrency=2)
        except kosoku.FailureError as exc:
            return list(exc.results)

    results = asyncio.run(run())
    assert len(results) > 290, f"only {len(results)} cases ran"
    bad = [
        f"{r.case_id}: {r.behavior.value}/{r.behavior_close.value} "
        f"{r.description[:60]!r} {r.result[:120]!r}"
        for r in results
        if r.behavior.value not in ACCEPTED or r.behavior_close.value not in ACCEPTED_CLOSE
    ]
    assert not bad, "\n".join(bad)
