"""Backoff strategies (pure): Brooker's formulas, server advice, attempt counting."""

from __future__ import annotations

import random
import statistics

import pytest

from trio_cable.client.backoff import (
    STRATEGIES,
    Backoff,
    compute_delay,
    parse_retry_after,
)


def delays(strategy: str, attempt: int, n: int = 2000, **kw: float) -> list[float]:
    rng = random.Random(1234)
    return [
        compute_delay(strategy, attempt, base=kw.get("base", 1.0), cap=kw.get("cap", 8.0), rng=rng)  # type: ignore[arg-type]
        for _ in range(n)
    ]


def test_none_is_constant_base() -> None:
    assert set(delays("none", 0)) == {1.0}
    assert set(delays("none", 7)) == {1.0}
    assert compute_delay("none", 3, base=0.0, cap=1.0) == 0.0


def test_exponential_doubles_up_to_cap() -> None:
    got = [compute_delay("exponential", a, base=0.5, cap=5.0) for a in range(7)]
    assert got == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    # Huge attempt numbers neither overflow nor exceed the cap.
    assert compute_delay("exponential", 10_000, base=0.5, cap=5.0) == 5.0


@pytest.mark.parametrize("attempt", [0, 1, 2, 5])
def test_full_jitter_uniform_below_exp(attempt: int) -> None:
    exp = min(8.0, 2.0**attempt)
    got = delays("full_jitter", attempt)
    assert all(0.0 <= d <= exp for d in got)
    # Uniform over [0, exp): mean exp/2, and both halves populated about equally.
    assert statistics.mean(got) == pytest.approx(exp / 2, rel=0.08)
    low = sum(d < exp / 2 for d in got) / len(got)
    assert 0.45 < low < 0.55


@pytest.mark.parametrize("attempt", [0, 2, 6])
def test_equal_jitter_in_upper_half(attempt: int) -> None:
    exp = min(8.0, 2.0**attempt)
    got = delays("equal_jitter", attempt)
    assert all(exp / 2 <= d <= exp for d in got)
    assert statistics.mean(got) == pytest.approx(0.75 * exp, rel=0.05)


def test_decorrelated_jitter_follows_previous() -> None:
    rng = random.Random(7)
    previous = None
    for _ in range(500):
        d = compute_delay("decorrelated_jitter", 0, base=0.5, cap=10.0, previous=previous, rng=rng)
        upper = min(10.0, 3 * (previous if previous is not None else 0.5))
        assert 0.5 <= d <= max(upper, 0.5)
        previous = d


def test_timer_counts_failures_and_resets() -> None:
    timer = Backoff("exponential", base=1.0, cap=100.0, max_attempts=3).timer()
    assert [timer.next_delay() for _ in range(4)] == [1.0, 2.0, 4.0, 8.0]
    assert not timer.exhausted
    for _ in range(3):
        timer.failed()
    assert timer.exhausted
    timer.succeeded()
    assert not timer.exhausted
    assert timer.next_delay() == 1.0


def test_decorrelated_timer_uses_its_previous_delay() -> None:
    timer = Backoff("decorrelated_jitter", base=1.0, cap=1000.0).timer(random.Random(3))
    previous = 1.0
    for _ in range(30):
        d = timer.next_delay()
        assert 1.0 <= d <= 3 * previous
        previous = d


@pytest.mark.parametrize("strategy", ["full_jitter", "equal_jitter", "decorrelated_jitter"])
def test_advice_wins_and_is_jittered_upwards(strategy: str) -> None:
    timer = Backoff(strategy, base=0.1, cap=0.2, advice_jitter=0.5).timer(random.Random(5))  # type: ignore[arg-type]
    got = [timer.next_delay(advice=4.0) for _ in range(500)]
    # Beyond the cap (server advice wins), never earlier than advised, spread over +50%.
    assert all(4.0 <= d <= 6.0 for d in got)
    assert max(got) - min(got) > 1.5


@pytest.mark.parametrize("strategy", ["none", "exponential"])
def test_advice_exact_for_unjittered(strategy: str) -> None:
    timer = Backoff(strategy, base=0.1, cap=0.2).timer()  # type: ignore[arg-type]
    assert timer.next_delay(advice=3.0) == 3.0


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="unknown backoff strategy"):
        Backoff("linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Backoff(base=2.0, cap=1.0)
    with pytest.raises(ValueError):
        Backoff(max_attempts=0)
    with pytest.raises(ValueError):
        compute_delay("full_jitter", -1, base=1, cap=2)
    assert set(STRATEGIES) == {
        "none",
        "exponential",
        "full_jitter",
        "equal_jitter",
        "decorrelated_jitter",
    }


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(b" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("-1") is None
    assert parse_retry_after("inf") is None
    assert parse_retry_after("soon") is None
    # HTTP-date form, relative to "now".
    now = 1_700_000_000.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", now=now) == pytest.approx(10.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now=now) == 0.0
