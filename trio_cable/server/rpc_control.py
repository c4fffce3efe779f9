"""Overload control for calls to an RPC application: an adaptive concurrency limit, a circuit
breaker and retry timing.  Sans I/O: every method takes the time, nothing sleeps or sends, so
each rule is tested alone (``tests/test_rpc_control.py``) and the executor only wires them.

* :class:`AdaptiveLimit` is AIMD on the application's own signals.  It comes down
  multiplicatively when the application says it is overloaded (429 or 503, a call that timed
  out) or when its latency rises well above its usual latency, at most once per
  round trip (the calls in flight when the first signal came are all about to say the same
  thing, and counting each of them would collapse the limit to one).  It goes up additively,
  by about one per limit's worth of successful calls, and only while calls wait for a slot:
  a limit nobody is queueing for proves nothing about the application.
* :class:`CircuitBreaker` turns a dead application into fast refusals.  It opens after a run
  of failed calls, or a mostly failing window; while open nothing is sent and callers are told
  when to come back; after a cool-down a few probe calls decide whether it closes again.
* :func:`retry_delay` is the jittered wait before a retry, at least what ``Retry-After``
  asked for.
"""

from __future__ import annotations

import enum
import math
import random

__all__ = ["AdaptiveLimit", "BreakerState", "CircuitBreaker", "parse_retry_after", "retry_delay"]

# Jitter needs independence between callers, not cryptographic randomness.
_RNG = random.Random()


class AdaptiveLimit:
    """How many calls may be in flight to the application now (AIMD, see the module)."""

    __slots__ = (
        "_baseline",
        "_last_decrease",
        "_last_sample",
        "_smoothed",
        "backoff",
        "decreases",
        "increases",
        "latency_backoff",
        "latency_floor",
        "limit",
        "maximum",
        "minimum",
        "tolerance",
        "window",
    )

    def __init__(
        self,
        initial: int,
        *,
        minimum: int = 1,
        maximum: int = 256,
        backoff: float = 0.5,
        latency_backoff: float = 0.9,
        tolerance: float = 2.0,
        latency_floor: float = 0.010,
        window: float = 10.0,
    ) -> None:
        """*backoff* multiplies the limit on an explicit overload signal (429, 503, timeout),
        *latency_backoff* when the recent latency (a fast moving average) rises past
        *tolerance* times the usual latency plus *latency_floor* (so that 0.3 ms becoming
        3 ms is not mistaken for overload).  The usual latency is a slow, time-weighted
        average (about *window* seconds): a sudden slowdown stands out against it for a few
        seconds, while a lasting change (a slower database, another host) becomes the new
        usual, so that the limit cannot stay pinned at its minimum by latency alone.  (The
        lowest latency seen is no baseline: one lucky call would make the ordinary look
        like overload for good.)"""
        if not 1 <= minimum <= initial <= maximum:
            bounds = (minimum, initial, maximum)
            raise ValueError(f"need 1 <= minimum <= initial <= maximum, not {bounds}")
        self.limit = float(initial)
        self.minimum = minimum
        self.maximum = maximum
        self.backoff = backoff
        self.latency_backoff = latency_backoff
        self.tolerance = tolerance
        self.latency_floor = latency_floor
        self.window = window
        self.decreases = 0
        self.increases = 0
        self._last_decrease = -math.inf
        self._smoothed: float | None = None
        self._baseline: float | None = None
        self._last_sample = 0.0

    @property
    def value(self) -> int:
        """The limit as a number of calls."""
        return max(self.minimum, min(self.maximum, int(self.limit)))

    @property
    def usual_latency(self) -> float:
        """The slow average of latency (inf before the first call)."""
        return math.inf if self._baseline is None else self._baseline

    def _cut(self, factor: float, now: float) -> bool:
        # Once per round trip: the calls already in flight carry the same news.
        round_trip = max(0.05, self._smoothed or 0.0)
        if now - self._last_decrease < round_trip:
            return False
        self._last_decrease = now
        self.limit = max(float(self.minimum), self.limit * factor)
        self.decreases += 1
        return True

    def succeeded(self, latency: float, now: float, *, queued: bool) -> bool:
        """A call answered in *latency* seconds; *queued* when others were waiting for a
        slot.  True when the limit changed."""
        if self._baseline is None:
            self._baseline = latency
        else:
            weight = min(1.0, max(0.0, now - self._last_sample) / self.window)
            self._baseline += (latency - self._baseline) * weight
        self._last_sample = now
        smoothed = latency if self._smoothed is None else 0.8 * self._smoothed + 0.2 * latency
        self._smoothed = smoothed
        if smoothed > self._baseline * self.tolerance + self.latency_floor:
            return self._cut(self.latency_backoff, now)
        if queued and self.limit < self.maximum:
            before = self.value
            self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
            if self.value != before:
                self.increases += 1
                return True
        return False

    def overloaded(self, now: float) -> bool:
        """The application said 429 or 503, or a call timed out.  True when the limit
        changed."""
        return self._cut(self.backoff, now)


class BreakerState(enum.IntEnum):
    """The breaker's state (the ``rpc_breaker_state`` gauge's values)."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Fast refusals while the application is down (see the module docstring)."""

    __slots__ = (
        "_calls",
        "_consecutive",
        "_failures",
        "_opened_at",
        "_probes",
        "_window_start",
        "consecutive_failures",
        "cooldown",
        "failure_ratio",
        "min_calls",
        "probes",
        "state",
        "trips",
        "window",
    )

    def __init__(
        self,
        *,
        consecutive_failures: int = 5,
        failure_ratio: float = 0.5,
        min_calls: int = 10,
        window: float = 10.0,
        cooldown: float = 5.0,
        probes: int = 1,
    ) -> None:
        """Opens after *consecutive_failures* failed calls in a row, or when at least
        *min_calls* calls of a *window* failed in the *failure_ratio*; stays open *cooldown*
        seconds, then lets *probes* calls through at a time until one answers."""
        self.consecutive_failures = consecutive_failures
        self.failure_ratio = failure_ratio
        self.min_calls = min_calls
        self.window = window
        self.cooldown = cooldown
        self.probes = probes
        self.state = BreakerState.CLOSED
        self.trips = 0
        self._consecutive = 0
        self._calls = 0
        self._failures = 0
        self._window_start = 0.0
        self._opened_at = 0.0
        self._probes = 0

    def retry_in(self, now: float) -> float:
        """Seconds until a call may go again (0 when one may now)."""
        if self.state is BreakerState.OPEN:
            return max(0.0, self._opened_at + self.cooldown - now)
        return 0.0

    def allow(self, now: float) -> bool:
        """May a call go now?  When True the call must end in :meth:`record` or
        :meth:`cancel` (a half-open breaker counts its probes)."""
        if self.state is BreakerState.OPEN:
            if now - self._opened_at < self.cooldown:
                return False
            self.state = BreakerState.HALF_OPEN
            self._probes = 0
        if self.state is BreakerState.HALF_OPEN:
            if self._probes >= self.probes:
                return False
            self._probes += 1
        return True

    def cancel(self) -> None:
        """A call :meth:`allow` let through ended without a verdict (it never reached the
        application: its deadline passed while it waited for a slot)."""
        if self.state is BreakerState.HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def record(self, ok: bool, now: float) -> None:
        """A call ended: *ok* when the application answered (whatever it answered)."""
        if self.state is BreakerState.HALF_OPEN:
            self._probes = max(0, self._probes - 1)
            if ok:
                self._close(now)
            else:
                self._open(now)
            return
        if self.state is BreakerState.OPEN:
            return  # a call that started before the trip: its news is already known
        if now - self._window_start >= self.window:
            self._window_start = now
            self._calls = self._failures = 0
        self._calls += 1
        if ok:
            self._consecutive = 0
            return
        self._failures += 1
        self._consecutive += 1
        if self._consecutive >= self.consecutive_failures or (
            self._calls >= self.min_calls and self._failures >= self.failure_ratio * self._calls
        ):
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self._opened_at = now
        self.trips += 1

    def _close(self, now: float) -> None:
        self.state = BreakerState.CLOSED
        self._consecutive = 0
        self._calls = self._failures = 0
        self._window_start = now


def parse_retry_after(value: str | None, *, cap: float = 60.0) -> float | None:
    """Seconds from a ``Retry-After`` header given in seconds (an HTTP date, or anything
    unreadable, is None: the caller's own backoff applies), capped at *cap*."""
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, cap)


def retry_delay(
    attempt: int,
    retry_after: float | None = None,
    *,
    base: float = 0.05,
    cap: float = 2.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number *attempt* (1 for the first): exponential from
    *base* up to *cap*, at least *retry_after*, stretched by a random 0-50 % so that the
    callers an overload turned away together do not all come back together."""
    backoff = min(cap, base * 2 ** (attempt - 1))
    delay = max(backoff, retry_after or 0.0)
    return delay * (rng or _RNG).uniform(1.0, 1.5)
