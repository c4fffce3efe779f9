"""The workers scenario (bench/workers.py) in quick mode: 2,000 connections held on
``--workers 2`` and a broadcast to all, then SIGHUP under 300 ext clients, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.redis_support import REDIS_SERVER, SKIP_REASON

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(REDIS_SERVER is None, reason=SKIP_REASON)
def test_quick_workers_scenario(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.workers", "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "workers.json").read_text())
    hold, roll = result["hold"], result["roll"]
    assert hold["connected"] == hold["health_connections"] == hold["conns"] == 2000
    assert len(hold["workers"]) == 2 and all(w["connections"] > 0 for w in hold["workers"])
    assert hold["broadcast_reached"] == 2000
    assert roll["clients_exact"] == roll["clients"] == 300, roll["anomalies"]
    assert roll["lost"] == roll["duplicated"] == 0
    assert roll["published"] > 0 and roll["both_replaced"]
    assert result["server_exit_status"] == 0
    assert "| 2000 | 2000 | 2000 |" in out.stdout
