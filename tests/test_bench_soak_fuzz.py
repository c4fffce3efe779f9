"""Smoke tests of ``bench fuzz`` and ``bench soak``: each runs for a few seconds through the real
command lines (``python -m bench fuzz --quick``, ``python -m bench soak --quick``) and writes
well-formed summaries with sane verdicts into the directory named by ``--out``.  A fuzz finding
fails the smoke test (the campaign exits 1 then); how long the campaigns run is for the
ten-minute runs (``bench/RESULTS-hardening.md``)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("psutil")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          check=False)  # fmt: skip


@pytest.mark.slow
def test_fuzz_campaign_smoke(tmp_path: Path) -> None:
    out, md = tmp_path / "fuzz.json", tmp_path / "fuzz.md"
    cmd = [sys.executable, "-m", "bench", "fuzz", "--quick", "--quiet", "--json",
           "--out", str(tmp_path)]  # fmt: skip
    proc = _run(cmd, timeout=120)
    # Exit 1 is a finding: it fails here, with what the campaign found.
    failures = json.loads(out.read_text())["failures"] if out.exists() else None
    assert proc.returncode == 0, (failures, proc.stderr[-3000:])
    summary = json.loads(out.read_text())
    assert summary == {**summary, "bench": "fuzz", "minutes": 0.12}
    assert set(summary["targets"]) == {"decode-json", "decode-msgpack", "publications", "frames",
                                       "live"}  # fmt: skip
    for name, target in summary["targets"].items():
        assert target["examples"] > 0, name
        assert target["inputs"] >= target["examples"]
    assert summary["examples"] == sum(t["examples"] for t in summary["targets"].values())
    assert summary["failures"] == [] and summary["failure_count"] == 0
    assert summary["verdict"] == "no failures" and summary["quick"] is True
    for name, target in summary["targets"].items():
        assert target["distinct_outcomes"] > 0 and target["runs"] > 0, name
    live = summary["live"]
    assert live["health_checks"] >= live["batches"] > 0
    assert 0 < live["connections"] <= 8 * live["batches"]
    assert 10 < live["rss_mib_baseline"] <= live["rss_mib_max"] < 1000
    assert 0 < live["fds_baseline"] <= live["fds_max_after_batch"] <= live["fds_baseline"] + 2
    assert live["server_exit_code"] == 0
    assert live["samples"] and all(s["rss_mib"] > 0 for s in live["samples"])
    assert "## Fuzz campaign" in md.read_text()
    assert (tmp_path / "plots" / "fuzz.png").read_bytes()[:4] == b"\x89PNG"
    # --json prints the same summary, without the samples.
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["examples"] == summary["examples"] and "samples" not in printed["live"]


@pytest.mark.slow
def test_soak_smoke(tmp_path: Path) -> None:
    out, md, png = tmp_path / "soak.json", tmp_path / "soak.md", tmp_path / "plots" / "soak.png"
    proc = _run([sys.executable, "-m", "bench", "soak", "--quick", "--quiet", "--json",
                 "--out", str(tmp_path), "--workdir", str(tmp_path)], timeout=120)  # fmt: skip
    # Exit 1 is a verdict (not flat), not a crash: a few seconds of load are too short for the
    # RSS slope to mean anything; the verdict must agree with the exit status.
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    v = result["verdict"]
    assert (proc.returncode == 0) == v["flat"]
    assert v["flat"] == (v["rss_flat"] and v["fds_back_to_baseline"])
    # Twelve clients for seven seconds leave nothing open behind them.
    assert v["fds_back_to_baseline"], v
    assert v["fds_idle_before"] <= v["fds_max"]
    assert math.isfinite(v["rss_slope_mib_per_min"]) and v["rss_residual_sd_mib"] >= 0
    assert 10 < v["rss_mib_idle_before"] <= v["rss_mib_max"] < 1000
    load = result["load"]
    assert load["connects"] >= 12 and load["welcomes"] > 0 and load["broadcasts"] > 0
    assert load["subscribed"] > 0
    assert result["restarts"] >= 1 and result["server_exit_code"] == 0
    assert not result["log_errors"]
    phases = [s["phase"] for s in result["samples"]]
    assert phases[0] == "idle-before" and phases[-1] == "idle-after" and "load" in phases
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "## Soak" in md.read_text() and "![soak](plots/soak.png)" in md.read_text()
    assert result["quick"] is True and result["minutes"] == 0.12 and result["clients"] == 12
    assert json.loads(proc.stdout.strip().splitlines()[-1])["verdict"] == v
