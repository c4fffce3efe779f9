"""The baseline comparison (``--baseline REF``, ``trio_cable@REF``): another git revision's
trio_cable server as a peer target in the same run, and the ratios current / baseline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import baseline, peers
from bench.options import Options
from bench.output import UsageError

ROOT = Path(__file__).resolve().parents[1]


def test_pick_puts_each_baseline_next_to_its_target() -> None:
    opts = Options(baselines=["abc1234"])
    assert opts.pick(["picows", "trio_cable", "trio_cable-cable"]) == [
        "picows", "trio_cable", "trio_cable@abc1234", "trio_cable-cable",
        "trio_cable-cable@abc1234",
    ]  # fmt: skip
    # Named targets: a baseline target is kept when its benchmark supports the base target.
    opts = Options(targets=["trio_cable-cable@abc1234", "trio_cable", "picows"])
    assert opts.pick(["trio_cable-cable", "picows"]) == ["trio_cable-cable@abc1234", "picows"]
    assert Options(targets=["trio_cable"]).pick(["trio_cable-cable"]) == []


def test_add_baseline_registers_twins_of_the_trio_cable_targets(tmp_path: Path) -> None:
    names = peers.add_baseline("feedbee", tmp_path)
    try:
        assert names == ["trio_cable@feedbee", "trio_cable-cable@feedbee"]
        twin, current = peers.TARGETS["trio_cable-cable@feedbee"], peers.TARGETS["trio_cable-cable"]
        assert twin.tree == tmp_path and current.tree is None
        assert (twin.server, twin.dialect, twin.path) == (current.server, current.dialect, "/cable")
    finally:
        for name in names:
            del peers.TARGETS[name]


@pytest.mark.parametrize("bench", ["micro", "wsbench", "report", "profile"])
def test_a_baseline_is_refused_where_it_would_not_run(bench: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", bench, "--baseline", "HEAD"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == (
        "python -m bench: a baseline revision runs in echo, broadcast, memory, scale (and all)\n"
    )


def test_resolve_names_commits() -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip
    sha, short = baseline.resolve("HEAD")
    assert sha == head and head.startswith(short) and len(short) >= 7
    with pytest.raises(UsageError, match="git rev-parse"):
        baseline.resolve("no-such-ref-anywhere")


def _sample(target: str, repeat: int, cpu: float, rps: float) -> dict[str, Any]:
    return {"target": target, "repeat": repeat, "conns": 100, "size": 64, "binary": False,
            "server_cpu_us_per_rt": cpu, "rps": rps, "server_cpu_util": 1.0,
            "bad_replies": 0}  # fmt: skip


def test_compare_gives_ratios_of_medians_and_per_repeat() -> None:
    from bench.echo import aggregate

    samples = [
        _sample("trio_cable", 0, 10.0, 1000.0), _sample("trio_cable@abc", 0, 8.0, 1100.0),
        _sample("trio_cable@abc", 1, 9.0, 1000.0), _sample("trio_cable", 1, 9.0, 1200.0),
        _sample("trio_cable", 2, 11.0, 900.0), _sample("trio_cable@abc", 2, 10.0, 1000.0),
    ]  # fmt: skip
    result = {"bench": "echo", "samples": samples,
              "rows": aggregate(samples, ["trio_cable", "trio_cable@abc"])}  # fmt: skip
    rows = {row["metric"]: row for row in baseline.compare(result)}
    assert set(rows) == {"cpu_us", "rps"}
    cpu = rows["cpu_us"]
    assert (cpu["target"], cpu["baseline"], cpu["conns"], cpu["size"]) == (
        "trio_cable", "trio_cable@abc", 100, 64
    )  # fmt: skip
    assert cpu["current"] == 10.0 and cpu["baseline_value"] == 9.0
    assert cpu["ratio"] == pytest.approx(10 / 9)
    assert cpu["repeat_ratios"] == pytest.approx([10 / 8, 9 / 9, 11 / 10])
    line = baseline.describe(cpu)
    assert line.startswith("trio_cable vs trio_cable@abc [100 conns 64 B text] cpu_us: ")
    assert "= 1.111 (per repeat 1.000-1.250, median 1.100)" in line
    assert baseline.compare({"bench": "micro", "rows": []}) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("bench", "targets", "metric"),
    [("echo", "trio_cable,trio_cable-cable", "cpu_us"),
     ("broadcast", "trio_cable-cable", "cpu_us"),
     ("memory", "trio_cable-cable", "bytes_per_conn")],
)  # fmt: skip
def test_quick_run_against_head(bench: str, targets: str, metric: str, tmp_path: Path) -> None:
    # HEAD's tree (exported and compiled into .bench-cache once) against the checkout: the same
    # code, so both run and compare; the ratio is ~1 (not asserted: one quick repeat is noise).
    _sha, short = baseline.resolve("HEAD")
    cmd = [sys.executable, "-m", "bench", bench, "--quick", "--json", "--quiet", "--no-report",
           "--targets", targets, "--baseline", "HEAD", "--out", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])[bench]
    names = {row["target"] for row in summary["rows"]}
    expected = {t for t in targets.split(",")} | {f"{t}@{short}" for t in targets.split(",")}
    assert names == expected
    compared = [row for row in summary["baseline"] if row["metric"] == metric]
    assert {row["baseline"] for row in compared} == {f"{t}@{short}" for t in targets.split(",")}
    for row in compared:
        assert row["current"] > 0 and row["baseline_value"] > 0
        assert 0.2 < row["ratio"] < 5, row  # the same code: anything else is a broken target
    saved = json.loads((tmp_path / f"{bench}.json").read_text())
    assert saved["baseline"] == summary["baseline"]
    tree = baseline.CACHE / f"ref-{_sha}"
    assert (tree / ".bench-ready").exists() and baseline._compiled(tree)


@pytest.mark.slow
def test_the_baseline_server_runs_the_revisions_compiled_code() -> None:
    import os

    from bench.runner import serving

    prepared = baseline.prepare("HEAD")
    names = peers.add_baseline(prepared.short, prepared.tree)
    try:
        for name, tree in (("trio_cable-cable", ROOT), (names[1], prepared.tree)):
            with serving(name) as (_spec, server):
                assert Path(os.readlink(f"/proc/{server.pid}/cwd")) == tree
                maps = Path(f"/proc/{server.pid}/maps").read_text().splitlines()
                loaded = {Path(ln.split()[-1]) for ln in maps if "_speedups" in ln}
                assert loaded and all(tree / "trio_cable" in p.parents for p in loaded), loaded
    finally:
        for name in names:
            del peers.TARGETS[name]
