"""The live dashboard (``--dashboard``): a page served by the node at ``/_dashboard`` that
draws connections, handshakes, refusals, loop lag, GC pauses, drain and rebalancing as they
happen, from ``/_dashboard/data`` polled once a second.

The page and its charting library (uPlot, vendored in ``trio_cable/dashboard/vendor``: no CDN,
no build step) carry no data; the data endpoint answers only with the key
(``--dashboard-key``, else the broadcast key), as ``Authorization: Bearer``.  The page keeps
the key in the tab's session storage and asks for it when it has none.

Under ``serve --workers N`` whichever worker answers draws the whole server: the figures of
every live worker added up (:func:`combine`), and each worker's own under ``workers``, which
the page draws one line per worker.

This module builds the answers; the node routes to it.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import Any

from trio_cable.metrics import Metrics

__all__ = ["ASSETS", "asset", "combine", "snapshot"]

#: Path under ``/_dashboard`` -> (file in the package, content type).
ASSETS: dict[str, tuple[str, str]] = {
    "": ("index.html", "text/html; charset=utf-8"),
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "/uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
}

_cache: dict[str, bytes] = {}


def asset(subpath: str) -> tuple[bytes, str] | None:
    """The file served at ``/_dashboard<subpath>`` and its content type, or None."""
    entry = ASSETS.get(subpath)
    if entry is None:
        return None
    name, content_type = entry
    body = _cache.get(name)
    if body is None:
        body = _cache[name] = resources.files("trio_cable").joinpath("dashboard", name).read_bytes()
    return body, content_type


def _window(samples: list[tuple[float, float]]) -> tuple[float, float]:
    """(max, p99) in milliseconds of *samples* (0 when there are none)."""
    values = sorted(value for _, value in samples)
    if not values:
        return 0.0, 0.0
    p99 = values[min(len(values) - 1, int(0.99 * len(values)))]
    return values[-1] * 1000, p99 * 1000


def snapshot(
    metrics: Metrics,
    *,
    node: str,
    draining: bool,
    broker_kind: str,
    broker_connected: bool | None,
    window: float = 1.0,
) -> dict[str, Any]:
    """What the page draws: counters as totals (it computes the rates), gauges now, loop lag
    and GC pauses over the last *window* seconds."""
    since = time.monotonic() - window
    lag_max, lag_p99 = _window(metrics.samples["loop_lag_seconds"].since(since))
    gc_max, _ = _window(metrics.samples["gc_full_pause_seconds"].since(since))

    def gauge(name: str) -> float:
        read = metrics.gauges.get(name)
        return float(read()) if read is not None else 0.0

    return {
        "time": time.time(),
        "node": node,
        "connections": int(gauge("connections")),
        "pending_handshakes": int(gauge("pending_handshakes")),
        "streams": int(gauge("streams")),
        "handshake_rate_limit": gauge("handshake_rate_limit"),
        "draining": draining,
        "accepted": metrics.connections_total,
        "handshakes_failed": metrics.handshakes_failed_total,
        "refused": dict(metrics.labeled["handshakes_refused_total"]),
        "drained": metrics.drained_total,
        "rebalanced": metrics.rebalanced_total,
        "lag_max_ms": round(lag_max, 3),
        "lag_p99_ms": round(lag_p99, 3),
        "gc_pause_max_ms": round(gc_max, 3),
        "broker": {"kind": broker_kind, "connected": broker_connected},
    }


#: Figures of :func:`snapshot` that add up over workers; the others take the worst worker's.
_SUMMED = ("connections", "pending_handshakes", "handshake_rate_limit", "accepted",
           "handshakes_failed", "drained", "rebalanced")  # fmt: skip
_WORST = ("streams", "lag_max_ms", "lag_p99_ms", "gc_pause_max_ms")
#: What the page shows of each worker.
_PER_WORKER = ("worker", "pid", "node", "connections", "accepted", "draining", "lag_max_ms",
               "lag_p99_ms", "gc_pause_max_ms")  # fmt: skip


def combine(own: dict[str, Any], workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole server's dashboard data from every live worker's :func:`snapshot` (each with
    its ``worker`` index and ``pid``; *own*, the answering worker's, gives the time and the
    broker).  Counters and gauges add up, loop lag and GC pauses are the worst worker's, the
    server drains while any worker does; ``workers`` lists each, by index."""
    if not workers:
        return own
    out = dict(own)
    for name in _SUMMED:
        out[name] = sum(w.get(name, 0) for w in workers)
    for name in _WORST:
        out[name] = max(w.get(name, 0) for w in workers)
    refused: dict[str, int] = {}
    for w in workers:
        for reason, count in (w.get("refused") or {}).items():
            refused[reason] = refused.get(reason, 0) + count
    out["refused"] = refused
    out["draining"] = any(w.get("draining") for w in workers)
    out["node"] = f"trio_cable, {len(workers)} worker{'s' if len(workers) != 1 else ''}"
    ordered = sorted(workers, key=lambda w: (w.get("worker", 0), w.get("pid", 0)))
    out["workers"] = [{k: w[k] for k in _PER_WORKER if k in w} for w in ordered]
    return out
