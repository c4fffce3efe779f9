"""Another git revision of trio_cable as a peer target: speed side by side in one run.

``python -m bench echo --baseline main`` (or ``--targets trio_cable,trio_cable@main``) runs the
trio_cable server of revision ``main`` next to the current checkout's, in the same run, with the
same load generator and the same pinning, its repeats interleaved with the current ones (the
target order rotates per repeat), and prints the ratio current / baseline of every median.

The revision's tree is exported (``git archive``, so nothing is registered in the repository's
worktree list) to ``.bench-cache/ref-<sha>/`` at the repository root (git-ignored) and its Cython
speedups are built in place with this interpreter (``setup.py build_ext --inplace``); the tree
is reused by later runs.  Its server runs as ``python -m trio_cable serve`` from that tree
(working directory and first ``PYTHONPATH`` entry), as the target ``trio_cable@<short sha>``
(``trio_cable-cable@<short sha>`` for the Action Cable endpoint).
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.output import UsageError
from bench.procs import ROOT

#: Where baseline trees are kept (git-ignored); ``BENCH_CACHE`` overrides it.
CACHE = Path(os.environ.get("BENCH_CACHE") or ROOT / ".bench-cache")
_READY = ".bench-ready"

_SCALE_COMPARED = (
    "lag_p99_ms", "lag_max_ms", "lag_bucket_p99_ms", "lag_bucket_max_ms", "churn_gc_max_ms",
    "bcast_p99_ms", "probe_max_ms",
)  # fmt: skip
#: Per benchmark: the fields that make a row's configuration, and the compared metrics
#: (row field -> sample field; both medians and per-repeat values are compared).
METRICS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "echo": (("conns", "size", "binary"), {"cpu_us": "server_cpu_us_per_rt", "rps": "rps"}),
    "broadcast": (
        ("conns",),
        {"cpu_us": "server_cpu_us_per_recipient", "delivered_per_s": "delivered_per_s"},
    ),
    "memory": (("conns",), {"bytes_per_conn": "bytes_per_conn"}),
    # The rows of bench.scale hold these too (its steady, churn and broadcast phases).
    "scale": (("conns",), {k: k for k in _SCALE_COMPARED}),
}


@dataclass(frozen=True)
class Baseline:
    """A revision of trio_cable ready to serve: the ref asked, its commit, and its tree."""

    ref: str
    sha: str
    short: str
    tree: Path


def _git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise UsageError(f"git {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout.strip()


def resolve(ref: str) -> tuple[str, str]:
    """(full sha, short sha) of the commit *ref* names."""
    sha = _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    return sha, _git("rev-parse", "--short", sha)


def _compiled(tree: Path) -> bool:
    return any(
        (tree / "trio_cable" / f"_speedups{suffix}").exists()
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
    )


def _export(sha: str, into: Path) -> None:
    """The tree of commit *sha*, extracted into *into* (``git archive``)."""
    into.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", "--format=tar", sha], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert archive.stdout is not None
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(into, filter="data")
    _out, err = archive.communicate()
    if archive.returncode != 0:
        raise UsageError(f"git archive {sha}: {err.decode().strip()}")


def _build(tree: Path) -> None:
    """Compile the tree's Cython speedups in place; a baseline without them is refused (it
    would compare the pure-Python twin against the compiled kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRIO_CABLE_NO_EXTENSIONS"}
    proc = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, env=env,
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0 or not _compiled(tree):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise UsageError(f"the speedups of {tree.name} did not compile: {' | '.join(tail)}")


def prepare(ref: str, *, log: Any = None) -> Baseline:
    """The tree of *ref*, exported and compiled (or found ready in the cache).  The tree is
    built in a scratch directory and renamed into place when complete, so a run that dies
    half-way leaves nothing that passes for ready, and two runs may prepare it at once."""
    sha, short = resolve(ref)
    tree = CACHE / f"ref-{sha}"
    if not (tree / _READY).exists():
        if log is not None:
            log(f"baseline {ref} = {short}: exporting and compiling into {tree}")
        scratch = CACHE / f"ref-{sha}.tmp-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            _export(sha, scratch)
            _build(scratch)
            (scratch / _READY).write_text(f"{ref}\n")
            try:
                scratch.rename(tree)
            except OSError:
                if not (tree / _READY).exists():  # not another run's finished tree
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return Baseline(ref, sha, short, tree)


def split(name: str) -> tuple[str, str | None]:
    """``"trio_cable@main"`` -> ``("trio_cable", "main")``; no ``@``: ``(name, None)``."""
    base, at, ref = name.partition("@")
    return base, (ref if at else None)


def compare(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Current vs baseline for every ``<target>@<sha>`` row of *result* (echo, broadcast,
    memory): the medians, their ratio current / baseline, and the per-repeat ratios (current
    and baseline of the same repeat ran next to each other: their spread is the noise)."""
    spec = METRICS.get(result.get("bench", ""))
    if spec is None:
        return []
    keys, metrics = spec
    rows = result.get("rows", [])
    samples = result.get("samples", [])
    out = []
    for row in rows:
        base, ref = split(row["target"])
        if ref is None:
            continue
        config = {k: row[k] for k in keys}
        current = next(
            (r for r in rows if r["target"] == base and all(r[k] == v for k, v in config.items())),
            None,
        )
        if current is None:
            continue
        for field, sample_field in metrics.items():
            now, then = current[field]["median"], row[field]["median"]
            per_repeat = []
            for s in samples:
                if s["target"] != base or any(s[k] != v for k, v in config.items()):
                    continue
                twin = next((b for b in samples if b["target"] == row["target"]
                             and b["repeat"] == s["repeat"]
                             and all(b[k] == v for k, v in config.items())), None)  # fmt: skip
                if twin and s.get(sample_field) and twin.get(sample_field):
                    per_repeat.append(s[sample_field] / twin[sample_field])
            out.append({
                "target": base, "baseline": row["target"], **config, "metric": field,
                "current": now, "baseline_value": then,
                "ratio": now / then if now is not None and then else None,
                "repeat_ratios": per_repeat,
            })  # fmt: skip
    return out


def describe(row: dict[str, Any]) -> str:
    """One comparison row as a line of text."""
    config = " ".join(
        [f"{row['conns']} conns"]
        + ([f"{row['size']} B"] if "size" in row else [])
        + (["binary" if row["binary"] else "text"] if "binary" in row else [])
    )
    ratios = row["repeat_ratios"]
    spread = (
        f" (per repeat {min(ratios):.3f}-{max(ratios):.3f}, median "
        f"{statistics.median(ratios):.3f})" if len(ratios) > 1 else ""
    )  # fmt: skip
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
    return (
        f"{row['target']} vs {row['baseline']} [{config}] {row['metric']}: "
        f"{_num(row['current'])} / {_num(row['baseline_value'])} = {ratio}{spread}"
    )


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.2f}"
