"""`Prefer: wait=N` parsing, waiting (fake clock) and answering, and the ETA arithmetic."""

from __future__ import annotations

import pytest

from gpuqueue.api.prefer_wait import (
    honour_prefer_wait,
    requested_wait,
    wait_budget,
    wait_until_final,
)
from gpuqueue.fleet.endpoint_registry import Fleet
from gpuqueue.intake.queue_position import estimate
from gpuqueue.models import Endpoint, Task, TaskKind, TaskStatus

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("wait=10", 10),
        ("respond-async, wait=5", 5),
        ("WAIT = 7", 7),
        ('wait="3"', 3),
        ("wait=600", 25),
        ("wait=0", None),
        ("wait=-1", None),
        ("wait=soon", None),
        ("return=minimal", None),
        (None, None),
    ],
)
def test_the_wait_preference_is_read_and_capped_at_25(header, seconds):
    assert requested_wait(header) == seconds


def test_the_wait_stays_inside_what_is_left_of_the_invocation():
    assert wait_budget(25, remaining_seconds=28.5) == 25
    assert wait_budget(25, remaining_seconds=10.0) == 8.0
    assert wait_budget(5, remaining_seconds=1.0) == 0.0


def _task(status: TaskStatus) -> Task:
    return Task(task_id="t", user_id="u", status=status, created_at="x", updated_at="x", attempt=0)


def test_waiting_reads_until_the_task_is_final_with_a_growing_interval():
    clock = [0.0]
    sleeps: list[float] = []
    reads = iter([TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.RUNNING, TaskStatus.DONE])

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock[0] += seconds

    task = wait_until_final(lambda: _task(next(reads)), 10, clock=lambda: clock[0], sleep=sleep)

    assert task.status is TaskStatus.DONE
    assert sleeps == pytest.approx([0.1, 0.15, 0.225])


def test_waiting_gives_up_at_the_deadline_with_the_last_state():
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    task = wait_until_final(
        lambda: _task(TaskStatus.QUEUED), 2, clock=lambda: clock[0], sleep=sleep
    )

    assert task.status is TaskStatus.QUEUED
    assert clock[0] == pytest.approx(2.0)


def test_a_request_without_a_wait_preference_is_answered_without_a_read():
    def read() -> Task:
        raise AssertionError("nothing is read when no wait is asked")

    assert (
        honour_prefer_wait("return=minimal", read, remaining_seconds=lambda: 29.0, seats=None)
        is None
    )


def test_a_final_task_answers_a_wait_at_once_with_preference_applied():
    reads: list[Task] = []

    def read() -> Task:
        reads.append(_task(TaskStatus.DONE))
        return reads[-1]

    answer = honour_prefer_wait("wait=40", read, remaining_seconds=lambda: 29.0, seats=None)

    assert answer is not None
    assert answer.task.status is TaskStatus.DONE
    assert answer.headers == {"Preference-Applied": "wait=25"}
    assert len(reads) == 1


def test_a_task_awaiting_its_upload_answers_a_wait_at_once_without_preference_applied():
    answer = honour_prefer_wait(
        "wait=5",
        lambda: _task(TaskStatus.AWAITING_UPLOAD),
        remaining_seconds=lambda: 29.0,
        seats=None,
    )

    assert answer is not None
    assert answer.task.status is TaskStatus.AWAITING_UPLOAD
    assert answer.headers == {}


def test_a_wait_with_no_time_left_in_the_invocation_answers_the_last_state_at_once():
    answer = honour_prefer_wait(
        "wait=5", lambda: _task(TaskStatus.QUEUED), remaining_seconds=lambda: 1.0, seats=None
    )

    assert answer is not None
    assert answer.task.status is TaskStatus.QUEUED
    assert answer.headers == {"Preference-Applied": "wait=5"}


def endpoint(name: str, capacity: int) -> Endpoint:
    return Endpoint(
        endpoint_id=name,
        url=f"http://{name}:8000",
        kind=TaskKind.IMAGE,
        capacity=capacity,
        healthy=True,
        last_checked_at=NOW - 1,
    )


def test_the_eta_divides_the_queue_ahead_by_the_fleets_rate():
    # 2 slots of 4 s and 1 slot of 12 s: 0.5 + 1/12 tasks a second.
    fleet = Fleet(
        endpoints=[endpoint("fast", 2), endpoint("slow", 1)],
        call_seconds={"fast": {0: 4.0, 1: 4.0}, "slow": {0: 12.0}},
    )

    eta = estimate(7, fleet, now=NOW, max_age_seconds=90)

    assert eta.queue_position == 7
    assert eta.eta_seconds == pytest.approx(7 / (0.5 + 1 / 12) + 8.0, abs=0.05)


def test_no_eta_without_measured_call_times():
    fleet = Fleet(endpoints=[endpoint("new", 4)])

    assert estimate(3, fleet, now=NOW, max_age_seconds=90).eta_seconds is None


def test_a_measured_gap_between_departures_replaces_the_fleets_rate():
    fleet = Fleet(endpoints=[endpoint("fast", 2)], call_seconds={"fast": {0: 4.0, 1: 4.0}})

    eta = estimate(5, fleet, now=NOW, max_age_seconds=90, gap_seconds=2.5)

    assert eta.eta_seconds == pytest.approx(5 * 2.5 + 4.0)


def test_the_eta_is_never_sooner_than_the_fleet_can_serve_the_tasks_ahead() -> None:
    # Two slots of 1 s calls: departures come in pairs (gaps 0.05 s, 0.95 s, ...), and an
    # average caught after a short gap says 0.3 s; the fleet cannot do better than 0.5 s.
    e = Endpoint(
        endpoint_id="gpu-a",
        url="http://gpu-a:8000",
        kind=TaskKind.IMAGE,
        capacity=2,
        healthy=True,
        last_checked_at=1000.0,
    )
    fleet = Fleet(endpoints=[e], call_seconds={"gpu-a": {0: 1.0, 1: 1.0}})

    fast_gap = estimate(18, fleet, now=1000.0, max_age_seconds=90, gap_seconds=0.3)
    slow_gap = estimate(18, fleet, now=1000.0, max_age_seconds=90, gap_seconds=0.7)

    assert fast_gap.eta_seconds == 18 / 2 + 1.0
    assert slow_gap.eta_seconds == round(18 * 0.7 + 1.0, 1)
