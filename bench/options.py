"""Options shared by every benchmark of the comparative suite."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.output import PLOTS_DIR, PROFILES_DIR, RESULTS_DIR, RESULTS_MD


@dataclass
class Options:
    """``--quick``, ``--repeats``, ``--targets``, the baselines, where results go, and the
    scale benchmark's ``--sizes`` and ``--duration``."""

    quick: bool = False
    repeats: int = 3
    targets: list[str] = field(default_factory=list)  # empty: the benchmark's default set
    baselines: list[str] = field(default_factory=list)  # short shas (bench.baseline)
    results_dir: Path = RESULTS_DIR
    plots_dir: Path = PLOTS_DIR
    profiles_dir: Path = PROFILES_DIR
    results_md: Path = RESULTS_MD
    progress: bool = True
    sizes: list[int] = field(default_factory=list)  # scale: connection counts (empty: default)
    duration: float | None = None  # scale: seconds per phase (None: default)

    def write_to(self, out: Path | None) -> None:
        """Results, plots, profiles and RESULTS.md go to *out* (``None``: the committed places
        in bench/, as by default)."""
        if out is not None:
            self.results_dir, self.plots_dir = out, out / "plots"
            self.profiles_dir, self.results_md = out / "profiles", out / "RESULTS.md"

    def pick(self, default: list[str]) -> list[str]:
        """The targets to run: the requested ones that this benchmark supports (a
        ``<target>@<sha>`` baseline when ``<target>`` is), each trio_cable target followed by
        its baselines."""
        if self.targets:
            chosen = [t for t in self.targets if t.partition("@")[0] in default]
            if not chosen:
                # Not an error (`all --targets X` runs X where it can), but never silent: a
                # run with nothing to compare would otherwise pass for a result.
                print(
                    f"python -m bench: none of --targets {','.join(self.targets)} runs here "
                    f"(the targets here: {', '.join(default)})",
                    file=sys.stderr,
                )
        else:
            chosen = list(default)
        out: list[str] = []
        for name in chosen:
            if name not in out:
                out.append(name)
            if name.startswith("trio_cable") and "@" not in name:
                out += [f"{name}@{b}" for b in self.baselines if f"{name}@{b}" not in out]
        return out
