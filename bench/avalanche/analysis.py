"""From a trial's raw data to the figures of one table row."""

from __future__ import annotations

import bisect
import itertools
import math
from typing import Any

_TIMEOUT_ERRORS = ("TooSlowError",)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank; ``nan`` for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


def _rate_peak(samples: list[dict[str, float]], key: str, since: float, until: float) -> float:
    """Highest per-second rate of a cumulative counter between two samples in the window."""
    peak = 0.0
    for a, b in itertools.pairwise(samples):
        if b["t"] < since or a["t"] > until:
            continue
        dt = b["t"] - a["t"]
        if dt > 0:
            peak = max(peak, (b[key] - a[key]) / dt)
    return peak


def client_recovery(client: dict[str, Any], since: float) -> tuple[float | None, float, float]:
    """(time the client was last back to ready after ``since`` or None if it never was,
    when it first stopped being ready after ``since`` or nan, total unready seconds)."""
    down_at: float | None = None
    first_down = math.nan
    back: float | None = None
    downtime = 0.0
    ready = False
    for kind, t, _extra in client["events"]:
        if kind not in ("R", "U"):
            continue
        if t < since:
            ready = kind == "R"
            continue
        if kind == "U" and ready:
            ready = False
            down_at = t
            if math.isnan(first_down):
                first_down = t
        elif kind == "R" and not ready:
            ready = True
            back = t
            if down_at is not None:
                downtime += t - down_at
                down_at = None
    if not ready:
        return None, first_down, math.inf
    return back, first_down, downtime


def message_loss(clients: list[dict[str, Any]], start: dict[str, int] | None,
                 final: dict[str, int],
                 detail: list[dict[str, Any]] | None = None) -> tuple[int, int, int]:  # fmt: skip
    """(messages expected, lost, duplicated) over every subscription.

    Expected are the messages published on each subscribed stream after ``start`` (the
    stream positions at the restart) up to the end; without ``start``, after the first
    message the subscription received.  The first losses are described in *detail*.
    """
    expected = lost = dups = 0
    for client in clients:
        dups += client.get("duplicates", 0)
        for stream, seen in client["seen"].items():
            name = f"room-{stream}"
            last = final.get(name, 0)
            if start is not None:
                first = start.get(name, 0) + 1
            elif seen:
                first = seen[0]
            else:
                continue
            wanted = max(0, last - first + 1)
            got = sum(1 for s in seen if first <= s <= last)
            expected += wanted
            lost += wanted - got
            if wanted > got and detail is not None and len(detail) < 20:
                have = set(seen)
                missing = [s for s in range(first, last + 1) if s not in have]
                detail.append({"client": client.get("i"), "stream": name, "first": first,
                               "last": last, "missing": missing[:10]})  # fmt: skip
    return expected, lost, dups


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """The figures of one row (times in seconds from the restart, or from the start)."""
    clients = raw["clients"]
    n = raw["spec"]["clients"]
    since = raw["t_restart"] if raw["t_restart"] is not None else raw["t0"]
    samples = raw["server"].get("samples", [])
    until = raw["t_recovered"]
    backs: list[float] = []
    downs: list[float] = []
    attempts = failed = refused = timeouts = stale = 0
    max_inflight = 0
    gave_up = 0
    inits: list[float] = []  # no restart: first connect attempt to every subscription confirmed
    for client in clients:
        back, _first_down, downtime = client_recovery(client, since)
        if raw["t_restart"] is None:
            # No restart: when did the client first become ready?
            firsts = [t for kind, t, _ in client["events"] if kind == "R"]
            back = firsts[0] if firsts else None
            downtime = (back - since) if back is not None else math.inf
            starts = [t for kind, t, _ in client["events"] if kind == "c"]
            inits.append(back - starts[0] if back is not None and starts else math.inf)
        backs.append(math.inf if back is None else back - since)
        downs.append(downtime)
        max_inflight = max(max_inflight, client["max_inflight"])
        gave_up += client["gave_up"]
        for kind, t, extra in client["events"]:
            if t < since:
                continue
            if kind == "c":
                attempts += 1
            elif kind == "f":
                failed += 1
                if extra == 503:
                    refused += 1
                elif extra in _TIMEOUT_ERRORS:
                    timeouts += 1
            elif kind == "t":
                timeouts += 1
            elif kind == "s":
                stale += 1
    missing = n - len(clients)
    backs.extend([math.inf] * missing)
    lost_detail: list[dict[str, Any]] = []
    expected, lost, dups = message_loss(
        clients, raw.get("restart_seqs"), raw["final_seqs"], lost_detail
    )
    lags = [lag for t, lag in raw["server"].get("lags", []) if since <= t <= until]
    gc_pauses = [d for t, d in raw["server"].get("gc_pauses", []) if since <= t <= until]
    disrupted = sum(1 for c in clients if any(k == "U" and t >= since for k, t, _ in c["events"]))
    db_samples = samples
    rpc: dict[str, Any] = {}
    if raw.get("app") is not None:
        # RPC mode: the database is the application's, and what reached it is counted there.
        db_samples = raw["app"]["samples"]
        rpc = rpc_figures(raw, since, until)
    return {
        "clients": n,
        "back_99": percentile(backs, 0.99),
        "back_100": max(backs) if backs else math.nan,
        "back_50": percentile(backs, 0.50),
        "downtime_p50": percentile(downs, 0.50),
        "downtime_p99": percentile(downs, 0.99),
        "init_p50": percentile(inits, 0.50),
        "init_p99": percentile(inits, 0.99),
        "never_back": sum(1 for b in backs if math.isinf(b)),
        "peak_handshakes_s": _rate_peak(samples, "handshakes", since, until),
        "peak_commands_s": _rate_peak(samples, "commands", since, until),
        "lag_p99_ms": 1000 * percentile(lags, 0.99) if lags else math.nan,
        "lag_max_ms": 1000 * max(lags) if lags else math.nan,
        "db_queue_peak": max(
            (s["db_waiting_peak"] for s in db_samples if since <= s["t"] <= until), default=0.0
        ),
        "db_calls": (
            (db_samples[-1]["db_calls"] - _at(db_samples, since, "db_calls")) if db_samples else 0
        ),
        **rpc,
        "attempts": attempts,
        "retries": max(0, attempts - (disrupted if raw["t_restart"] is not None else n)),
        "failed": failed,
        "refused": refused,
        "timeouts": timeouts + stale,
        "gave_up": gave_up,
        "max_inflight": max_inflight,
        "expected": expected,
        "lost": lost,
        "lost_detail": lost_detail,
        "duplicated": dups,
        "recovered": raw["recovered"],
        **loadgen_health(raw, since, until),
        "gc_max_ms": 1000 * max(gc_pauses, default=0.0),
    }


_APP_CALLS = ("calls_connect", "calls_command", "calls_disconnect")


def rpc_figures(raw: dict[str, Any], since: float, until: float) -> dict[str, Any]:
    """RPC mode: the calls that reached the application from *since* to the end of the run
    (disconnect calls trail the recovery), their busiest second, and what the servers' RPC
    executors did: refusals (breaker, no slot in time) and the concurrency limit's range."""
    app = raw["app"]["samples"]
    for s in app:
        s["calls"] = sum(s[k] for k in _APP_CALLS)
    end = app[-1]["t"] if app else until
    out: dict[str, Any] = {
        f"app_{k[6:]}s": (app[-1][k] - _at(app, since, k)) if app else 0 for k in _APP_CALLS
    }
    out["app_calls"] = (app[-1]["calls"] - _at(app, since, "calls")) if app else 0
    out["app_calls_peak_s"] = _rate_peak_per_second(app, "calls", since, end)
    samples = raw["server"].get("samples", [])
    window = [s for s in samples if since <= s["t"] <= until]
    out["rpc_refusals"] = (samples[-1]["rpc_refusals"] - _at(samples, since, "rpc_refusals")
                           if samples else 0)  # fmt: skip
    limits = [s["rpc_limit"] for s in window if s["rpc_limit"] > 0]
    out["rpc_limit_min"] = min(limits, default=math.nan)
    out["rpc_limit_max"] = max(limits, default=math.nan)
    out["rpc_queue_peak"] = max((s["rpc_queued"] for s in window), default=0.0)
    return out


def _rate_peak_per_second(samples: list[dict[str, float]], key: str, since: float,
                          until: float) -> float:  # fmt: skip
    """Highest count of a cumulative counter over one second (samples 0.25 s apart: a
    sliding one-second window, not the noisier rate between two neighbours)."""
    peak = 0.0
    j = 0
    for i, b in enumerate(samples):
        if b["t"] < since or b["t"] > until:
            continue
        while j < i and b["t"] - samples[j]["t"] > 1.0 + 1e-6:
            j += 1
        a = samples[j]
        if b["t"] - a["t"] > 0:
            peak = max(peak, (b[key] - a[key]) / max(1.0, b["t"] - a["t"]))
    return peak


def loadgen_health(raw: dict[str, Any], since: float, until: float) -> dict[str, float]:
    """Was the load generator keeping up?  Its CPU seconds per second over each whole second
    (summed over the generator processes, which share one core: 1.0 is that core saturated)
    and its worst timer lateness.  Near 1.0 the clients' own core is the bottleneck, and their
    timeouts say little of the server."""
    by_gen: dict[int, list[tuple[float, float]]] = {}
    lag_max = 0.0
    for t, k, cpu, lag in raw.get("gen_timeline", []):
        by_gen.setdefault(k, []).append((t, cpu))
        if since <= t <= until:
            lag_max = max(lag_max, lag)
    busy: list[float] = []
    for second in range(math.ceil(since), math.floor(until)):
        busy.append(sum(_cpu_at(s, second + 1) - _cpu_at(s, second) for s in by_gen.values()))
    busy.sort()
    return {
        "loadgen_cpu_peak": busy[-1] if busy else math.nan,
        "loadgen_cpu_p50": percentile(busy, 0.5) if busy else math.nan,
        "loadgen_lag_max_ms": 1000 * lag_max,
    }


def _cpu_at(points: list[tuple[float, float]], t: float) -> float:
    """A process's CPU seconds at time ``t``, interpolated between its status lines."""
    i = bisect.bisect_left(points, (t, -math.inf))
    if i == 0:
        return points[0][1] if points else 0.0
    if i == len(points):
        return points[-1][1]
    (t0, c0), (t1, c1) = points[i - 1], points[i]
    return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1


def _at(samples: list[dict[str, float]], t: float, key: str) -> float:
    """A cumulative counter's value at the last sample before ``t``."""
    value = samples[0][key] if samples else 0.0
    for s in samples:
        if s["t"] > t:
            break
        value = s[key]
    return value


def series(raw: dict[str, Any]) -> dict[str, list[float]]:
    """Time series for the plots, time relative to the restart (or the start)."""
    since = raw["t_restart"] if raw["t_restart"] is not None else raw["t0"]
    samples = raw["server"].get("samples", [])
    t, conns, hs, lag = [], [], [], []
    for a, b in itertools.pairwise(samples):
        dt = b["t"] - a["t"]
        if dt <= 0:
            continue
        t.append(b["t"] - since)
        conns.append(b["connections"])
        hs.append((b["handshakes"] - a["handshakes"]) / dt)
        lag.append(1000 * b["lag_max"])
    ready_t = [p[0] - since for p in raw["timeline"]]
    ready = [float(p[1]) for p in raw["timeline"]]
    gc_t = [t - since for t, _ in raw["server"].get("gc_pauses", [])]
    gc_ms = [1000 * d for _, d in raw["server"].get("gc_pauses", [])]
    out = {"t": t, "connections": conns, "handshakes": hs, "lag_ms": lag,
           "ready_t": ready_t, "ready": ready, "gc_t": gc_t, "gc_ms": gc_ms}  # fmt: skip
    if raw.get("app") is not None:
        app_t, app_calls = [], []
        for a, b in itertools.pairwise(raw["app"]["samples"]):
            dt = b["t"] - a["t"]
            if dt > 0:
                app_t.append(b["t"] - since)
                app_calls.append(sum(b[k] - a[k] for k in _APP_CALLS) / dt)
        out["app_t"], out["app_calls"] = app_t, app_calls
    return out
