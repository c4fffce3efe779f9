"""The Autobahn test suite against the server's own data path: the framing cases (1-7, 9,
10) and the permessage-deflate cases (12, 13).

The server runs as a real process (``trio-cable serve --echo-path /echo``) with the compiled
kernels and again with the pure-Python twin; kosoku drives the Autobahn case files.
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


def _echo_server(pure: bool, *extra: str) -> Iterator[str]:
    args = ["serve", "--port", "0", "--echo-path", "/echo", *extra]
    # 9.1.6 / 9.2.6 send 16 MiB messages.
    args += ["--max-message-size", str(20 * 1024 * 1024)]
    env: dict[str, str | None] = {"TRIO_CABLE_NO_EXTENSIONS": "1" if pure else None}
    with running_server(args, env=env) as (url, _proc, startup):
        # The server says once at start-up when it runs on the pure-Python kernels.
        said_pure = any("pure-Python" in line for line in startup)
        assert said_pure == pure, startup
        yield url.rsplit("/", 1)[0] + "/echo"


@pytest.fixture(params=_kernels())
def echo_url(request: pytest.FixtureRequest) -> Iterator[str]:
    yield from _echo_server(request.param == "pure")


@pytest.fixture(params=_kernels())
def deflate_echo_url(request: pytest.FixtureRequest) -> Iterator[tuple[str, bool]]:
    # Threshold 0: every echo is compressed.  Autobahn's compression cases check each echo's
    # bytes, and kosoku hands an uncompressed text echo on a compressed connection to the
    # case as str, which the case cannot hash (a runner quirk: RFC 7692 allows uncompressed
    # messages there, and the server sends short ones so by default).
    # No adaptive admission: on a busy machine it would see lag, shed load, and stop offering
    # compression (as it should), and every case would be UNIMPLEMENTED.
    pure = request.param == "pure"
    args = ("--compression", "--compression-threshold", "0", "--no-adaptive-admission")
    for url in _echo_server(pure, *args):
        yield url, pure


def _run(url: str, cases: list[str], concurrency: int = 2) -> list:
    async def run() -> list:
        try:
            return await kosoku.run_fuzzingclient(url, cases=cases, concurrency=concurrency)
        except kosoku.FailureError as exc:
            return list(exc.results)

    return asyncio.run(run())


def _failures(results: list) -> list[str]:
    return [
        f"{r.case_id}: {r.behavior.value}/{r.behavior_close.value} "
        f"{r.description[:60]!r} {r.result[:120]!r}"
        for r in results
        if r.behavior.value not in ACCEPTED or r.behavior_close.value not in ACCEPTED_CLOSE
    ]


def test_autobahn_framing_cases(echo_url: str) -> None:
    results = _run(echo_url, CASES)
    assert len(results) > 290, f"only {len(results)} cases ran"
    bad = _failures(results)
    assert not bad, "\n".join(bad)


#: The compression cases CI runs.  Every case of 12 and 13 passed with both kernels
#: (2026-12-02, 216 cases each, ~10 minutes on this 2-vCPU machine); CI runs the sizes up to
#: 32 KiB of every corpus (12.*.1-8) and of every offer/accept combination (13.*.1-8) with the
#: compiled kernel, and a smaller share with the pure one (the kernels differ in the frame
#: parser only).  The rest repeat the same code paths with 64-128 KiB messages, 1,000 each.
COMPRESSION_CASES = [f"{group}.{k}.{n}" for group, ks in ((12, 5), (13, 7))
                     for k in range(1, ks + 1) for n in range(1, 9)]  # fmt: skip
PURE_DEFLATE_CASES = [
    *(f"12.1.{n}" for n in range(1, 9)),
    *(f"13.{k}.{n}" for k in range(1, 8) for n in range(1, 5)),
]


def test_autobahn_compression_cases(deflate_echo_url: tuple[str, bool]) -> None:
    """12.*: 1,000 messages each of five corpora at 18 sizes, auto-fragmented or not;
    13.*: the same over the offer/accept parameter combinations (window bits, no context
    takeover).  Every case must negotiate (UNIMPLEMENTED is a failure) and echo exactly."""
    url, pure = deflate_echo_url
    cases = PURE_DEFLATE_CASES if pure else COMPRESSION_CASES
    results = _run(url, cases, concurrency=4)
    assert len(results) == len(cases), f"{len(results)} of {len(cases)} cases ran"
    bad = _failures(results)
    assert not bad, "\n".join(bad)
