"""CI smoke test of the avalanche benchmarks (bench/avalanche): every scenario in quick mode,
asserting the qualitative results rather than numbers.

Each scenario runs as ``python -m bench.avalanche <scenario> --quick --json`` in a child
process (the benchmark pins its orchestrator to a core, which must not happen to pytest).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(scenario: str, tmp_path: Path, *extra: str, timeout: float = 80) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.avalanche", scenario, "--quick", "--json", "--quiet",
         "--out", str(tmp_path), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def by_name(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in result["rows"]}


@pytest.mark.slow
def test_restart_defaults_lose_nothing(tmp_path: Path) -> None:
    rows = by_name(run("avalanche", tmp_path, "--rows", "naive,defaults"))
    naive, defaults = rows["naive"], rows["defaults"]
    # trio_cable's defaults: every client back, nothing lost or duplicated, no timeouts.
    assert defaults["never_back"] == 0
    assert defaults["lost"] == 0
    assert defaults["duplicated"] == 0
    assert defaults["timeouts"] == 0
    assert defaults["expected"] > 0
    # The naive row (no history, no resume) loses what was published while it was away,
    # and redoes the connect and subscribe callbacks that resume skips.
    assert naive["lost"] > 0
    assert naive["db_calls"] > defaults["db_calls"]
    assert (tmp_path / "restart.png").exists()


@pytest.mark.slow
def test_restart_over_rpc_counts_what_reaches_the_application(tmp_path: Path) -> None:
    """RPC mode: the demo application answers over HTTP from a uvicorn process of its own."""
    result = run("avalanche", tmp_path, "--rpc", "--rows", "naive,defaults", timeout=120)
    assert result["rpc"] is True
    rows = by_name(result)
    naive, defaults = rows["naive"], rows["defaults"]
    clients = naive["clients"]
    # Naive: after the hard restart every client is identified and subscribed again over
    # RPC (5 subscriptions each), through a fixed limit that nothing lowers.
    assert naive["app_connects"] >= clients
    assert naive["app_commands"] >= 5 * clients
    assert naive["app_calls_peak_s"] > 0
    assert naive["rpc_limit_min"] == naive["rpc_limit_max"] == 128
    assert naive["db_calls"] >= naive["app_connects"] + 5 * clients
    # Defaults: JWT identity, signed streams and resume: nothing reaches the application,
    # every client is back and nothing is lost or duplicated.
    assert defaults["app_calls"] == 0
    assert defaults["db_calls"] == 0
    for key in ("never_back", "lost", "duplicated", "timeouts"):
        assert defaults[key] == 0, (key, defaults)
    assert defaults["expected"] > 0
    assert (tmp_path / "restart-rpc.png").exists()
    assert (tmp_path / "restart-rpc.json").exists()


@pytest.mark.slow
def test_celebrity_everybody_gets_in(tmp_path: Path) -> None:
    rows = by_name(run("celebrity", tmp_path))
    for row in rows.values():
        assert row["never_back"] == 0, row


@pytest.mark.slow
def test_linearized_never_two_subscribes_in_flight(tmp_path: Path) -> None:
    result = run("subscribe", tmp_path)
    modes = {row["mode"]: row for row in result["rows"]}
    assert modes["linearized"]["max_inflight"] == 1
    assert modes["concurrent"]["max_inflight"] > 1
    for row in result["rows"]:
        assert row["never_back"] == 0, row
        # Time to initialize (first connect attempt to every subscription confirmed).
        assert 0 < row["init_p50"] <= row["init_p99"] < 30, row


@pytest.mark.slow
def test_backoff_simulation_shape(tmp_path: Path) -> None:
    result = run("backoff", tmp_path, "--runs", "10")
    calls = {s: result[s]["calls"] for s in ("none", "exponential", "full_jitter",
             "equal_jitter", "decorrelated_jitter")}  # fmt: skip
    time_ms = {s: result[s]["time_ms"] for s in calls}
    jittered = ("full_jitter", "equal_jitter", "decorrelated_jitter")
    # Brooker's shape at 100 clients: no backoff is fast but costs the most calls; backoff
    # without jitter stays synchronized and takes far longer; jitter cuts the work by ~3x.
    for s in jittered:
        assert calls[s] < calls["exponential"] < calls["none"]
        assert time_ms[s] * 4 < time_ms["exponential"]
    assert time_ms["none"] < min(time_ms[s] for s in jittered)
    # And the numbers of the reference reproduction, within noise.
    assert calls["none"] == pytest.approx(2422, rel=0.1)
    assert calls["decorrelated_jitter"] == pytest.approx(999, rel=0.1)
    assert time_ms["exponential"] == pytest.approx(63_400, rel=0.15)
    assert set(result["trio_cable"]) == set(calls)
