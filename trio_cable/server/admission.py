"""Admission control: who may open a connection now, and how hard the server may be pushed.

* :class:`TokenBucket` paces events (new handshakes per second server-wide, commands per
  second per connection).  Pure: the caller passes the time.
* :class:`AdaptiveLimits` is an AIMD controller fed with the event loop's lag: when the loop
  stays behind its target the admitted handshake rate and the number of application callbacks
  allowed at once shrink multiplicatively; while it keeps up they grow back additively.  A
  storm then queues (and is told to come back later) instead of timing everybody out.  One
  late window alone is not overload: a full garbage collection of a big heap stops the loop
  for a few hundred milliseconds every few seconds, and halving admission for each of those
  would refuse clients the server has the CPU to serve.
* :func:`retry_after` spreads advice ("come back in N seconds") with per-client jitter, so the
  advice itself does not synchronize the herd.
"""

from __future__ import annotations

import math
import random

import trio

# Advice jitter needs no cryptographic randomness, only independence between clients.
_RNG = random.Random()


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up.  ``rate <= 0`` means unlimited."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self.burst
        self._last = now

    def _refill(self, now: float) -> None:
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._last = now

    def take(self, now: float, n: float = 1.0) -> bool:
        """Spend *n* tokens if there are that many; True when the event may happen."""
        if self.rate <= 0:
            return True
        self._refill(now)
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def wait_time(self, now: float, n: float = 1.0) -> float:
        """Seconds until *n* tokens will be there (0 when they are now)."""
        if self.rate <= 0:
            return 0.0
        self._refill(now)
        return max(0.0, (n - self._tokens) / self.rate)

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate, keeping the tokens earned so far."""
        self._refill(now)
        self.rate = rate
        self.burst = max(1.0, rate)
        self._tokens = min(self._tokens, self.burst)


def retry_after(base: float, window: float, rng: random.Random | None = None) -> int:
    """Whole seconds for a ``Retry-After`` header: at least *base* (the time the server
    itself needs), plus a uniformly random share of *window*, and never below 1."""
    uniform = (rng or _RNG).uniform
    return max(1, math.ceil(base + uniform(0.0, max(0.0, window))))


def reconnect_after_ms(base: float, window: float, rng: random.Random | None = None) -> int:
    """Milliseconds for a ``disconnect``'s ``reconnect_after`` advice, jittered like
    :func:`retry_after`."""
    uniform = (rng or _RNG).uniform
    return int(1000 * (max(0.0, base) + uniform(0.0, max(0.0, window))))


class AdaptiveLimits:
    """AIMD on event-loop lag for the handshake rate and the callback concurrency."""

    def __init__(
        self,
        bucket: TokenBucket,
        limiter: trio.CapacityLimiter,
        *,
        max_rate: float,
        max_callbacks: int,
        lag_target: float,
        min_rate: float = 10.0,
    ) -> None:
        self.bucket = bucket
        self.limiter = limiter
        self.max_rate = max_rate
        self.max_callbacks = max_callbacks
        self.lag_target = lag_target
        self.min_rate = min(min_rate, max_rate) if max_rate > 0 else min_rate
        self.decreases = 0
        self._was_late = False

    @property
    def shedding(self) -> bool:
        """True while the limits are held below their maximum (the loop has been late)."""
        return (self.max_rate > 0 and self.bucket.rate < self.max_rate) or (
            self.limiter.total_tokens < self.max_callbacks
        )

    def observe(self, lag: float, now: float) -> None:
        """Feed the worst loop lag seen over the last window (seconds).  Limits shrink when
        this window and the one before were both late, and grow when this one was not."""
        late = lag > self.lag_target
        was_late, self._was_late = self._was_late, late
        if late and not was_late:
            return  # one pause, perhaps a garbage collection: wait for the next window
        if late:
            self.decreases += 1
            if self.max_rate > 0:
                self.bucket.set_rate(max(self.min_rate, self.bucket.rate * 0.5), now)
            self.limiter.total_tokens = max(1, int(self.limiter.total_tokens * 0.7))
        else:
            if self.max_rate > 0 and self.bucket.rate < self.max_rate:
                step = max(1.0, self.max_rate * 0.1)
                self.bucket.set_rate(min(self.max_rate, self.bucket.rate + step), now)
            if self.limiter.total_tokens < self.max_callbacks:
                step_c = max(1, self.max_callbacks // 10)
                self.limiter.total_tokens = min(
                    self.max_callbacks, self.limiter.total_tokens + step_c
                )
