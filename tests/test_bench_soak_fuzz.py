"""Smoke tests of ``bench fuzz`` and ``bench soak``: each runs for a few seconds through the real
command lines (``python -m trio_cable bench fuzz``, ``python -m bench soak``) and writes well-formed
summaries with sane verdicts.  How long the campaigns run, and what they find, is for the
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


def test_fuzz_campaign_smoke(tmp_path: Path) -> None:
    out, md = tmp_path / "fuzz.json", tmp_path / "fuzz.md"
    # `python -m bench` from the repository root: the suite is checkout-only (there is no
    # `trio-cable bench` any more).
    cmd = [sys.executable, "-m", "bench", "fuzz", "--minutes", "0.12",
           "--batch", "8", "--quiet", "--json", "--out", str(out), "--md", str(md),
           "--plot", str(tmp_path / "f.png")]  # fmt: skip
    proc = _run(cmd, timeout=120)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary == {**summary, "bench": "fuzz", "minutes": 0.12}
    assert set(summary["targets"]) == {"decode-json", "decode-msgpack", "publications", "frames",
                                       "live"}  # fmt: skip
    for name, target in summary["targets"].items():
        assert target["examples"] > 0, name
        assert target["inputs"] >= target["examples"]
    assert summary["examples"] == sum(t["examples"] for t in summary["targets"].values())
    assert (proc.returncode == 0) == (summary["failures"] == [])
    for failure in summary["failures"]:
        assert failure["target"] in summary["targets"] and failure["error"]
    live = summary["live"]
    assert live["health_checks"] >= live["batches"] > 0
    assert 0 < live["connections"] <= 8 * live["batches"]
    assert 10 < live["rss_mib_baseline"] <= live["rss_mib_max"] < 1000
    assert 0 < live["fds_baseline"] <= live["fds_max_after_batch"] <= live["fds_baseline"] + 2
    assert live["server_exit_code"] == 0
    assert live["samples"] and all(s["rss_mib"] > 0 for s in live["samples"])
    assert "## Fuzz campaign" in md.read_text()
    # --json prints the same summary, without the samples.
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["examples"] == summary["examples"] and "samples" not in printed["live"]


def test_soak_smoke(tmp_path: Path) -> None:
    out, md, png = tmp_path / "soak.json", tmp_path / "soak.md", tmp_path / "soak.png"
    proc = _run([sys.executable, "-m", "bench", "soak", "--minutes", "0.12", "--clients", "12",
                 "--restart-every", "4", "--drain-period", "0.5", "--sample-every", "1",
                 "--settle", "10", "--quiet", "--json", "--out", str(out), "--md", str(md),
                 "--plot", str(png), "--workdir", str(tmp_path)], timeout=120)  # fmt: skip
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
    assert "## Soak" in md.read_text()
    assert json.loads(proc.stdout.strip().splitlines()[-1])["verdict"] == v
