"""Counters, gauges and histograms of one server, exported in Prometheus' text format.

The hot path increments plain integer attributes (a Prometheus ``Counter.inc`` takes a lock
and costs about a microsecond, which is as much as writing a broadcast frame); a custom
collector (prometheus-client) reads them only when ``/metrics`` is scraped.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

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
}

# name -> (help, label name): counters split by a label.
LABELED_COUNTERS: dict[str, tuple[str, str]] = {
    "handshakes_refused_total": ("new connections refused (any transport), by reason", "reason"),
    "disconnect_reasons_total": ("server-initiated disconnect messages, by reason", "reason"),
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
}

HISTOGRAMS: dict[str, str] = {
    "command_seconds": "time to handle one Action Cable command, callbacks included",
    "loop_lag_seconds": "event-loop lag: how late a timer fired",
    "gc_full_pause_seconds": "how long each full garbage collection stopped the process",
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

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        self.labeled: dict[str, dict[str, int]] = {name: {} for name in LABELED_COUNTERS}
        self.histograms: dict[str, Histogram] = {name: Histogram() for name in HISTOGRAMS}
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
        """Record *value* in a histogram."""
        self.histograms[name].observe(value)

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
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

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


def prometheus_text(metrics: Metrics) -> bytes:
    """The metrics in Prometheus' text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics))
    return generate_latest(registry)
