"""RateLimiter against moto: bursts, refill, per-user buckets, and exactness under threads.

The moto server comes from `moto_url`, which installs gpuqueue_local.moto_atomic: conditional
writes are atomic there as in DynamoDB, which the concurrency test relies on.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import boto3
import pytest
from botocore.config import Config

from gpuqueue.rate_limiter import KEY_PREFIX, RateDecision, RateLimiter

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

NOW = 1_800_000_000.0


class FakeClock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def make_table(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Table]]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    # Enough pooled connections for the threaded test (boto3's default is 10).
    dynamodb = boto3.resource("dynamodb", config=Config(max_pool_connections=32))
    created: list[Table] = []

    def make() -> Table:
        table = dynamodb.create_table(
            TableName=f"rate-{uuid.uuid4().hex[:10]}",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        created.append(table)
        return table

    yield make
    for table in created:
        table.delete()


def test_a_burst_is_allowed_then_denied_with_retry_after(make_table: Callable[[], Table]) -> None:
    limiter = RateLimiter(make_table(), rate_per_second=0.5, burst=5, clock=FakeClock())
    burst = [limiter.take("alice") for _ in range(5)]
    assert all(d.allowed for d in burst)
    assert [d.remaining for d in burst] == [4, 3, 2, 1, 0]
    assert {d.limit for d in burst} == {5}
    assert [d.reset_seconds for d in burst] == [2, 4, 6, 8, 10]

    assert limiter.take("alice") == RateDecision(
        allowed=False, limit=5, remaining=0, retry_after_seconds=2, reset_seconds=10
    )


def test_the_stored_row(make_table: Callable[[], Table]) -> None:
    table = make_table()
    limiter = RateLimiter(table, rate_per_second=0.5, burst=5, clock=FakeClock())
    limiter.take("alice", cost=2)
    item = table.get_item(Key={"pk": "rate#alice"})["Item"]
    assert item["pk"] == KEY_PREFIX + "alice"
    assert float(str(item["tokens"])) == 3.0
    assert float(str(item["updated_at"])) == NOW
    assert int(str(item["expires_at"])) == int(NOW) + 10 + 60  # full after 5 / 0.5 s, + 60


def test_a_denied_take_writes_nothing(make_table: Callable[[], Table]) -> None:
    table = make_table()
    clock = FakeClock()
    limiter = RateLimiter(table, rate_per_second=1, burst=1, clock=clock)
    assert limiter.take("alice").allowed
    before = table.get_item(Key={"pk": "rate#alice"})["Item"]
    clock.advance(0.5)
    assert not limiter.take("alice").allowed
    assert table.get_item(Key={"pk": "rate#alice"})["Item"] == before


def test_tokens_refill_with_time(make_table: Callable[[], Table]) -> None:
    clock = FakeClock()
    limiter = RateLimiter(make_table(), rate_per_second=0.5, burst=5, clock=clock)
    for _ in range(5):
        assert limiter.take("alice").allowed
    clock.advance(1.0)  # half a token
    half = limiter.take("alice")
    assert (half.allowed, half.retry_after_seconds) == (False, 1)
    clock.advance(1.0)  # one token
    one = limiter.take("alice")
    assert (one.allowed, one.remaining) == (True, 0)
    assert not limiter.take("alice").allowed
    clock.advance(3600)  # capped at the burst, not 1800 tokens
    assert [limiter.take("alice").allowed for _ in range(6)] == [True] * 5 + [False]


def test_buckets_are_per_user(make_table: Callable[[], Table]) -> None:
    limiter = RateLimiter(make_table(), rate_per_second=0.1, burst=2, clock=FakeClock())
    assert [limiter.take("alice").allowed for _ in range(3)] == [True, True, False]
    assert [limiter.take("bob").allowed for _ in range(3)] == [True, True, False]


def test_cost_above_one(make_table: Callable[[], Table]) -> None:
    clock = FakeClock()
    limiter = RateLimiter(make_table(), rate_per_second=1, burst=5, clock=clock)
    first = limiter.take("alice", cost=3)
    assert (first.allowed, first.remaining, first.reset_seconds) == (True, 2, 3)
    denied = limiter.take("alice", cost=3)  # only 2 there: nothing taken
    assert (denied.allowed, denied.remaining, denied.retry_after_seconds) == (False, 2, 1)
    assert limiter.take("alice", cost=2).allowed  # the 2 were kept
    clock.advance(3)
    assert limiter.take("alice", cost=3).allowed


def test_cost_must_fit_the_burst(make_table: Callable[[], Table]) -> None:
    limiter = RateLimiter(make_table(), rate_per_second=1, burst=5, clock=FakeClock())
    with pytest.raises(ValueError, match="cost"):
        limiter.take("alice", cost=6)
    with pytest.raises(ValueError, match="cost"):
        limiter.take("alice", cost=0)


def test_another_key_attribute(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The row can live in a table keyed otherwise (e.g. the tasks table's task_id)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    table = boto3.resource("dynamodb").create_table(
        TableName=f"rate-{uuid.uuid4().hex[:10]}",
        KeySchema=[{"AttributeName": "task_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "task_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    try:
        limiter = RateLimiter(
            table, rate_per_second=1, burst=1, clock=FakeClock(), key_attribute="task_id"
        )
        assert [limiter.take("alice").allowed for _ in range(2)] == [True, False]
        assert "Item" in table.get_item(Key={"task_id": "rate#alice"})
    finally:
        table.delete()


@pytest.mark.parametrize("round_no", range(5))
def test_concurrent_takes_spend_each_token_once(
    make_table: Callable[[], Table], round_no: int
) -> None:
    """20 threads released together on a bucket of 5, clock frozen: exactly 5 get through."""
    limiter = RateLimiter(make_table(), rate_per_second=1, burst=5, clock=FakeClock())
    threads = 20
    start = threading.Barrier(threads, timeout=10)

    def take(_: int) -> RateDecision:
        start.wait()
        return limiter.take("alice")

    with ThreadPoolExecutor(max_workers=threads) as pool:
        decisions = list(pool.map(take, range(threads), timeout=30))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 5
    # Every token is spent once: the survivors saw 4, 3, 2, 1, 0 left.
    assert sorted(d.remaining for d in allowed) == [0, 1, 2, 3, 4]
    assert all(d.retry_after_seconds >= 1 for d in decisions if not d.allowed)


def test_contention_beyond_the_retries_fails_closed(make_table: Callable[[], Table]) -> None:
    """With one attempt only, a take that loses the write is denied (retry in 1 s)."""
    table = make_table()
    clock = FakeClock()
    limiter = RateLimiter(table, rate_per_second=1, burst=5, clock=clock, max_attempts=1)
    assert limiter.take("alice").allowed

    rival = RateLimiter(table, rate_per_second=1, burst=5, clock=clock)
    original_get = table.get_item

    class Racing:
        """Lets the rival write between this take's read and its write."""

        def __getattr__(self, name: str) -> object:
            return getattr(table, name)

        def get_item(self, **kwargs: object) -> object:
            read = original_get(**kwargs)  # type: ignore[arg-type]
            assert rival.take("alice").allowed
            return read

    loser = RateLimiter(Racing(), rate_per_second=1, burst=5, clock=clock, max_attempts=1)  # type: ignore[arg-type]
    result = loser.take("alice")
    assert result == RateDecision(
        allowed=False,
        limit=5,
        remaining=0,
        retry_after_seconds=1,
        reset_seconds=2,
        contended=True,
    )
    item = table.get_item(Key={"pk": "rate#alice"})["Item"]
    assert float(str(item["tokens"])) == 3.0  # the first take and the rival's, nothing else
