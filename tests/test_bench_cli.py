"""The benchmark command lines (``python -m bench ...``) as a user meets them: where results go
(``--out DIR``, a fresh ``./bench-out/...`` by default, the committed files only with
``--update-results`` and never from a quick run), and a missing optional dependency as one
line naming the extra, exit status 2, no traceback.

Every harness runs in a child process from the checkout, as a user runs it; the committed
results in bench/ are fingerprinted (bytes and mtime) before and compared after."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import output, run_main
from bench.deps import MissingDependency, available

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
#: Where committed results live; nothing may appear, change or vanish there.
COMMITTED_DIRS = [BENCH / "results", BENCH / "plots", BENCH / "profiles", BENCH / "avalanche"]


def committed_snapshot() -> dict[str, tuple[str, int]]:
    """Path -> (sha256, mtime_ns) of every file under the committed results' directories (git
    ignored ones too: a harness must not add any) and of bench/*.md."""
    files = [p for d in COMMITTED_DIRS for p in d.rglob("*") if p.is_file()]
    files += list(BENCH.glob("*.md"))
    return {
        str(p.relative_to(ROOT)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in files
        if "__pycache__" not in p.parts
    }


def bench(
    *args: str, cwd: Path = ROOT, timeout: float = 60, pre: str = ""
) -> subprocess.CompletedProcess[str]:
    """``python -m bench ARGS`` in a child, from *cwd* (the checkout on PYTHONPATH, as a user
    outside it would set it); *pre* is Python run first (to hide a package)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = f"{pre}\nimport sys; from bench import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)  # fmt: skip


# -- where results go: units ----------------------------------------------------------------------


def _args(out: Path | None = None, update: bool = False) -> argparse.Namespace:
    return argparse.Namespace(out=out, update_results=update)


def test_quick_runs_refuse_update_results() -> None:
    with pytest.raises(output.UsageError, match="refused for a --quick run"):
        output.choose(_args(update=True), "echo", quick=True)
    assert output.choose(_args(update=True), "echo", quick=False) is None  # the committed files


def test_out_may_not_point_into_bench(tmp_path: Path) -> None:
    for inside in (BENCH, BENCH / "results", BENCH / "avalanche" / "results"):
        with pytest.raises(output.UsageError, match="inside bench/"):
            output.choose(_args(out=inside), "echo", quick=False)
    assert not output.inside_bench(BENCH / "out" / "x")  # git-ignored scratch
    assert (
        output.choose(_args(out=tmp_path / "a" / "b"), "echo", quick=True) == tmp_path / "a" / "b"
    )
    assert (tmp_path / "a" / "b").is_dir()
    with pytest.raises(output.UsageError, match="exclude each other"):
        output.choose(_args(out=tmp_path, update=True), "echo", quick=False)


def test_default_is_a_fresh_folder_under_the_current_directory(tmp_path: Path) -> None:
    first = output.fresh_dir("echo", tmp_path)
    second = output.fresh_dir("echo", tmp_path)
    assert first != second and first.parent == second.parent == tmp_path / "bench-out"
    assert first.name.endswith("-echo") and not any(first.iterdir())


def test_files_of_a_harness() -> None:
    assert output.files(None, "soak") == (
        BENCH / "results" / "soak.json", BENCH / "results" / "soak.md", BENCH / "plots" / "soak.png"
    )  # fmt: skip
    assert output.files(Path("/x"), "fuzz") == (
        Path("/x/fuzz.json"), Path("/x/fuzz.md"), Path("/x/plots/fuzz.png")
    )  # fmt: skip


REFUSED_QUICK = {
    "suite": ["micro", "--quick", "--update-results"],
    "avalanche": ["backoff", "--quick", "--update-results"],
    "rollout": ["rollout", "--quick", "--update-results"],
    "soak": ["soak", "--quick", "--update-results"],
    "soak-short": ["soak", "--minutes", "1", "--update-results"],
    "fuzz": ["fuzz", "--quick", "--update-results"],
    "fuzz-short": ["fuzz", "--minutes", "0.5", "--update-results"],
}


@pytest.mark.parametrize("harness", list(REFUSED_QUICK))
def test_every_harness_refuses_to_replace_full_results_with_quick_ones(
    harness: str, tmp_path: Path
) -> None:
    before = committed_snapshot()
    proc = bench(*REFUSED_QUICK[harness], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--update-results is refused for" in proc.stderr
    assert "quick results never replace the committed full ones" in proc.stderr
    assert not (tmp_path / "bench-out").exists()
    assert committed_snapshot() == before


def test_python_m_bench_runs_from_the_checkout() -> None:
    # Not installed (the wheel has no bench package): the checkout's root is what finds it.
    proc = subprocess.run([sys.executable, "-m", "bench", "--help"], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0 and "--update-results" in proc.stdout


# -- where results go: real runs ------------------------------------------------------------------


@pytest.mark.slow
def test_quick_backoff_leaves_the_committed_table_alone(tmp_path: Path) -> None:
    # `bench backoff --quick` once replaced the committed 100-run table with a 20-run one.
    before = committed_snapshot()
    named = tmp_path / "named"
    proc = bench("backoff", "--quick", "--runs", "5", "--quiet", "--json", "--out", str(named))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["quick"] is True
    assert json.loads((named / "backoff.json").read_text())["runs"] == 5
    assert (named / "backoff.md").read_text().startswith("**brooker**")
    assert (named / "backoff.png").read_bytes()[:4] == b"\x89PNG"
    # Without --out: a fresh folder under the current directory.
    proc = bench("backoff", "--quick", "--runs", "5", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (fresh,) = (tmp_path / "bench-out").iterdir()
    assert fresh.name.endswith("-backoff") and (fresh / "backoff.json").exists()
    assert committed_snapshot() == before
    committed = json.loads((BENCH / "avalanche" / "results" / "backoff.json").read_text())
    assert committed["runs"] == 100 and not committed["quick"]


@pytest.mark.slow
def test_quick_suite_run_and_report_write_only_where_asked(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    pytest.importorskip("websockets")
    before = committed_snapshot()
    proc = bench("micro", "--quick", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (fresh,) = (tmp_path / "bench-out").iterdir()
    assert json.loads((fresh / "micro.json").read_text())["quick"] is True
    text = (fresh / "RESULTS.md").read_text()
    assert "## 1. Micro" in text and "Quick mode" in text and "## 2. Echo" not in text
    assert (fresh / "plots" / "micro.png").read_bytes()[:4] == b"\x89PNG"
    # report: from the committed results (by default) to --out; links still reach bench/.
    report = tmp_path / "report"
    proc = bench("report", "--quiet", "--out", str(report))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (report / "RESULTS.md").read_text()
    assert "## 2. Echo" in text and "## 5. Memory" in text and "Quick mode" not in text
    assert (report / "plots" / "echo.png").exists()
    link = os.path.relpath(BENCH / "avalanche" / "RESULTS.md", report)
    assert f"]({link})" in text and (report / link).resolve().exists()
    # report --from DIR: the quick run's results.
    proc = bench("report", "--quiet", "--from", str(fresh), "--out", str(tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## 1. Micro" in (tmp_path / "again" / "RESULTS.md").read_text()
    assert committed_snapshot() == before


# -- missing optional dependencies ----------------------------------------------------------------

HIDE = "import sys; sys.modules[{name!r}] = None"  # `import name` now raises ImportError

MISSING = [
    ("matplotlib", ["report"], "plots", "bench"),
    ("websockets", ["micro", "--quick"], "the micro benchmark", "bench"),
    ("picows", ["echo", "--quick"], "the echo benchmark", "bench"),
    ("uvloop", ["broadcast", "--quick"], "the broadcast benchmark", "bench"),
    ("aiohttp", ["echo", "--quick", "--targets", "aiohttp"], "the aiohttp target", "bench"),
    ("psutil", ["soak", "--quick"], "psutil is needed for", "bench"),
    ("rich", ["backoff", "--quick"], "progress bars", "bench"),
    ("hypothesis", ["fuzz", "--quick"], "the fuzz campaign", "dev"),
    ("coredis", ["rollout", "--quick"], "Redis broker", "redis"),
]


@pytest.mark.parametrize(("name", "args", "purpose", "extra"), MISSING, ids=[m[0] for m in MISSING])
def test_a_missing_optional_dependency_is_one_line(
    name: str, args: list[str], purpose: str, extra: str, tmp_path: Path
) -> None:
    before = committed_snapshot()
    proc = bench(*args, cwd=tmp_path, pre=HIDE.format(name=name))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"python -m bench: {name} is needed for ")
    assert purpose in line and line.endswith(f"pip install -e '.[{extra}]'")
    assert not (tmp_path / "bench-out").exists()  # refused before anything was started
    assert committed_snapshot() == before


def test_a_missing_tool_is_one_line(tmp_path: Path) -> None:
    pre = "import bench.deps as d; d.find_tool = lambda name: None"
    proc = bench("profile", "--quick", cwd=tmp_path, pre=pre)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (
        "python -m bench: py-spy is needed for profiles: pip install -e '.[bench]'"
    )


def test_an_optional_import_failing_late_is_one_line_too(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def late(argv: list[str]) -> int:
        raise ModuleNotFoundError("No module named 'matplotlib.pyplot'", name="matplotlib.pyplot")

    assert run_main("prog", late, []) == 2
    err = capsys.readouterr().err
    assert err == "prog: matplotlib is needed for plots: pip install -e '.[bench]'\n"

    def other(argv: list[str]) -> int:
        raise ModuleNotFoundError("No module named 'nonesuch'", name="nonesuch")

    with pytest.raises(ModuleNotFoundError):  # not an optional dependency: a real bug
        run_main("prog", other, [])


def test_available_sees_hidden_modules() -> None:
    assert available("json")
    sys.modules["bench_test_hidden"] = None  # type: ignore[assignment]
    try:
        assert not available("bench_test_hidden")
    finally:
        del sys.modules["bench_test_hidden"]
    assert str(MissingDependency("coredis")).endswith("pip install -e '.[redis]'")
