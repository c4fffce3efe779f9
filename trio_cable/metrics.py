"""Counters and gauges of one server, exported in Prometheus' text format.

The hot path increments plain integer attributes (a Prometheus ``Counter.inc`` takes a lock
and costs about a microsecond, which is as much as writing a broadcast frame); a custom
collector reads the attributes only when ``/metrics`` is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# name -> help.  Counters are monotonically increasing totals.
COUNTERS: dict[str, str] = {
    "connections_total": "WebSocket connections accepted (after the handshake)",
    "handshakes_failed_total": "HTTP requests refused before a WebSocket was opened",
    "disconnects_total": "connections closed, for any reason",
    "unauthorized_total": "connections refused by JWT or the connect callback",
    "commands_total": "Action Cable commands received",
    "invalid_requests_total": "malformed frames or commands",
    "subscriptions_total": "subscriptions confirmed",
    "subscriptions_rejected_total": "subscriptions rejected",
    "broadcasts_total": "publications fanned out by this node",
    "broadcast_frames_total": "broadcast frames written to clients",
    "transmissions_total": "messages sent to single clients",
    "too_slow_total": "clients disconnected because their send queue overflowed",
    "callback_errors_total": "application callbacks that raised",
}

GAUGES: dict[str, str] = {
    "connections": "open WebSocket connections",
    "streams": "streams with at least one local subscriber",
    "send_queue_bytes": "bytes waiting in per-connection send queues",
}


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
    transmissions_total: int
    too_slow_total: int
    callback_errors_total: int

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        self.gauges: dict[str, Callable[[], float]] = {}

    def inc(self, name: str, amount: int = 1) -> None:
        """Add *amount* to a counter (a convenience for code that is not on the hot path)."""
        setattr(self, name, getattr(self, name) + amount)

    def value(self, name: str) -> float:
        """Current value of a counter or gauge."""
        if name in self.gauges:
            return self.gauges[name]()
        return float(getattr(self, name))

    def snapshot(self) -> dict[str, float]:
        """Every counter and gauge, for ``/health`` and tests."""
        out = {name: float(getattr(self, name)) for name in COUNTERS}
        out.update({name: fn() for name, fn in self.gauges.items()})
        return out


assert set(Metrics.__annotations__) == set(COUNTERS), "Metrics attributes and COUNTERS differ"


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        for name, help_text in COUNTERS.items():
            # prometheus_client appends "_total" itself.
            yield CounterMetricFamily(
                f"trio_cable_{name.removesuffix('_total')}",
                help_text,
                value=getattr(self._metrics, name),
            )
        for name, help_text in GAUGES.items():
            fn = self._metrics.gauges.get(name)
            if fn is not None:
                yield GaugeMetricFamily(f"trio_cable_{name}", help_text, value=fn())


def prometheus_text(metrics: Metrics) -> bytes:
    """The metrics in Prometheus' text exposition format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(metrics))
    return generate_latest(registry)
