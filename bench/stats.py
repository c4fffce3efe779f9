"""Small statistics helpers: medians with min-max over repeats, percentiles of samples."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def summarize(values: Iterable[float]) -> dict[str, Any]:
    """Median, min, max and count of *values* (``None`` entries are skipped)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The *q*-th percentile (0..100) of already sorted values, nearest-rank method."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), math.ceil(q / 100.0 * len(sorted_values))))
    return float(sorted_values[rank - 1])


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` or ``None`` when either is missing or *b* is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b
