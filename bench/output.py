"""Where a harness writes: a directory the user names, never over committed results by accident.

Every harness takes ``--out DIR`` (default: a fresh ``./bench-out/<time>-<bench>`` under the
current directory) and ``--update-results`` (write into the committed results in ``bench/``
instead, as the write-ups are made).  ``--update-results`` is refused for quick runs: quick
results never replace full ones.  ``--out`` may not point into ``bench/`` (where the committed
results live; the git-ignored ``bench/out/`` aside).
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
#: The committed results of the comparative suite, rollout, soak and fuzz.
RESULTS_DIR = BENCH_DIR / "results"
PLOTS_DIR = BENCH_DIR / "plots"
PROFILES_DIR = BENCH_DIR / "profiles"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
AVALANCHE_RESULTS_DIR = BENCH_DIR / "avalanche" / "results"
_SCRATCH = BENCH_DIR / "out"  # git-ignored


class UsageError(Exception):
    """A command line that asks for something the harness refuses (exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--out DIR`` and ``--update-results``."""
    parser.add_argument(
        "--out", type=Path, metavar="DIR",
        help="directory for the results (default: a fresh ./bench-out/<time>-<bench>)",
    )  # fmt: skip
    parser.add_argument(
        "--update-results", action="store_true",
        help="write into the committed results in bench/ instead (refused for quick runs)",
    )  # fmt: skip


def fresh_dir(bench: str, base: Path | None = None) -> Path:
    """A new, empty ``<base>/bench-out/<YYYYmmdd-HHMMSS>-<bench>[-N]`` (base: the current
    directory)."""
    root = (base or Path.cwd()) / "bench-out"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in itertools.count(1):
        path = root / (f"{stamp}-{bench}" if n == 1 else f"{stamp}-{bench}-{n}")
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return path
    raise AssertionError("unreachable")


def inside_bench(path: Path) -> bool:
    """Whether *path* is ``bench/`` or below it (the git-ignored ``bench/out/`` aside)."""
    resolved = path.resolve()
    if resolved == _SCRATCH or _SCRATCH in resolved.parents:
        return False
    return resolved == BENCH_DIR or BENCH_DIR in resolved.parents


def check(args: argparse.Namespace, *, quick: bool, why_quick: str = "") -> None:
    """Raise :class:`UsageError` for a refused ``--out`` / ``--update-results``."""
    if args.update_results:
        if quick:
            raise UsageError(
                f"--update-results is refused for {why_quick or 'a --quick run'}: quick "
                "results never replace the committed full ones (use --out DIR)"
            )
        if args.out is not None:
            raise UsageError("--out and --update-results exclude each other")
    elif args.out is not None and inside_bench(args.out):
        raise UsageError(
            f"--out {args.out} is inside bench/, where the committed results live: name "
            "another directory, or pass --update-results to replace the committed results"
        )


def choose(
    args: argparse.Namespace, bench: str, *, quick: bool, why_quick: str = ""
) -> Path | None:
    """The directory to write to, created; ``None`` means the committed results
    (``--update-results``).  Raises :class:`UsageError` for a refused combination (see
    :func:`check`, which a harness calls first, before it checks its dependencies)."""
    check(args, quick=quick, why_quick=why_quick)
    if args.update_results:
        return None
    if args.out is None:
        return fresh_dir(bench)
    args.out.mkdir(parents=True, exist_ok=True)
    return Path(args.out).resolve()


def files(out: Path | None, name: str) -> tuple[Path, Path, Path]:
    """``(name.json, name.md, name.png)`` of a harness writing to *out*: ``DIR/name.json``,
    ``DIR/name.md`` and ``DIR/plots/name.png``; ``None``: the committed ``bench/results/``
    and ``bench/plots/``."""
    results, plots = (RESULTS_DIR, PLOTS_DIR) if out is None else (out, out / "plots")
    return results / f"{name}.json", results / f"{name}.md", plots / f"{name}.png"


def sizes(args: argparse.Namespace, full: dict[str, Any], quick: dict[str, Any], noun: str) -> bool:
    """For a timed harness (soak, fuzz): set every option of *full* that the command line left
    at ``None`` (from *quick* with ``--quick``, else from *full*), check ``--out`` /
    ``--update-results``, and return whether the run is quick: ``--quick``, or shorter than
    ``full["minutes"]``."""
    chosen = quick if args.quick else full
    for key, value in full.items():
        if getattr(args, key) is None:
            setattr(args, key, chosen.get(key, value))
    is_quick = bool(args.quick or args.minutes < full["minutes"])
    why = f"a {args.minutes:g}-minute {noun} (a full one is {full['minutes']:g})"
    check(args, quick=is_quick, why_quick=why)
    return is_quick
