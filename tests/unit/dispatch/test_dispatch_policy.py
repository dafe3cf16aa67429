"""Retry backoff: capped exponential with jitter, so retries spread out instead of storming."""

from __future__ import annotations

import random

import pytest

from gpuqueue.dispatch.dispatcher import DispatchPolicy

SEEDS = range(200)


def policy(*, base: float = 2.0, cap: float = 60.0) -> DispatchPolicy:
    return DispatchPolicy(
        task_timeout_seconds=120,
        max_attempts=3,
        health_max_age_seconds=180,
        retry_base_delay_seconds=base,
        retry_max_delay_seconds=cap,
    )


def delays(p: DispatchPolicy, attempt: int) -> list[int]:
    return [p.backoff_seconds(attempt, random.Random(seed)) for seed in SEEDS]


@pytest.mark.parametrize(
    ("attempt", "ceiling"), [(1, 2), (2, 4), (3, 8), (4, 16), (5, 32), (6, 60), (9, 60)]
)
def test_backoff_stays_between_half_the_ceiling_and_the_ceiling(attempt: int, ceiling: int) -> None:
    assert all(ceiling / 2 <= d <= ceiling for d in delays(policy(), attempt))


def test_backoff_ceiling_doubles_with_each_attempt() -> None:
    p = policy(base=4, cap=1000)

    assert max(delays(p, 3)) > max(delays(p, 2)) > max(delays(p, 1))


@pytest.mark.parametrize("attempt", [5, 10, 30])
def test_backoff_never_exceeds_the_configured_maximum(attempt: int) -> None:
    assert max(delays(policy(base=5, cap=30), attempt)) <= 30


def test_backoff_is_jittered_so_retries_do_not_line_up() -> None:
    assert len(set(delays(policy(), 6))) > 10


def test_backoff_is_reproducible_with_the_same_seed() -> None:
    p = policy()

    assert p.backoff_seconds(4, random.Random(7)) == p.backoff_seconds(4, random.Random(7))


def test_backoff_is_a_whole_number_of_seconds() -> None:
    assert all(isinstance(d, int) for d in delays(policy(), 3))
