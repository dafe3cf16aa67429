"""ActiveTaskShare on one limits table (from template.yaml), no stack: the K-per-user bound,
what a full set does with ended tasks, releases, and exactness under threads.

The whole-stack behaviour (a submit past the share is a 429, the stream frees a share when a
task ends) is in test_active_share.py; these drive the class directly, fast enough for
`make mutate` to run against every mutant.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from botocore.exceptions import ClientError

from fakes import FakeClock
from gpuqueue.errors import ActiveTaskLimit, StoreError
from gpuqueue.intake.active_share import ActiveTaskShare
from gpuqueue.intake.rate_limiter import RateLimiter
from gpuqueue.store.limits_rows import LimitsRow


@pytest.fixture
def table(template_table: Callable[[str], Any]) -> Any:
    return template_table("LimitsTable")


class CountingTable:
    """The table, counting writes."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.table, name)

    def update_item(self, **kwargs: Any) -> Any:
        self.writes += 1
        return self.table.update_item(**kwargs)


class Finder:
    """find_inactive: answers `inactive`, remembering what it was asked."""

    def __init__(self, inactive: set[str]) -> None:
        self.inactive = inactive
        self.asked: list[list[str]] = []

    def __call__(self, task_ids: Collection[str]) -> set[str]:
        self.asked.append(list(task_ids))
        return set(self.inactive)


def test_k_tasks_are_taken_and_the_next_is_refused_naming_the_limit(table: Any) -> None:
    share = ActiveTaskShare(table, limit=2)
    share.take("alice", "t1")
    share.take("alice", "t2")

    with pytest.raises(ActiveTaskLimit) as refused:
        share.take("alice", "t3")

    assert refused.value.field == "active_tasks"
    assert refused.value.headers == {"X-ActiveTasks-Limit": "2"}
    assert refused.value.message == (
        "at most 2 active (queued or running) tasks per user; wait for one to finish or cancel one"
    )
    assert share.active("alice") == {"t1", "t2"}


def test_the_share_is_one_row_per_user_holding_the_task_ids(table: Any) -> None:
    share = ActiveTaskShare(table, limit=3)
    share.take("alice", "t1")
    share.take("alice", "t2")
    share.take("bob", "t9")

    row = table.get_item(Key={"pk": LimitsRow.ACTIVE_SHARE.key("alice")}, ConsistentRead=True)[
        "Item"
    ]

    assert row == {"pk": "active#alice", "active": {"t1", "t2"}}
    assert share.active("bob") == {"t9"}
    assert share.active("carol") == set()


def test_taking_the_same_task_twice_counts_it_once(table: Any) -> None:
    share = ActiveTaskShare(table, limit=2)
    share.take("alice", "t1")
    share.take("alice", "t1")

    share.take("alice", "t2")  # room for a second task still

    assert share.active("alice") == {"t1", "t2"}


def test_a_full_set_drops_its_ended_tasks_then_takes(table: Any) -> None:
    finder = Finder(inactive={"t1"})
    share = ActiveTaskShare(table, limit=2, find_inactive=finder)
    share.take("alice", "t1")
    share.take("alice", "t2")

    share.take("alice", "t3")

    assert finder.asked == [["t1", "t2"]]  # only the full set's ids, sorted, once
    assert share.active("alice") == {"t2", "t3"}


def test_a_full_set_of_active_tasks_refuses_and_loses_nothing(table: Any) -> None:
    # The finder names an id that is not in the set: nothing of the set is dropped.
    finder = Finder(inactive={"t-elsewhere"})
    share = ActiveTaskShare(table, limit=2, find_inactive=finder)
    share.take("alice", "t1")
    share.take("alice", "t2")

    with pytest.raises(ActiveTaskLimit):
        share.take("alice", "t3")

    assert share.active("alice") == {"t1", "t2"}


def test_without_a_finder_a_full_set_refuses_as_it_stands(table: Any) -> None:
    share = ActiveTaskShare(table, limit=1)
    share.take("alice", "t1")

    with pytest.raises(ActiveTaskLimit):
        share.take("alice", "t2")


def test_only_the_finder_is_asked_when_the_set_is_full(table: Any) -> None:
    finder = Finder(inactive=set())
    share = ActiveTaskShare(table, limit=2, find_inactive=finder)
    share.take("alice", "t1")
    share.take("alice", "t2")

    assert finder.asked == []


def test_a_release_stops_counting_one_task_and_may_come_twice(table: Any) -> None:
    share = ActiveTaskShare(table, limit=2)
    share.take("alice", "t1")
    share.take("alice", "t2")
    share.take("bob", "t1")

    share.release("alice", "t1")
    share.release("alice", "t1")

    assert share.active("alice") == {"t2"}
    assert share.active("bob") == {"t1"}  # another user's task of the same id stays
    share.take("alice", "t3")  # the freed room is usable


def test_a_release_for_a_user_with_no_row_writes_no_row(table: Any) -> None:
    share = ActiveTaskShare(table, limit=2)

    share.release("nobody", "t1")
    share.release_many("nobody", {"t1", "t2"})

    assert "Item" not in table.get_item(
        Key={"pk": LimitsRow.ACTIVE_SHARE.key("nobody")}, ConsistentRead=True
    )


def test_release_many_is_one_write_and_none_for_no_ids(table: Any) -> None:
    counting = CountingTable(table)
    share = ActiveTaskShare(counting, limit=3)
    for task_id in ("t1", "t2", "t3"):
        share.take("alice", task_id)
    counting.writes = 0

    share.release_many("alice", {"t1", "t3"})
    assert counting.writes == 1
    share.release_many("alice", set())
    assert counting.writes == 1

    assert share.active("alice") == {"t2"}


def test_a_take_is_one_write(table: Any) -> None:
    counting = CountingTable(table)
    share = ActiveTaskShare(counting, limit=3)

    share.take("alice", "t1")

    assert counting.writes == 1


def test_a_limit_below_one_is_refused(table: Any) -> None:
    with pytest.raises(ValueError, match=r"^limit must be at least 1$"):
        ActiveTaskShare(table, limit=0)
    assert ActiveTaskShare(table, limit=1).limit == 1


def test_concurrent_takes_past_the_limit_let_exactly_k_through(table: Any) -> None:
    share = ActiveTaskShare(table, limit=5)

    def take(i: int) -> bool:
        try:
            share.take("alice", f"t{i}")
        except ActiveTaskLimit:
            return False
        return True

    with ThreadPoolExecutor(max_workers=12) as pool:
        taken = list(pool.map(take, range(12)))

    assert sum(taken) == 5
    assert share.active("alice") == {f"t{i}" for i, ok in enumerate(taken) if ok}


class FailingTable:
    """A table whose writes fail with a throttle (not a condition)."""

    def __init__(self, table: Any) -> None:
        self.table = table

    def __getattr__(self, name: str) -> Any:
        return getattr(self.table, name)

    def update_item(self, **kwargs: Any) -> Any:
        raise ClientError(
            {"Error": {"Code": "ProvisionedThroughputExceededException", "Message": "slow"}},
            "UpdateItem",
        )


def test_errors_other_than_a_full_set_reach_the_caller(table: Any) -> None:
    share = ActiveTaskShare(FailingTable(table), limit=2)

    with pytest.raises(StoreError, match="ProvisionedThroughputExceeded"):
        share.take("alice", "t1")
    with pytest.raises(StoreError, match="ProvisionedThroughputExceeded"):
        share.release("alice", "t1")


# --- with the rate limiter: one write takes the token and the share -------------------------


def _limiter(table: Any, *, burst: int = 5, rate: float = 0.5, clock: Any = None) -> RateLimiter:
    return RateLimiter(
        table,
        rate_per_second=rate,
        burst=burst,
        clock=clock or FakeClock(),
        rows=LimitsRow.ACTIVE_SHARE,
    )


def test_a_submit_takes_its_token_and_its_share_in_one_write_on_one_row(table: Any) -> None:
    counting = CountingTable(table)
    limiter = _limiter(counting)
    share = ActiveTaskShare(counting, limit=3)  # type: ignore[arg-type]

    decisions = [share.take("alice", f"t{i}", rate=limiter) for i in range(3)]

    assert counting.writes == 3
    assert [d.remaining for d in decisions if d is not None] == [4, 3, 2]
    row = table.get_item(Key={"pk": LimitsRow.ACTIVE_SHARE.key("alice")}, ConsistentRead=True)[
        "Item"
    ]
    assert row["active"] == {"t0", "t1", "t2"}
    assert "tat" in row
    # TTL must never delete a row that still counts tasks.
    assert "expires_at" not in row


def test_a_full_share_refuses_without_spending_a_token(table: Any) -> None:
    limiter = _limiter(table)
    share = ActiveTaskShare(table, limit=1)
    share.take("alice", "t1", rate=limiter)
    tat = table.get_item(Key={"pk": LimitsRow.ACTIVE_SHARE.key("alice")}, ConsistentRead=True)[
        "Item"
    ]["tat"]

    with pytest.raises(ActiveTaskLimit):
        share.take("alice", "t2", rate=limiter)

    row = table.get_item(Key={"pk": LimitsRow.ACTIVE_SHARE.key("alice")}, ConsistentRead=True)[
        "Item"
    ]
    assert row["tat"] == tat
    assert row["active"] == {"t1"}


def test_a_rate_denial_takes_no_share(table: Any) -> None:
    limiter = _limiter(table, burst=1, rate=0.1)
    share = ActiveTaskShare(table, limit=5)
    assert share.take("alice", "t1", rate=limiter).allowed  # type: ignore[union-attr]

    denied = share.take("alice", "t2", rate=limiter)
    # Another container, knowing nothing, writes and learns the same from the row.
    cold = share.take("alice", "t3", rate=_limiter(table, burst=1, rate=0.1))

    assert denied is not None
    assert not denied.allowed
    assert denied.retry_after_seconds == 10
    assert cold is not None
    assert not cold.allowed
    assert share.active("alice") == {"t1"}


def test_a_full_share_drops_ended_tasks_it_learned_from_the_failed_write(table: Any) -> None:
    counting = CountingTable(table)
    limiter = _limiter(counting)
    finder = Finder({"t1"})
    share = ActiveTaskShare(counting, limit=2, find_inactive=finder)  # type: ignore[arg-type]
    share.take("alice", "t1", rate=limiter)
    share.take("alice", "t2", rate=limiter)
    reads: list[Any] = []
    counting.get_item = lambda **kw: reads.append(kw)  # type: ignore[attr-defined]

    decision = share.take("alice", "t3", rate=limiter)

    assert decision is not None
    assert decision.allowed
    assert finder.asked == [["t1", "t2"]]  # the ids came back with the failed write
    assert reads == []
    assert ActiveTaskShare(table, limit=2).active("alice") == {"t2", "t3"}


def test_racing_submits_with_the_rate_never_exceed_the_share_or_the_burst(table: Any) -> None:
    limiter = _limiter(table, burst=6, rate=0.001)
    share = ActiveTaskShare(table, limit=4)

    def submit(i: int) -> str:
        try:
            decision = share.take("alice", f"t{i}", rate=limiter)
        except ActiveTaskLimit:
            return "share"
        return "ok" if decision is not None and decision.allowed else "rate"

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(submit, range(12)))

    assert outcomes.count("ok") == 4
    assert outcomes.count("share") == 8  # the rate would have admitted 6: the share is first hit
    assert len(share.active("alice")) == 4
