"""Options shared by every benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
PLOTS_DIR = Path(__file__).parent / "plots"


@dataclass
class Options:
    """``--quick``, ``--repeats``, ``--targets`` and where results go."""

    quick: bool = False
    repeats: int = 3
    targets: list[str] = field(default_factory=list)  # empty: the benchmark's default set
    results_dir: Path = RESULTS_DIR
    plots_dir: Path = PLOTS_DIR
    progress: bool = True

    def pick(self, default: list[str]) -> list[str]:
        """The targets to run: the requested ones that this benchmark supports."""
        if not self.targets:
            return default
        return [t for t in self.targets if t in default]
