"""GCRA arithmetic: the same decisions as a token bucket, in whole header seconds.

The reference is a token bucket simulated step by step in exact fractions (tokens refilled
by the time elapsed, capped at the burst); GCRA keeps only the theoretical arrival time.
Seeded random arrival sequences, bounded in length, must get equal decisions from both.
"""

from __future__ import annotations

import math
import random
import re
from decimal import Decimal
from fractions import Fraction

import pytest

from gpuqueue.intake.rate_limiter import Gcra, RateDecision, Step, to_millis

NOW = Decimal(1_800_000_000)
NOW_MS = 1_800_000_000_000


class TokenBucket:
    """The textbook bucket: full at first, refilled at `rate`, capped at `burst`."""

    def __init__(self, rate: Fraction, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = Fraction(burst)
        self.last: Fraction | None = None

    def take(self, now: Fraction, cost: int) -> RateDecision:
        if self.last is not None:
            self.tokens = min(Fraction(self.burst), self.tokens + (now - self.last) * self.rate)
        self.last = now
        allowed = self.tokens >= cost
        if allowed:
            self.tokens -= cost
        missing = (cost - self.tokens) / self.rate
        return RateDecision(
            allowed=allowed,
            limit=self.burst,
            remaining=math.floor(self.tokens),
            retry_after_seconds=0 if allowed else max(1, math.ceil(missing)),
            reset_seconds=math.ceil((self.burst - self.tokens) / self.rate),
        )


def _gap_ms(rng: random.Random, interval_ms: int, tolerance_ms: int) -> int:
    kind = rng.random()
    if kind < 0.3:
        return 0  # a burst: same millisecond
    if kind < 0.6:
        return rng.randint(1, 50)
    if kind < 0.9:
        return rng.randint(1, 3 * interval_ms)
    return rng.randint(tolerance_ms // 2, 2 * tolerance_ms)  # idle: often full again


RATES = [0.1, 0.25, 0.3, 0.5, 1.0, 2.0, 3.0, 7.0, 10.0, 40.0]


@pytest.mark.parametrize("seed", range(12))
def test_gcra_decides_as_the_token_bucket_does(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        gcra = Gcra.for_rate(rng.choice(RATES), rng.randint(1, 12))
        # The bucket GCRA keeps is one of rate 1/T exactly (T to the microsecond).
        bucket = TokenBucket(1 / Fraction(gcra.interval), gcra.burst)
        interval_ms = max(1, int(gcra.interval * 1000))
        tolerance_ms = max(2, int(gcra.tolerance * 1000))
        tat: Decimal | None = None
        at_ms = NOW_MS + rng.randint(0, 999)
        for _ in range(80):
            at_ms += _gap_ms(rng, interval_ms, tolerance_ms)
            now = Decimal(at_ms).scaleb(-3)
            cost = rng.randint(1, min(3, gcra.burst))
            expected = bucket.take(Fraction(at_ms, 1000), cost)
            got, tat = gcra.take(tat, now, cost)
            assert got == expected, (gcra, now, cost)


def test_the_interval_is_one_over_the_rate_to_the_microsecond() -> None:
    assert Gcra.for_rate(0.5, 5).interval == Decimal(2)
    assert Gcra.for_rate(0.1, 5).interval == Decimal(10)
    assert Gcra.for_rate(3.0, 5).interval == Decimal("0.333333")
    assert Gcra.for_rate(0.5, 5).tolerance == Decimal(10)


def test_a_million_a_second_is_the_fastest_rate_one_microsecond_apart() -> None:
    assert Gcra.for_rate(1_000_000, 1).interval == Decimal("0.000001")


@pytest.mark.parametrize(
    ("rate", "burst", "message"),
    [
        (0, 5, "rate_per_second must be positive"),
        (-1, 5, "rate_per_second must be positive"),
        (2e6, 5, "rate_per_second must be at most a million"),
        (1, 0, "burst must be at least 1"),
    ],
)
def test_bad_parameters(rate: float, burst: int, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Gcra.for_rate(rate, burst)


def test_now_is_kept_to_the_millisecond() -> None:
    assert to_millis(1_800_000_000.12345) == Decimal("1800000000.123")
    assert to_millis(1_800_000_000.0) == Decimal("1800000000.000")


def test_the_three_cases_meet_at_their_bounds() -> None:
    gcra = Gcra.for_rate(1, 5)  # T 1 s, tau 5 s; a take of 1 needs tat <= now + 4
    assert gcra.step(None, NOW, 1) is Step.IDLE
    assert gcra.step(NOW - Decimal("0.001"), NOW, 1) is Step.IDLE
    assert gcra.step(NOW, NOW, 1) is Step.BUSY
    assert gcra.step(NOW + 4, NOW, 1) is Step.BUSY
    assert gcra.step(NOW + Decimal("4.001"), NOW, 1) is Step.DENY
    assert gcra.step(NOW + 2, NOW, 3) is Step.BUSY  # cost 3: tat <= now + 2
    assert gcra.step(NOW + Decimal("2.001"), NOW, 3) is Step.DENY


def test_a_burst_then_a_denial_with_retry_after() -> None:
    gcra = Gcra.for_rate(0.5, 5)
    tat = None
    decisions = []
    for _ in range(6):
        decision, tat = gcra.take(tat, NOW, 1)
        decisions.append(decision)
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    assert [d.reset_seconds for d in decisions[:5]] == [2, 4, 6, 8, 10]
    assert decisions[5] == RateDecision(
        allowed=False, limit=5, remaining=0, retry_after_seconds=2, reset_seconds=10
    )
    assert tat == NOW + 10


def test_a_denial_changes_nothing() -> None:
    gcra = Gcra.for_rate(1, 2)
    decision, tat = gcra.take(NOW + 5, NOW, 1)
    assert not decision.allowed
    assert tat == NOW + 5


def test_an_idle_bucket_is_full_however_long_ago_tat_was() -> None:
    gcra = Gcra.for_rate(0.5, 5)
    decision, tat = gcra.take(NOW - 3600, NOW, 1)
    assert (decision.remaining, tat) == (4, NOW + 2)


def test_retry_after_counts_only_the_missing_fraction() -> None:
    # 0.4 tokens there (tat 9.2 s ahead of a 10 s tolerance), 0.6 missing at 0.5/s = 1.2 s.
    gcra = Gcra.for_rate(0.5, 5)
    assert gcra.denied(NOW + Decimal("9.2"), NOW, 1).retry_after_seconds == 2


def test_retry_after_is_at_least_one_second() -> None:
    gcra = Gcra.for_rate(0.5, 5)
    # 0.9995 tokens there: 1 ms from the next one.
    assert gcra.denied(NOW + Decimal("8.001"), NOW, 1).retry_after_seconds == 1


def test_remaining_rounds_down_to_whole_tokens() -> None:
    gcra = Gcra.for_rate(1, 5)
    decision, _ = gcra.take(NOW + Decimal("2.3"), NOW, 1)  # 2.7 there, 1.7 left
    assert (decision.allowed, decision.remaining, decision.reset_seconds) == (True, 1, 4)


@pytest.mark.parametrize(
    ("debt", "cost", "allowed", "remaining", "retry_after"),
    [
        ("0", 3, True, 2, 0),  # 5 there
        ("2", 3, True, 0, 0),  # 3 there
        ("2.5", 3, False, 2, 1),  # 2.5 there: nothing taken, the 2 whole tokens stay
        ("5", 3, False, 0, 3),  # empty
    ],
)
def test_cost_above_one(
    debt: str, cost: int, allowed: bool, remaining: int, retry_after: int
) -> None:
    gcra = Gcra.for_rate(1, 5)
    decision, _ = gcra.take(NOW + Decimal(debt), NOW, cost)
    assert (decision.allowed, decision.remaining, decision.retry_after_seconds) == (
        allowed,
        remaining,
        retry_after,
    )


def test_emptying_the_bucket_in_one_take_resets_after_burst_over_rate() -> None:
    decision, _ = Gcra.for_rate(1, 5).take(None, NOW, 5)
    assert (decision.remaining, decision.reset_seconds) == (0, 5)


@pytest.mark.parametrize("seed", range(6))
def test_skewed_clocks_admit_at_most_the_skew_spread_in_extra_tokens(seed: int) -> None:
    """Containers whose clocks differ by up to D share one tat: over any window W the user
    gets at most r*W + b + r*D tokens, however the takes interleave."""
    rng = random.Random(seed)
    gcra = Gcra.for_rate(rng.choice([0.5, 1.0, 4.0]), rng.randint(1, 6))
    rate = 1 / Fraction(gcra.interval)
    spread_ms = rng.choice([100, 1000, 5000])
    offsets = [rng.randint(0, spread_ms) for _ in range(3)]  # one clock per container
    tat: Decimal | None = None
    true_ms = NOW_MS
    taken: list[tuple[int, int]] = []  # (true time in ms, cost) of each allowed take
    for _ in range(150):
        true_ms += rng.choice([0, 0, 10, 200, 900, 3000])
        seen_ms = true_ms + rng.choice(offsets)
        cost = rng.randint(1, gcra.burst)
        decision, tat = gcra.take(tat, Decimal(seen_ms).scaleb(-3), cost)
        if decision.allowed:
            taken.append((true_ms, cost))
    spread = Fraction(max(offsets) - min(offsets), 1000)
    for i, (start_ms, _) in enumerate(taken):
        tokens = 0
        for end_ms, cost in taken[i:]:
            tokens += cost
            window = Fraction(end_ms - start_ms, 1000)
            assert tokens <= rate * window + gcra.burst + rate * spread
