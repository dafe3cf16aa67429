"""RateLimiter against moto: bursts, refill, per-user buckets, the stored row, what each take
costs in requests, and exactness under threads.

The moto server comes from `moto_url`, which installs gpuqueue_local.moto_atomic: conditional
writes are atomic there as in DynamoDB, which the concurrency tests rely on.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from fakes import FakeClock
from gpuqueue.errors import StoreError
from gpuqueue.intake import rate_limiter
from gpuqueue.intake.rate_limiter import RateDecision, RateLimiter
from gpuqueue.store.limits_rows import LimitsRow

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

NOW = 1_800_000_000.0


class Counting:
    """The table, counting each thread's writes (ok or failed) and reads; `before_write`
    runs once, just before the next write (a rival slipping in)."""

    def __init__(self, table: Table, *, drop_all_old: bool = False) -> None:
        self.table = table
        self.drop_all_old = drop_all_old
        self.before_write: Callable[[], object] | None = None
        self._lock = threading.Lock()
        self.by_thread: dict[int, Counter[str]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.table, name)

    def _count(self, what: str) -> None:
        with self._lock:
            self.by_thread.setdefault(threading.get_ident(), Counter())[what] += 1

    def totals(self) -> Counter[str]:
        return sum(self.by_thread.values(), Counter())

    def reset(self) -> None:
        self.by_thread.clear()

    def update_item(self, **kwargs: Any) -> Any:
        hook, self.before_write = self.before_write, None
        if hook is not None:
            hook()
        if self.drop_all_old:  # a store that ignores it
            kwargs.pop("ReturnValuesOnConditionCheckFailure", None)
        try:
            result = self.table.update_item(**kwargs)
        except ClientError:
            self._count("failed_write")
            raise
        self._count("write")
        return result

    def get_item(self, **kwargs: Any) -> Any:
        self._count("read")
        return self.table.get_item(**kwargs)


@pytest.fixture
def make_table(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], Table]]:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    # Enough pooled connections for the threaded tests (boto3's default is 10).
    dynamodb = boto3.resource("dynamodb", config=Config(max_pool_connections=48))
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


def _tat(table: Table, user: str = "alice") -> Decimal:
    return Decimal(str(table.get_item(Key={"pk": LimitsRow.RATE.key(user)})["Item"]["tat"]))


def _limiter(table: Any, clock: FakeClock, *, rate: float = 1, burst: int = 5) -> RateLimiter:
    return RateLimiter(table, rate_per_second=rate, burst=burst, clock=clock)


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
    limiter.take("alice", cost=2)  # idle: tat = now + 2 * 2 s
    item = table.get_item(Key={"pk": "rate#alice"})["Item"]
    assert set(item) == {"pk", "tat", "expires_at"}
    assert item["pk"] == LimitsRow.RATE.key("alice")
    assert item["tat"] == Decimal(str(NOW + 4))
    assert int(str(item["expires_at"])) == int(NOW) + 4 + 60  # full again at tat, + 60
    limiter.take("alice")  # busy: tat += 2 s; expiry bounded by now + tau (10 s)
    item = table.get_item(Key={"pk": "rate#alice"})["Item"]
    assert item["tat"] == Decimal(str(NOW + 6))
    assert int(str(item["expires_at"])) == int(NOW) + 10 + 60


def test_a_denied_take_writes_nothing(make_table: Callable[[], Table]) -> None:
    table = make_table()
    clock = FakeClock()
    assert _limiter(table, clock, burst=1).take("alice").allowed
    before = table.get_item(Key={"pk": "rate#alice"})["Item"]
    clock.advance(0.5)
    assert not _limiter(table, clock, burst=1).take("alice").allowed  # via a failed write
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
        clock = FakeClock()
        limiter = RateLimiter(
            table, rate_per_second=1, burst=1, clock=clock, key_attribute="task_id"
        )
        assert [limiter.take("alice").allowed for _ in range(2)] == [True, False]
        cold = RateLimiter(table, rate_per_second=1, burst=1, clock=clock, key_attribute="task_id")
        assert not cold.take("alice").allowed
        assert "Item" in table.get_item(Key={"task_id": "rate#alice"})
    finally:
        table.delete()


# --- what a take costs ------------------------------------------------------------------


def test_requests_per_take(make_table: Callable[[], Table]) -> None:
    """No reads; an allowed take 1 write when the container guesses right, else 1 failed +
    1; a denial 1 failed write, or nothing when the container already saw the limit. (A
    wrong guess is always "idle": the hint is a tat once stored, and tat only grows.)"""
    counting = Counting(make_table())
    clock = FakeClock()
    warm = _limiter(counting, clock, burst=3)

    def cost(limiter: RateLimiter) -> tuple[bool, Counter[str]]:
        counting.reset()
        allowed = limiter.take("alice").allowed
        return allowed, counting.totals()

    assert cost(warm) == (True, Counter(write=1))  # new user: the idle write
    assert cost(warm) == (True, Counter(write=1))  # mid-burst, known: the busy write
    cold = _limiter(counting, clock, burst=3)  # another container: guesses idle
    assert cost(cold) == (True, Counter(failed_write=1, write=1))
    assert cost(_limiter(counting, clock, burst=3)) == (False, Counter(failed_write=1))
    assert cost(warm) == (False, Counter(failed_write=1))  # its hint was behind: it learns
    assert cost(warm) == (False, Counter())  # now it knows: denied locally
    clock.advance(3600)
    assert cost(warm) == (True, Counter(write=1))  # its hint is past: idle, rightly
    assert cost(_limiter(counting, clock, burst=3)) == (True, Counter(failed_write=1, write=1))


def test_a_rival_between_guess_and_write_costs_one_more_write(
    make_table: Callable[[], Table],
) -> None:
    counting = Counting(make_table())
    clock = FakeClock()
    rival = _limiter(counting.table, clock)
    loser = _limiter(counting, clock)
    counting.before_write = lambda: rival.take("alice")  # the bucket leaves idle first
    decision = loser.take("alice")
    assert (decision.allowed, decision.remaining) == (True, 3)
    assert counting.totals() == Counter(failed_write=1, write=1)
    assert _tat(counting.table) == Decimal(str(NOW + 2))


def test_a_rival_taking_the_last_token_makes_a_denial(make_table: Callable[[], Table]) -> None:
    counting = Counting(make_table())
    clock = FakeClock()
    rival = _limiter(counting.table, clock, burst=2)
    loser = _limiter(counting, clock, burst=2)
    assert loser.take("alice").allowed  # tat now + 1; loser will guess busy
    counting.reset()
    counting.before_write = lambda: rival.take("alice")  # tat now + 2: past the limit
    assert loser.take("alice") == RateDecision(
        allowed=False, limit=2, remaining=0, retry_after_seconds=1, reset_seconds=2
    )
    assert counting.totals() == Counter(failed_write=1)


def test_a_store_without_all_old_reads_once_on_a_lost_write(
    make_table: Callable[[], Table],
) -> None:
    counting = Counting(make_table(), drop_all_old=True)
    clock = FakeClock()
    assert _limiter(counting.table, clock).take("alice").allowed
    counting.reset()
    decision = _limiter(counting, clock).take("alice")  # guesses idle, loses, reads
    assert (decision.allowed, decision.remaining) == (True, 3)
    assert counting.totals() == Counter(failed_write=1, read=1, write=1)


def test_a_row_deleted_under_the_take(make_table: Callable[[], Table]) -> None:
    counting = Counting(make_table())
    clock = FakeClock()
    limiter = _limiter(counting, clock)
    assert limiter.take("alice").allowed  # hint: busy
    counting.reset()
    counting.before_write = lambda: counting.table.delete_item(Key={"pk": "rate#alice"})
    decision = limiter.take("alice")  # busy fails with no row: read, then idle
    assert (decision.allowed, decision.remaining) == (True, 4)
    assert counting.totals() == Counter(failed_write=1, read=1, write=1)


def test_a_row_from_the_old_token_bucket_reads_as_full(make_table: Callable[[], Table]) -> None:
    table = make_table()
    table.put_item(
        Item={
            "pk": "rate#alice",
            "tokens": Decimal(0),
            "updated_at": Decimal(str(NOW)),
            "expires_at": int(NOW) + 70,
        }
    )
    decision = _limiter(table, FakeClock()).take("alice")
    assert (decision.allowed, decision.remaining) == (True, 4)


def test_other_errors_propagate(make_table: Callable[[], Table]) -> None:
    counting = Counting(make_table())

    def throttled() -> None:
        raise ClientError(
            {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"}},
            "UpdateItem",
        )

    counting.before_write = throttled
    with pytest.raises(StoreError, match="ProvisionedThroughputExceeded"):
        _limiter(counting, FakeClock()).take("alice")


# --- concurrency ------------------------------------------------------------------------


def _race(
    threads: int, take: Callable[[], RateDecision], counting: Counting
) -> list[tuple[RateDecision, Counter[str]]]:
    """`threads` takes released together; each with the requests its thread made."""
    start = threading.Barrier(threads, timeout=10)

    def one(_: int) -> tuple[RateDecision, Counter[str]]:
        start.wait()
        decision = take()
        return decision, counting.by_thread.get(threading.get_ident(), Counter())

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(one, range(threads), timeout=60))


@pytest.mark.parametrize("containers", ["one limiter", "a limiter per take"])
@pytest.mark.parametrize("round_no", range(3))
def test_40_concurrent_takes_on_a_burst_of_30(
    make_table: Callable[[], Table], containers: str, round_no: int
) -> None:
    """Clock frozen: exactly 30 get through, each token once, nobody loses to contention
    (every take decided in at most 2 writes, no read), and the row holds 30 intervals."""
    counting = Counting(make_table())
    clock = FakeClock()
    shared = _limiter(counting, clock, burst=30)

    def take() -> RateDecision:
        limiter = shared if containers == "one limiter" else _limiter(counting, clock, burst=30)
        return limiter.take("alice")

    results = _race(40, take, counting)
    allowed = [d for d, _ in results if d.allowed]
    denied = [d for d, _ in results if not d.allowed]
    assert len(allowed) == 30
    assert sorted(d.remaining for d in allowed) == list(range(30))
    # Denied because the bucket was empty: the next token is 1 s away (rate 1, frozen clock).
    assert {(d.remaining, d.retry_after_seconds, d.reset_seconds) for d in denied} == {(0, 1, 30)}
    for _, requests in results:
        assert requests["write"] + requests["failed_write"] <= 2
        assert requests["write"] <= 1
        assert requests["read"] == 0
    item = counting.table.get_item(Key={"pk": "rate#alice"})["Item"]
    assert item["tat"] == Decimal(str(NOW + 30))
    assert int(str(item["expires_at"])) >= math.ceil(NOW + 30) + 60


def test_a_new_users_parallel_submits_all_pass_on_a_real_clock(
    make_table: Callable[[], Table],
) -> None:
    """The case that used to get spurious 429s: 21 at once from one new user, burst 200."""
    counting = Counting(make_table())
    results = _race(
        21,
        lambda: RateLimiter(counting, rate_per_second=0.5, burst=200).take("alice"),  # type: ignore[arg-type]
        counting,
    )
    assert all(d.allowed for d, _ in results)
    # 199 down to 179, give or take what refills while they run (0.5 a second); and one
    # less at most: a take counts the tokens left at its own `now`, which can be a few ms
    # older than the `now` that started the bucket (threads read the clock, then race).
    assert min(d.remaining for d, _ in results) >= 178
    assert all(r["write"] == 1 and r["failed_write"] <= 1 and not r["read"] for _, r in results)


def _in_turn(counting: Counting, *rivals: Callable[[], object]) -> None:
    """Each of `rivals` runs just before one of the next writes, in turn."""
    pending = list(rivals)

    def next_rival() -> None:
        rival = pending.pop(0)
        if pending:
            counting.before_write = next_rival
        rival()

    counting.before_write = next_rival


def test_the_limiter_tells_its_rate_and_burst(make_table: Callable[[], Table]) -> None:
    limiter = RateLimiter(make_table(), rate_per_second=2.5, burst=7, clock=FakeClock())

    assert (limiter.rate_per_second, limiter.burst) == (2.5, 7)


def test_three_lost_writes_ending_on_a_deleted_row_fail_closed_and_drop_the_hint(
    make_table: Callable[[], Table],
) -> None:
    counting = Counting(make_table())
    clock = FakeClock()
    limiter = _limiter(counting, clock)
    assert limiter.take("alice").allowed  # the hint: busy at now + 1
    delete = lambda: counting.table.delete_item(Key={"pk": "rate#alice"})  # noqa: E731
    rival = lambda: _limiter(counting.table, clock).take("alice")  # noqa: E731
    # Busy write: row gone. Idle write: a rival's row. Busy write: row gone again.
    _in_turn(counting, delete, rival, delete)

    decision = limiter.take("alice")

    # Fail closed, as if idle: no token spent, the minimum Retry-After.
    assert decision == RateDecision(
        allowed=False, limit=5, remaining=5, retry_after_seconds=1, reset_seconds=0
    )
    # The last write found no row: the hint is dropped, so the next take writes idle at once.
    counting.reset()
    assert limiter.take("alice").allowed
    assert counting.totals()["failed_write"] == 0


def test_three_lost_writes_ending_on_a_rivals_row_fail_closed_as_of_that_row(
    make_table: Callable[[], Table],
) -> None:
    counting = Counting(make_table())
    clock = FakeClock()
    limiter = _limiter(counting, clock)
    delete = lambda: counting.table.delete_item(Key={"pk": "rate#alice"})  # noqa: E731
    rival = lambda: _limiter(counting.table, clock).take("alice")  # noqa: E731
    # Idle write: a rival's row (tat now + 1). Busy write: row gone. Idle: a rival's row again.
    _in_turn(counting, rival, delete, rival)

    decision = limiter.take("alice")

    assert decision == RateDecision(
        allowed=False, limit=5, remaining=4, retry_after_seconds=1, reset_seconds=1
    )


def test_a_lost_write_on_a_row_with_no_tat_reads_as_no_row(make_table: Callable[[], Table]) -> None:
    counting = Counting(make_table())
    limiter = _limiter(counting, FakeClock())
    assert limiter.take("alice").allowed  # the hint: busy
    # The row is replaced by one without a tat (the old token bucket's): the busy write fails.
    counting.before_write = lambda: counting.table.put_item(
        Item={"pk": "rate#alice", "tokens": Decimal(3)}
    )

    decision = limiter.take("alice")

    assert (decision.allowed, decision.remaining) == (True, 4)


def test_the_hints_kept_are_bounded_and_never_go_back_in_time(
    make_table: Callable[[], Table], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rate_limiter, "HINTS_KEPT", 3)
    limiter = _limiter(make_table(), FakeClock())
    for user in ("a", "b", "c"):
        limiter.take(user)
    limiter.take("a")  # a known user when full: nothing dropped
    assert set(limiter._hints) == {"rate#a", "rate#b", "rate#c"}

    limiter.take("d")  # a new one when full: the hints start afresh

    assert set(limiter._hints) == {"rate#d"}
    # Of two sightings of a tat, the later (higher) one stays, whatever order they come in.
    limiter._remember("rate#d", Decimal(NOW + 50))
    limiter._remember("rate#d", Decimal(NOW + 20))
    assert limiter._hints["rate#d"] == Decimal(NOW + 50)


# --- refunds (the sign-in throttle counts failures only) -------------------------------------


def _refundable(table: Any, clock: FakeClock, *, burst: int = 3) -> RateLimiter:
    return RateLimiter(table, rate_per_second=1, burst=burst, clock=clock, refundable=True)


def test_a_refund_hands_back_exactly_the_token_a_take_spent(
    make_table: Callable[[], Table],
) -> None:
    clock = FakeClock()
    limiter = _refundable(make_table(), clock)
    assert [limiter.take("alice").allowed for _ in range(3)] == [True] * 3

    limiter.give_back("alice")

    assert limiter.take("alice").allowed
    assert not limiter.take("alice").allowed


def test_a_refund_in_another_container_is_seen_by_one_that_saw_the_bucket_empty(
    make_table: Callable[[], Table],
) -> None:
    # Given a container that took the last token (it remembers the bucket as empty)
    table, clock = Counting(make_table()), FakeClock()
    here, elsewhere = _refundable(table, clock), _refundable(table, clock)
    assert all(here.take("alice").allowed for _ in range(3))
    assert not here.take("alice").allowed

    # When another container hands a token back
    elsewhere.give_back("alice")

    # Then this one asks the table instead of denying from memory, and gets it
    assert here.take("alice").allowed
    assert not here.take("alice").allowed


def test_a_refund_of_a_row_gone_is_a_no_op_and_only_refundable_limiters_refund(
    make_table: Callable[[], Table],
) -> None:
    table, clock = make_table(), FakeClock()
    _refundable(table, clock).give_back("nobody")
    assert "Item" not in table.get_item(Key={"pk": LimitsRow.RATE.key("nobody")})
    with pytest.raises(ValueError, match="refundable"):
        _limiter(table, clock).give_back("alice")
