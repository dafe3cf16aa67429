"""Token bucket arithmetic: refill capped at the burst, decisions in whole header seconds."""

from __future__ import annotations

import pytest

from gpuqueue.rate_limiter import RateDecision, decision, refill

NOW = 1_800_000_000.0


def test_refill_adds_rate_times_elapsed() -> None:
    assert refill(1.0, NOW, NOW + 3, 0.5, 5) == 2.5


def test_refill_is_capped_at_the_burst() -> None:
    assert refill(4.0, NOW, NOW + 3600, 0.5, 5) == 5.0


def test_refill_with_a_clock_behind_updated_at_adds_nothing() -> None:
    assert refill(2.0, NOW, NOW - 10, 1.0, 5) == 2.0


def test_refill_rounds_away_float_noise() -> None:
    # 0.1 s at 10/s is one token, not 0.9999999xx.
    assert refill(0.0, NOW + 0.1, NOW + 0.2, 10.0, 5) == 1.0


def test_allowed_take_reports_whole_tokens_left_and_time_to_full() -> None:
    assert decision(5.0, cost=1, rate=0.5, burst=5) == RateDecision(
        allowed=True, limit=5, remaining=4, retry_after_seconds=0, reset_seconds=2
    )


def test_remaining_rounds_down_to_whole_tokens() -> None:
    result = decision(2.7, cost=1, rate=1.0, burst=5)
    assert result.allowed
    assert result.remaining == 1
    assert result.reset_seconds == 4  # 3.3 tokens missing at 1/s -> ceil(3.3)


def test_last_token_leaves_zero() -> None:
    result = decision(1.0, cost=1, rate=0.5, burst=5)
    assert (result.allowed, result.remaining, result.reset_seconds) == (True, 0, 10)


def test_empty_bucket_is_denied_with_retry_after() -> None:
    assert decision(0.0, cost=1, rate=0.5, burst=5) == RateDecision(
        allowed=False, limit=5, remaining=0, retry_after_seconds=2, reset_seconds=10
    )


def test_retry_after_counts_only_the_missing_fraction() -> None:
    # 0.4 tokens there, 0.6 missing at 0.5/s = 1.2 s -> 2 whole seconds.
    assert decision(0.4, cost=1, rate=0.5, burst=5).retry_after_seconds == 2


def test_retry_after_is_at_least_one_second() -> None:
    assert decision(0.9999999, cost=1, rate=0.5, burst=5).retry_after_seconds == 1


@pytest.mark.parametrize(
    ("available", "cost", "allowed", "remaining", "retry_after"),
    [
        (5.0, 3, True, 2, 0),
        (3.0, 3, True, 0, 0),
        (2.5, 3, False, 2, 1),  # nothing taken: the 2 whole tokens are still there
        (0.0, 3, False, 0, 3),
    ],
)
def test_cost_above_one(
    available: float, cost: int, allowed: bool, remaining: int, retry_after: int
) -> None:
    result = decision(available, cost=cost, rate=1.0, burst=5)
    assert (result.allowed, result.remaining, result.retry_after_seconds) == (
        allowed,
        remaining,
        retry_after,
    )


def test_emptying_the_bucket_in_one_take_resets_after_burst_over_rate() -> None:
    assert decision(5.0, cost=5, rate=1.0, burst=5).reset_seconds == 5
