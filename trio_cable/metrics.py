"""Counters, gauges and histograms of one server, exported in Prometheus' text format.

The hot path increments plain integer attributes (a Prometheus ``Counter.inc`` takes a lock
and costs about a microsecond, which is as much as writing a broadcast frame); a custom
collector (prometheus-client) reads them only when ``/metrics`` is scraped.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

# name -> help.  Counters are monotonically increasing totals.
COUNTERS: dict[str, str] = {
    "connections_total": "connections accepted (WebSockets, SSE streams, long-polling sessions)",
    "handshakes_failed_total": "HTTP requests that did not become a WebSocket (any reason)",
    "disconnects_total": "connections closed, for any reason",
    "unauthorized_total": "connections refused by JWT or the connect callback",
    "commands_total": "Action Cable commands received",
    "invalid_requests_total": "malformed frames or commands",
    "subscriptions_total": "subscriptions confirmed",
    "subscriptions_rejected_total": "subscriptions rejected",
    "broadcasts_total": "publications fanned out by this node",
    "broadcast_frames_total": "broadcast frames written to clients",
    "coalesced_frames_total": "frames that shared a send with an earlier frame (corked broadcasts)",
    "transmissions_total": "messages sent to single clients",
    "too_slow_total": "clients disconnected because their send queue overflowed",
    "callback_errors_total": "application callbacks that raised",
    "drained_total": "connections closed by a slow drain",
    "sessions_resumed_total": "sessions restored from the session cache",
    "sessions_not_found_total": "restore requests whose session was gone or expired",
    "sessions_too_large_total": "sessions not kept because they were over session_max_size",
    "history_served_total": "history requests answered with confirm_history",
    "history_rejected_total": "history requests answered with reject_history",
    "rate_limited_commands_total": "commands refused by the per-connection rate limit",
    "remote_disconnects_total": "connections closed by a remote disconnect",
    "admission_decreases_total": "times adaptive admission lowered the limits",
    "gc_full_collections_total": "full (generation 2) garbage collections in this process",
    "sse_connections_total": "Server-Sent Events streams opened",
    "long_poll_sessions_total": "long-polling sessions opened",
    "long_poll_requests_total": "long-polling requests served",
    "long_poll_stale_requests_total": "polls naming a session that is gone (answered 401)",
    "long_poll_timeouts_total": "long-polling sessions ended because no poll came",
    "compressed_frames_total": "frames sent deflated (permessage-deflate), each built once",
    "compression_saved_bytes_total": (
        "bytes deflate saved, per frame built (a broadcast frame is built once per group)"
    ),
    "compressed_messages_total": "compressed client messages inflated",
    "rebalanced_total": "connections handed on to other nodes by rebalancing",
    "whispers_total": "whispers broadcast to their stream",
    "whispers_ignored_total": "whispers ignored: the subscription may not whisper",
    "presence_commands_total": "presence join, leave and info commands handled",
    "presence_refused_total": "presence commands refused (no presence stream, another id)",
    "presence_events_total": "presence join/leave events fanned out by this node",
    "presence_events_coalesced_total": "presence events cancelled or merged within a window",
    "rpc_disconnects_skipped_total": "disconnect RPC calls not made (unseen by the application)",
    "rpc_limit_decreases_total": "times the adaptive RPC concurrency limit came down",
    "rpc_limit_increases_total": "times the adaptive RPC concurrency limit went up",
    "rpc_breaker_trips_total": "times the RPC circuit breaker opened",
}

# name -> (help, label name): counters split by a label.
LABELED_COUNTERS: dict[str, tuple[str, str]] = {
    "handshakes_refused_total": ("new connections refused (any transport), by reason", "reason"),
    "disconnect_reasons_total": ("server-initiated disconnect messages, by reason", "reason"),
    "rpc_calls_total": ("RPC requests sent to the application, by method", "method"),
    "rpc_errors_total": ("RPC requests that got no usable answer, by reason", "reason"),
    "rpc_retries_total": ("RPC requests sent again (never applied), by reason", "reason"),
    "rpc_refusals_total": ("RPC calls refused without a request (breaker, deadline)", "method"),
    "rpc_ignored_total": ("fields of RPC answers this server does not act on yet", "field"),
}

GAUGES: dict[str, str] = {
    "connections": "open connections (WebSocket, SSE, long-polling sessions)",
    "sse_connections": "open Server-Sent Events streams",
    "long_poll_sessions": "open long-polling sessions",
    "streams": "streams with at least one local subscriber",
    "send_queue_bytes": "bytes waiting in per-connection send queues",
    "partial_message_bytes": "bytes held by unfinished client messages, all connections",
    "pending_fanouts": "broadcasts to big audiences waiting for the fan-out task",
    "gc_frozen_objects": "objects moved out of the collector's way (gc.freeze) after full passes",
    "draining": "1 while the node is draining",
    "pending_handshakes": "connections still in their HTTP handshake",
    "handshake_rate_limit": "handshakes per second admitted now (adaptive)",
    "callback_concurrency_limit": "application callbacks allowed at once now (adaptive)",
    "rebalance_peak_per_second": "most rebalancing disconnects within any one second so far",
    "rpc_concurrency_limit": "RPC calls allowed in flight now (adaptive)",
    "rpc_in_flight": "RPC calls in flight now",
    "rpc_queued": "RPC calls waiting for a slot under the limit",
    "rpc_breaker_state": "RPC circuit breaker: 0 closed, 1 half-open, 2 open",
    "rpc_pending_disconnects": "disconnect RPC calls queued",
}

HISTOGRAMS: dict[str, str] = {
    "command_seconds": "time to handle one Action Cable command, callbacks included",
    "loop_lag_seconds": "event-loop lag: how late a timer fired",
    "gc_full_pause_seconds": "how long each full garbage collection stopped the process",
    "rpc_call_seconds": "time of one RPC request, from sending to its answer",
}

_DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """A cumulative-bucket histogram cheap enough for the hot path (one bisect, no lock)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = _DEFAULT_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def quantile(self, q: float) -> float:
        """Upper bound of the bucket holding the *q*-quantile (``inf`` past the last bound)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            seen += n
            if seen >= rank:
                return bound
        return float("inf")

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(bound), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


#: Recent samples kept per sampled histogram: at one loop-lag probe every 50 ms, 4,096 are
#: the last 3.4 minutes, enough for a benchmark's 60 s window read once at its end.
SAMPLES_KEPT = 4096
#: The histograms whose recent raw samples are also kept (``/metrics/samples``): a histogram
#: says how many lags fell in 5-10 ms, a benchmark wants the p99 and the max to the ms.
SAMPLED = ("loop_lag_seconds", "gc_full_pause_seconds")


class Samples:
    """The last :data:`SAMPLES_KEPT` values of a measurement, each with the
    :func:`time.monotonic` time it was taken (a system-wide clock on Linux, so another
    process can cut a window out of them)."""

    __slots__ = ("_items",)

    def __init__(self, kept: int = SAMPLES_KEPT) -> None:
        self._items: deque[tuple[float, float]] = deque(maxlen=kept)

    def add(self, value: float) -> None:
        self._items.append((time.monotonic(), value))

    def since(self, start: float = 0.0) -> list[tuple[float, float]]:
        """The samples taken at *start* or later, oldest first."""
        return [item for item in self._items if item[0] >= start]


class Metrics:
    """Plain counters; ``gauges`` maps a gauge name to a function read at scrape time."""

    # One attribute per entry of COUNTERS (checked below), typed for mypy.
    connections_total: int
    handshakes_failed_total: int
    disconnects_total: int
    unauthorized_total: int
    commands_total: int
    invalid_requests_total: int
    subscriptions_total: int
    subscriptions_rejected_total: int
    broadcasts_total: int
    broadcast_frames_total: int
    coalesced_frames_total: int
    transmissions_total: int
    too_slow_total: int
    callback_errors_total: int
    drained_total: int
    sessions_resumed_total: int
    sessions_not_found_total: int
    sessions_too_large_total: int
    history_served_total: int
    history_rejected_total: int
    rate_limited_commands_total: int
    remote_disconnects_total: int
    admission_decreases_total: int
    gc_full_collections_total: int
    sse_connections_total: int
    long_poll_sessions_total: int
    long_poll_requests_total: int
    long_poll_stale_requests_total: int
    long_poll_timeouts_total: int
    compressed_frames_total: int
    compression_saved_bytes_total: int
    compressed_messages_total: int
    rebalanced_total: int
    whispers_total: int
    whispers_ignored_total: int
    presence_commands_total: int
    presence_refused_total: int
    presence_events_total: int
    presence_events_coalesced_total: int
    rpc_disconnects_skipped_total: int
    rpc_limit_decreases_total: int
    rpc_limit_increases_total: int
    rpc_breaker_trips_total: int

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        self.labeled: dict[str, dict[str, int]] = {name: {} for name in LABELED_COUNTERS}
        self.histograms: dict[str, Histogram] = {name: Histogram() for name in HISTOGRAMS}
        #: Recent raw samples of the :data:`SAMPLED` histograms (rare: 20 a second at most).
        self.samples: dict[str, Samples] = {name: Samples() for name in SAMPLED}
        #: The histogram every command is timed in, as an attribute: it is observed on the
        #: path every message takes, where a dict lookup and a call less are measurable.
        self.command_seconds = self.histograms["command_seconds"]
        self.gauges: dict[str, Callable[[], float]] = {}
        #: Counters kept elsewhere (e.g. a broker's own statistics): name -> reader.
        self.external_counters: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, amount: int = 1) -> None:
        """Add *amount* to a counter (a convenience for code that is not on the hot path)."""
        setattr(self, name, getattr(self, name) + amount)

    def inc_labeled(self, name: str, label: str, amount: int = 1) -> None:
        """Add *amount* to the *label* series of a labeled counter."""
        series = self.labeled[name]
        series[label] = series.get(label, 0) + amount

    def observe(self, name: str, value: float) -> None:
        """Record *value* in a histogram (and among its recent samples, if it keeps them)."""
        self.histograms[name].observe(value)
        samples = self.samples.get(name)
        if samples is not None:
            samples.add(value)

    def recent(self, start: float = 0.0) -> dict[str, object]:
        """The recent samples of every :data:`SAMPLED` histogram taken since *start*
        (:func:`time.monotonic`), as JSON-ready data: ``{"now": t, name: [[t, value], ...]}``."""
        out: dict[str, object] = {"now": time.monotonic()}
        for name, samples in self.samples.items():
            out[name] = [list(item) for item in samples.since(start)]
        return out

    def value(self, name: str) -> float:
        """Current value of a counter or gauge."""
        if name in self.gauges:
            return self.gauges[name]()
        return float(getattr(self, name))

    def snapshot(self) -> dict[str, float]:
        """Every counter and gauge (labeled series as ``name{label}``), for tests and logs."""
        out = {name: float(getattr(self, name)) for name in COUNTERS}
        for name, series in self.labeled.items():
            for label, count in series.items():
                out[f"{name}{{{label}}}"] = float(count)
        out.update({name: fn() for name, fn in self.gauges.items()})
        out.update({name: fn() for name, fn in self.external_counters.items()})
        return out


assert set(Metrics.__annotations__) == set(COUNTERS), "Metrics attributes and COUNTERS differ"


class _Collector(Collector):
    def __init__(self, metrics: Metrics, extra: Iterable[Metric] = ()) -> None:
        self._metrics = metrics
        self._extra = list(extra)

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        for name, help_text in COUNTERS.items():
            # prometheus_client appends "_total" itself.
            yield CounterMetricFamily(
                f"trio_cable_{name.removesuffix('_total')}", help_text, value=getattr(m, name)
            )
        for name, (help_text, label) in LABELED_COUNTERS.items():
            family = CounterMetricFamily(
                f"trio_cable_{name.removesuffix('_total')}", help_text, labels=[label]
            )
            for value, count in sorted(m.labeled[name].items()):
                family.add_metric([value], count)
            yield family
        for name, read in sorted(m.external_counters.items()):
            yield CounterMetricFamily(
                f"trio_cable_{name.removesuffix('_total')}", f"{name} (broker)", value=read()
            )
        for name, help_text in GAUGES.items():
            fn = m.gauges.get(name)
            if fn is not None:
                yield GaugeMetricFamily(f"trio_cable_{name}", help_text, value=fn())
        for name, help_text in HISTOGRAMS.items():
            hist = m.histograms[name]
            yield HistogramMetricFamily(
                f"trio_cable_{name}", help_text, buckets=hist.cumulative(), sum_value=hist.sum
            )
        yield from self._extra


def prometheus_text(metrics: Metrics, extra: Iterable[Metric] = ()) -> bytes:
    """The metrics in Prometheus' text exposition format (and the families *extra*)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics, extra))
    return generate_latest(registry)


# -- one server of several processes ----------------------------------------------------------
#
# A worker exports its metrics as two flat dicts of numbers (JSON-friendly): ``counters``,
# everything that only grows (plain, labeled and broker counters, and the histograms' bucket
# counts, sums and counts), and ``gauges``, what is true now.  Flat keys let anything that
# can add numbers by name merge them (the Redis broker does it in Lua for departed workers).

#: Gauges whose whole-server value is the largest worker's, not the sum: a stream watched on
#: every worker is one stream (the max is a lower bound of the distinct count), and the
#: server is draining when any worker is.
MAXED_GAUGES = frozenset({"streams", "draining", "rebalance_peak_per_second"})


def export(metrics: Metrics) -> tuple[dict[str, float], dict[str, float]]:
    """(counters, gauges) of *metrics* as flat dicts: see :func:`from_export`."""
    counters: dict[str, float] = {f"c:{name}": float(getattr(metrics, name)) for name in COUNTERS}
    for name, series in metrics.labeled.items():
        for label, count in series.items():
            counters[f"l:{name}:{label}"] = float(count)
    for name, read in metrics.external_counters.items():
        counters[f"x:{name}"] = read()
    for name, hist in metrics.histograms.items():
        for index, count in enumerate(hist.counts):
            if count:
                counters[f"h:{name}:{index}"] = float(count)
        counters[f"hs:{name}"] = hist.sum
        counters[f"hc:{name}"] = float(hist.count)
    gauges = {name: fn() for name, fn in metrics.gauges.items()}
    return counters, gauges


def add_counters(total: dict[str, float], more: dict[str, float]) -> None:
    """Add the flat counters *more* into *total*."""
    for key, value in more.items():
        total[key] = total.get(key, 0.0) + value


def merge_gauges(snapshots: Sequence[dict[str, float]]) -> dict[str, float]:
    """The whole server's gauges: summed, except :data:`MAXED_GAUGES` (the largest)."""
    out: dict[str, float] = {}
    for gauges in snapshots:
        for name, value in gauges.items():
            if name not in out:
                out[name] = value
            elif name in MAXED_GAUGES:
                out[name] = max(out[name], value)
            else:
                out[name] += value
    return out


def from_export(counters: dict[str, float], gauges: dict[str, float]) -> Metrics:
    """A :class:`Metrics` holding exported (usually merged) figures, for
    :func:`prometheus_text`.  Keys it does not know (a newer worker's) are ignored."""
    metrics = Metrics()
    for key, value in counters.items():
        kind, _, rest = key.partition(":")
        if kind == "c" and rest in COUNTERS:
            setattr(metrics, rest, int(value))
        elif kind == "l":
            name, _, label = rest.partition(":")
            if name in metrics.labeled:
                metrics.labeled[name][label] = int(value)
        elif kind == "x":
            metrics.external_counters[rest] = _constant(value)
        elif kind == "h":
            name, _, index = rest.rpartition(":")
            hist = metrics.histograms.get(name)
            if hist is not None and index.isdigit() and int(index) < len(hist.counts):
                hist.counts[int(index)] = int(value)
        elif kind == "hs" and rest in metrics.histograms:
            metrics.histograms[rest].sum = value
        elif kind == "hc" and rest in metrics.histograms:
            metrics.histograms[rest].count = int(value)
    metrics.gauges = {name: _constant(value) for name, value in gauges.items()}
    return metrics


def _constant(value: float) -> Callable[[], float]:
    return lambda: value
