"""Reconnect delays: the backoff strategies of Marc Brooker's "Exponential Backoff And Jitter"
(AWS Architecture Blog, 2015), plus the server's advice.  Pure and sans-I/O: no trio, no clock;
randomness comes from a ``random.Random`` you pass in, so a simulation can replay it.

With ``attempt`` counting failed attempts since the last good connection (0 for the first
retry) and ``exp = min(cap, base * 2 ** attempt)``:

=======================  ===========================================================
``none``                 ``base`` every time (no backoff; ``base=0`` retries at once)
``exponential``          ``exp``  (no jitter: the whole fleet retries in lock step)
``full_jitter``          ``uniform(0, exp)``  (the default)
``equal_jitter``         ``exp / 2 + uniform(0, exp / 2)``
``decorrelated_jitter``  ``min(cap, uniform(base, previous * 3))``, previous starting at ``base``
=======================  ===========================================================

Server advice (``reconnect_after`` in a ``disconnect``, ``Retry-After`` on a refused handshake)
replaces the strategy's delay for that attempt, because the server knows its load and the
client does not.  The jittered strategies still spread it, never earlier than advised:
``advice * uniform(1, 1 + advice_jitter)`` (``Retry-After`` has whole-second resolution, so a
refused fleet would otherwise come back in one burst).  ``none`` and ``exponential`` use the
advice as is.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

__all__ = [
    "STRATEGIES",
    "Backoff",
    "BackoffTimer",
    "Strategy",
    "compute_delay",
    "parse_retry_after",
]

Strategy = Literal["none", "exponential", "full_jitter", "equal_jitter", "decorrelated_jitter"]
STRATEGIES: tuple[Strategy, ...] = (
    "none",
    "exponential",
    "full_jitter",
    "equal_jitter",
    "decorrelated_jitter",
)
_JITTERED = frozenset({"full_jitter", "equal_jitter", "decorrelated_jitter"})
# 2 ** attempt overflows a float past ~1024; the cap is reached long before that anyway.
_MAX_EXPONENT = 64


def compute_delay(
    strategy: Strategy,
    attempt: int,
    *,
    base: float,
    cap: float,
    previous: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """The delay (seconds) before retry number ``attempt`` (0-based) under ``strategy``.

    ``previous`` is the delay chosen last time (only ``decorrelated_jitter`` uses it; ``None``
    means ``base``).  Brooker's formulas, see the module docstring.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    rng = rng or random.Random()
    exp = min(cap, base * 2.0 ** min(attempt, _MAX_EXPONENT))
    if strategy == "none":
        return base
    if strategy == "exponential":
        return exp
    if strategy == "full_jitter":
        return rng.uniform(0.0, exp)
    if strategy == "equal_jitter":
        return exp / 2 + rng.uniform(0.0, exp / 2)
    if strategy == "decorrelated_jitter":
        prev = base if previous is None else previous
        return min(cap, rng.uniform(base, max(base, prev * 3)))
    raise ValueError(f"unknown backoff strategy {strategy!r} (known: {', '.join(STRATEGIES)})")


@dataclass(frozen=True)
class Backoff:
    """Reconnect policy: a strategy, its ``base`` and ``cap`` (seconds), and ``max_attempts``
    (consecutive failed attempts before giving up; ``None`` = never give up).

    ``advice_jitter`` is the spread added on top of server advice by the jittered strategies.
    """

    strategy: Strategy = "full_jitter"
    base: float = 0.5
    cap: float = 30.0
    max_attempts: int | None = None
    advice_jitter: float = 0.5

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown backoff strategy {self.strategy!r} (known: {', '.join(STRATEGIES)})"
            )
        if self.base < 0 or self.cap < 0:
            raise ValueError("base and cap must be >= 0")
        if self.cap < self.base:
            raise ValueError("cap must be >= base")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 (or None)")
        if self.advice_jitter < 0:
            raise ValueError("advice_jitter must be >= 0")

    @property
    def jittered(self) -> bool:
        """Whether this strategy randomizes its delays."""
        return self.strategy in _JITTERED

    def timer(self, rng: random.Random | None = None) -> BackoffTimer:
        """A fresh :class:`BackoffTimer` for one client."""
        return BackoffTimer(self, rng)


class BackoffTimer:
    """The reconnect state of one client: how many attempts failed in a row, and the delay
    before the next one.

    ``next_delay()`` returns the delay before the next attempt and counts that attempt;
    ``succeeded()`` resets after a good connection.  ``exhausted`` turns true once
    ``max_attempts`` attempts have failed in a row.
    """

    def __init__(self, policy: Backoff, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng or random.Random()
        self.failures = 0  # consecutive failed attempts since the last good connection
        self._retry = 0  # index of the next retry in the exponential sequence
        self._previous: float | None = None

    @property
    def exhausted(self) -> bool:
        """True once ``max_attempts`` consecutive attempts have failed."""
        limit = self.policy.max_attempts
        return limit is not None and self.failures >= limit

    def failed(self) -> None:
        """Count a failed attempt (refused handshake, network error, closed before welcome)."""
        self.failures += 1

    def succeeded(self) -> None:
        """A connection was established: start over from the first retry."""
        self.failures = 0
        self._retry = 0
        self._previous = None

    def next_delay(self, advice: float | None = None) -> float:
        """The delay before the next attempt.  ``advice`` (seconds, from ``reconnect_after`` or
        ``Retry-After``) wins over the strategy, jittered upwards when the strategy jitters."""
        p = self.policy
        if advice is not None and advice >= 0:
            delay = advice
            if p.jittered and p.advice_jitter:
                delay = advice * self.rng.uniform(1.0, 1.0 + p.advice_jitter)
        else:
            delay = compute_delay(
                p.strategy,
                self._retry,
                base=p.base,
                cap=p.cap,
                previous=self._previous,
                rng=self.rng,
            )
        self._retry += 1
        self._previous = delay
        return delay


def parse_retry_after(value: str | bytes | None, *, now: float | None = None) -> float | None:
    """Seconds from an HTTP ``Retry-After`` value (delta-seconds or an HTTP date), or ``None``
    when absent or unreadable.  ``now`` (unix seconds) is needed for the date form."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if now is None:
        now = time.time()
    return max(0.0, when - now)
