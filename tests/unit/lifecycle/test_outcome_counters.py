import itertools

from gpuqueue.lifecycle.outcome_counters import (
    BUCKET_SECONDS,
    MAX_SHARDS,
    WINDOW_SECONDS,
    OutcomeWindow,
    bucket_start,
    window_buckets,
)


def test_the_hour_is_read_as_the_current_bucket_and_the_twelve_before_it():
    now = 1_800_000_123.5
    buckets = window_buckets(now)
    assert buckets[0] == bucket_start(now) == 1_800_000_000
    assert len(buckets) == WINDOW_SECONDS // BUCKET_SECONDS + 1 == 13
    assert all(a - b == BUCKET_SECONDS for a, b in itertools.pairwise(buckets))
    # Every shard of every bucket fits one BatchGetItem (100 keys).
    assert len(buckets) * MAX_SHARDS <= 100


def test_rows_add_up_to_counts_a_failure_rate_and_an_average():
    rows = [
        {"succeeded": 3, "failed": 1, "processing_ms": 30_000, "processed": 3},
        {"succeeded": 5, "canceled": 2, "expired": 1, "processing_ms": 62_000, "processed": 5},
    ]
    stats = OutcomeWindow.of_rows(rows).stats(window_seconds=3600)
    assert (stats.succeeded, stats.failed, stats.canceled, stats.expired) == (8, 1, 2, 1)
    # Cancels and queue deadlines are the users' doing: the rate is over DONE + FAILED.
    assert stats.failure_rate == round(100 / 9, 2)
    assert stats.avg_processing_seconds == 11.5


def test_an_idle_hour_has_no_average_and_no_failures():
    stats = OutcomeWindow.of_rows([]).stats(window_seconds=3600)
    assert stats.failure_rate == 0.0
    assert stats.avg_processing_seconds is None
