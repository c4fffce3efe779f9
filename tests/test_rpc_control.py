"""The RPC overload rules alone (sans I/O): the adaptive limit, the circuit breaker, the
retry timing.  The executor that wires them is tested against real HTTP servers in
tests/test_rpc.py."""

from __future__ import annotations

import random

import pytest

from trio_cable.server.rpc_control import (
    AdaptiveLimit,
    BreakerState,
    CircuitBreaker,
    parse_retry_after,
    retry_delay,
)

# -- the adaptive limit ------------------------------------------------------------------------


def test_the_limit_grows_only_while_calls_queue():
    limit = AdaptiveLimit(4, maximum=64)
    now = 0.0
    for _ in range(100):
        now += 0.01
        limit.succeeded(0.01, now, queued=False)
    assert limit.value == 4  # nobody waited: no evidence the application takes more
    for _ in range(100):
        now += 0.01
        limit.succeeded(0.01, now, queued=True)
    # Additive: about one more per limit's worth of successes (4+5+...+n <= 100).
    assert 10 <= limit.value <= 15
    assert limit.increases == limit.value - 4


def test_the_limit_never_passes_its_bounds():
    limit = AdaptiveLimit(2, minimum=2, maximum=5)
    now = 0.0
    for _ in range(1000):
        now += 0.01
        limit.succeeded(0.001, now, queued=True)
    assert limit.value == 5
    for _ in range(100):
        now += 1.0
        limit.overloaded(now)
    assert limit.value == 2


def test_an_overload_halves_the_limit_once_per_round_trip():
    limit = AdaptiveLimit(64, maximum=64)
    limit.succeeded(0.01, 0.0, queued=False)
    # 64 calls in flight all come back 503 within a few ms: one cut, not 64.
    for i in range(64):
        limit.overloaded(1.0 + i * 0.0005)
    assert limit.value == 32
    assert limit.decreases == 1
    limit.overloaded(1.2)  # a round trip later: the news is new
    assert limit.value == 16


def test_rising_latency_lowers_the_limit_and_recovery_raises_it():
    limit = AdaptiveLimit(40, maximum=64)
    now = 0.0
    for _ in range(50):
        now += 0.01
        limit.succeeded(0.010, now, queued=True)
    top = limit.value
    assert top > 40
    for _ in range(200):  # the application slows to 100 ms: well past 2 x 10 ms + 5 ms
        now += 0.02
        limit.succeeded(0.100, now, queued=True)
    low = limit.value
    assert low < top * 0.6
    for _ in range(3000):  # back to normal
        now += 0.01
        limit.succeeded(0.010, now, queued=True)
    assert limit.value > low + 10


def test_small_latencies_going_up_a_little_are_not_overload():
    limit = AdaptiveLimit(8, maximum=64)
    now = 0.0
    for _ in range(20):
        now += 0.01
        limit.succeeded(0.0003, now, queued=False)
    for _ in range(200):
        now += 0.01
        limit.succeeded(0.002, now, queued=False)  # 6x, but 2 ms is below the floor
    assert limit.decreases == 0


def test_a_lasting_change_of_latency_becomes_the_usual_one():
    limit = AdaptiveLimit(8, minimum=1, maximum=64, window=10.0)
    limit.succeeded(0.001, 0.0, queued=False)
    assert limit.usual_latency == 0.001
    now = 0.0
    for _ in range(300):  # the application moved: 50 ms is its new normal
        now += 0.1
        limit.succeeded(0.050, now, queued=True)
    assert limit.usual_latency == pytest.approx(0.050, rel=0.1)
    # The limit came down while that was news, and grows again now that it is not.
    assert limit.decreases > 0
    low = limit.value
    for _ in range(100):
        now += 0.05
        limit.succeeded(0.050, now, queued=True)
    assert limit.value > low


def test_one_fast_call_does_not_make_the_ordinary_look_like_overload():
    limit = AdaptiveLimit(8, maximum=64)
    now = 0.0
    limit.succeeded(0.030, now, queued=True)  # a lucky one
    for _ in range(500):
        now += 0.01
        limit.succeeded(0.075, now, queued=True)
    assert limit.value > 8


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        AdaptiveLimit(10, maximum=5)


# -- the circuit breaker -----------------------------------------------------------------------


def test_consecutive_failures_open_the_breaker_and_a_probe_closes_it():
    breaker = CircuitBreaker(consecutive_failures=3, cooldown=5.0)
    for i in range(3):
        assert breaker.allow(float(i))
        breaker.record(False, float(i))
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(3.0)
    assert breaker.retry_in(3.0) == pytest.approx(4.0)
    assert breaker.allow(7.5)  # cooled down: one probe
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(7.6)  # only one at a time
    breaker.record(True, 7.7)
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow(7.8)


def test_a_failed_probe_opens_it_again():
    breaker = CircuitBreaker(consecutive_failures=1, cooldown=1.0)
    breaker.allow(0.0)
    breaker.record(False, 0.0)
    assert breaker.allow(1.5)
    breaker.record(False, 1.6)
    assert breaker.state is BreakerState.OPEN
    assert breaker.trips == 2
    assert not breaker.allow(2.0)


def test_a_cancelled_probe_frees_its_place():
    breaker = CircuitBreaker(consecutive_failures=1, cooldown=1.0)
    breaker.allow(0.0)
    breaker.record(False, 0.0)
    assert breaker.allow(2.0)
    breaker.cancel()
    assert breaker.allow(2.1)


def test_a_mostly_failing_window_opens_it_successes_keep_it_closed():
    breaker = CircuitBreaker(consecutive_failures=100, failure_ratio=0.5, min_calls=10)
    for i in range(20):  # one failure in three: closed
        breaker.allow(i * 0.1)
        breaker.record(i % 3 != 0, i * 0.1)
    assert breaker.state is BreakerState.CLOSED
    breaker = CircuitBreaker(consecutive_failures=100, failure_ratio=0.5, min_calls=10)
    for i in range(10):  # alternate: half fail
        breaker.allow(i * 0.1)
        breaker.record(i % 2 == 0, i * 0.1)
    assert breaker.state is BreakerState.OPEN


def test_old_failures_age_out_of_the_window():
    breaker = CircuitBreaker(consecutive_failures=100, failure_ratio=0.5, min_calls=10, window=1.0)
    for i in range(9):  # 5 of 9 failed: under min_calls
        breaker.record(i % 2 == 1, i * 0.01)
    assert breaker.state is BreakerState.CLOSED
    # A window later one more success and one failure: 6 of 11 had they been counted together.
    breaker.record(True, 5.0)
    breaker.record(False, 5.1)
    assert breaker.state is BreakerState.CLOSED


# -- retry timing ------------------------------------------------------------------------------


def test_retry_delays_grow_are_capped_and_jittered():
    rng = random.Random(7)
    delays = [retry_delay(n, rng=rng) for n in range(1, 10)]
    assert 0.05 <= delays[0] <= 0.075
    assert all(d <= 2.0 * 1.5 for d in delays)
    assert delays[-1] >= 2.0
    many = {round(retry_delay(3, rng=rng), 6) for _ in range(50)}
    assert len(many) > 40  # spread: not one synchronised comeback


def test_retry_after_is_a_floor():
    rng = random.Random(1)
    for _ in range(100):
        assert 2.0 <= retry_delay(1, 2.0, rng=rng) <= 3.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("900", 60.0),
        (None, None),
        ("", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
        ("-1", None),
        ("nan", None),
    ],
)
def test_parse_retry_after(header, seconds):
    assert parse_retry_after(header) == seconds
