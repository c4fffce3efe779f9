"""Smoke test of the bench/ suite: every benchmark runs in a tiny configuration and writes
well-formed results with sane numbers.  No timing assertions: this machine's speed is not
under test here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("picows")
pytest.importorskip("uvloop")
pytest.importorskip("psutil")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def _run_bench(*args: str, results: Path, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench", *args, "--quick", "--json", "--quiet",
           "--out", str(results)]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_all_benches_quick(tmp_path: Path) -> None:
    summary = _run_bench(
        "all", "--targets", "picows,trio_cable,trio_cable-cable", results=tmp_path, timeout=150
    )
    assert set(summary) == {
        "micro", "echo", "broadcast", "wsbench", "memory", "compression", "hostile",
    }  # fmt: skip

    micro = summary["micro"]["rows"]
    assert {r["impl"] for r in micro} >= {"pure", "websockets.speedups"}
    assert all(r["gbps"] > 0 for r in micro)

    echo = summary["echo"]["rows"]
    assert {r["target"] for r in echo} == {"picows", "trio_cable", "trio_cable-cable"}
    for row in echo:
        assert row["rps"] > 0 and row["cpu_us"] > 0 and row["bad_replies"] == 0
    picows = next(r for r in echo if r["target"] == "picows" and r["conns"] == 100)
    assert picows["vs_picows"] == pytest.approx(1.0)

    for row in summary["broadcast"]["rows"]:
        assert row["missed"] == 0 and row["cpu_us"] > 0 and row["delivered_per_s"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]

    ws = summary["wsbench"]
    assert ws["clients_reached"] > 0 and ws["rows"]
    assert all(0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] for r in ws["rows"])
    # Sampled recipients timed the fan-out; the sender's RTT includes its own fan-out.
    assert all(0 < r["delivery_p50_ms"] <= r["delivery_p95_ms"] for r in ws["rows"])
    assert ws["clients_reached_delivery"] > 0

    for row in summary["memory"]["rows"]:
        assert 0 < row["bytes_per_conn"] < 10 * 2**20

    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## 1. Micro", "## 2. Echo", "## 3. Broadcast", "## 4. websocket-bench",
                    "## 5. Memory", "## Targets of issue 3"):  # fmt: skip
        assert heading in text
    for name in ("micro", "echo", "broadcast", "wsbench", "memory"):
        png = tmp_path / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((tmp_path / f"{name}.json").read_text())["bench"] == name


def test_profile_summary_parses_py_spy_raw_format() -> None:
    from bench.profile import summarize_collapsed

    raw = (
        'process 1:"python";thread (0x1);run (trio/_core/_run.py:2400);'
        "_read_loop (trio_cable/server/connection.py:300) 6\n"
        'process 1:"python";thread (0x1);run (trio/_core/_run.py:2400) 4\n'
    )
    result = summarize_collapsed(raw)
    assert result["samples"] == 10
    assert result["self"][0] == ("trio_cable/server/connection.py:_read_loop", 60.0)
    assert ("trio/_core/_run.py:run", 100.0) in result["inclusive"]


def test_stats_helpers() -> None:
    from bench.stats import percentile, ratio, summarize

    assert summarize([3, 1, 2]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert summarize([]) == {"median": None, "min": None, "max": None, "n": 0}
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert ratio(1.0, 0.0) is None and ratio(2.0, 4.0) == 0.5


def test_main_is_importable() -> None:
    import bench

    assert callable(bench.main)


@pytest.mark.slow
def test_compression_bench_quick(tmp_path: Path) -> None:
    summary = _run_bench(
        "compression", "--targets", "trio_cable-cable,trio_cable-deflate",
        results=tmp_path, timeout=90,
    )["compression"]  # fmt: skip
    rows = {r["target"]: r for r in summary["rows"]}
    assert set(rows) == {"trio_cable-cable", "trio_cable-deflate"}
    for row in rows.values():
        assert row["missed"] == 0 and row["cpu_us"] > 0 and row["bytes_per_conn"] > 0
    plain, deflated = rows["trio_cable-cable"], rows["trio_cable-deflate"]
    # ~3 KB of chat-like JSON deflates to well under half on the wire.
    assert plain["wire_bytes"] > 2_500
    assert deflated["wire_bytes"] < plain["wire_bytes"] / 2
    assert deflated["wire_bytes_vs_plain"] == pytest.approx(
        deflated["wire_bytes"] / plain["wire_bytes"]
    )


def test_scale_bench_quick(tmp_path: Path) -> None:
    """``bench scale --quick``: the three phases run, every figure is there, every held
    connection got every broadcast in order, and the lag came from the server's raw samples."""
    summary = _run_bench("scale", "--sizes", "150", "--duration", "1.5", results=tmp_path,
                         timeout=120)["scale"]  # fmt: skip
    (row,) = summary["rows"]
    assert row["target"] == "trio_cable-cable" and row["conns"] == 150
    assert row["in_order"] is True
    assert 0 <= row["lag_p50_ms"] <= row["lag_p99_ms"] <= row["lag_max_ms"]
    assert row["churn_rate"] > 0 and row["bcast_p50_ms"] > 0 and row["probe_max_ms"] > 0
    assert row["bcast_lag_max_ms"] is not None and row["bcast_lag_max_ms"] >= 0
    (sample,) = json.loads((tmp_path / "scale.json").read_text())["samples"]
    assert sample["connected"] == 150 and sample["loadgens"] == 1
    assert sample["steady"]["lag"]["source"] == "samples"
    assert sample["steady"]["lag"]["n"] > 0 and sample["steady"]["probe"]["ping"]["n"] > 0
    bcast = sample["broadcast"]
    assert bcast["delivered"] == bcast["expected"] == 150 * bcast["broadcasts"]
    assert bcast["missing"] == bcast["out_of_order"] == bcast["duplicates"] == 0
    assert sample["churn"]["churn"]["made"] > 0 and sample["churn"]["churn"]["failed"] == 0
    assert (tmp_path / "plots" / "scale.png").exists()


def test_scale_helpers() -> None:
    from bench.scale import _from_buckets, shares

    assert shares(1000) == [1000] and shares(18000) == [9000, 9000]
    assert shares(18001) == [6001, 6000, 6000] and sum(shares(36000)) == 36000
    inf = float("inf")
    before = {0.001: 5.0, 0.005: 5.0, 0.01: 5.0, 0.05: 5.0, inf: 5.0}
    # In the window: 90 under 1 ms, 9 in 1-5 ms, 1 in 10-50 ms.
    after = {0.001: 95.0, 0.005: 104.0, 0.01: 104.0, 0.05: 105.0, inf: 105.0}
    got = _from_buckets(before, after)
    assert got == {"p50_ms": 1.0, "p99_ms": 5.0, "max_ms": 50.0, "n": 100, "source": "histogram"}
    assert _from_buckets(after, after)["p99_ms"] is None


@pytest.mark.slow
def test_presence_bench_tiny(tmp_path: Path) -> None:
    """``python -m bench presence`` end to end with 20 members: the naive row makes events,
    the linger row makes none, and every member is present at the end of each row."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "presence", "--members", "20", "--rows", "1,2",
         "--drain-period", "0.5", "--reconnect-min", "1.0", "--reconnect-max", "1.5",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "presence.json").read_text())
    naive, linger = data["rows"]
    assert naive["events_published"] > 0 and naive["presence_messages"] > 0, naive
    assert linger["events_published"] == 0 and linger["presence_messages"] == 0, linger
    assert naive["final_total"] == linger["final_total"] == 20
    assert data["info"]["members"] == 10_000
    assert (tmp_path / "presence.md").read_text().startswith("## Presence under a drain")


@pytest.mark.slow
def test_hostile_bench_quick(tmp_path: Path) -> None:
    summary = _run_bench("hostile", results=tmp_path, timeout=120)["hostile"]
    rows = {r["attack"]: r for r in summary["rows"]}
    assert set(rows) == {"none", "msgpack-arrays", "json-bracket-string"}
    for row in rows.values():
        assert row["missed"] == 0 and row["p50_ms"] > 0 and row["max_ms"] >= row["p99_ms"]
    # The attacker really attacked: refused frames closed its connections 1008, the accepted
    # shape kept one connection, and both sent frames.
    assert rows["msgpack-arrays"]["attacker_closes"].get("1008", 0) > 0
    assert rows["msgpack-arrays"]["frames_per_s"] > 0
    assert rows["json-bracket-string"]["frames_per_s"] > 0
    assert "added_max_ms" in rows["msgpack-arrays"] and isinstance(summary["holds"], bool)
    assert json.loads((tmp_path / "hostile.json").read_text())["samples"]
