"""The dispatcher's watch on a running call: progress written at a bounded rate, a cancel
learnt from those writes (or one read when there is nothing new to write)."""

from __future__ import annotations

from typing import Any

from fakes import FakeClock
from gpuqueue.dispatch.task_watch import TaskWatch
from gpuqueue.models import Task, TaskProgress, TaskStatus
from gpuqueue.store.task_store import Claim, ProgressAck


class RecordingTasks:
    def __init__(self, answer: ProgressAck = ProgressAck.WRITTEN) -> None:
        self.answer = answer
        self.writes: list[TaskProgress] = []
        self.reads = 0

    def report_progress(self, claim: Claim, progress: TaskProgress) -> ProgressAck:
        self.writes.append(progress)
        return self.answer

    def stop_asked(self, claim: Claim) -> ProgressAck:
        self.reads += 1
        return self.answer


def _claim() -> Claim:
    task = Task(
        task_id="t-1",
        user_id="alice",
        status=TaskStatus.RUNNING,
        created_at="2026-12-07T00:00:00.000000Z",
        updated_at="2026-12-07T00:00:00.000000Z",
    )
    return Claim(task=task, lease_id="lease-1")


def _watch(tasks: RecordingTasks, clock: FakeClock) -> TaskWatch:
    return TaskWatch(tasks, _claim(), interval=2.0, clock=clock)  # type: ignore[arg-type]


def _polls(watch: TaskWatch, clock: FakeClock, seconds: float, *, step: Any = None) -> None:
    """The adapter's side thread: a poll a second, reporting `step(second)` if given."""
    for second in range(int(seconds)):
        clock.advance(1.0)
        if step is not None:
            watch.progress(step(second), 30)
        watch.wait_cancel(0)


def test_progress_is_written_at_most_once_per_interval_and_only_when_it_moved() -> None:
    tasks, clock = RecordingTasks(), FakeClock(1000.0)
    watch = _watch(tasks, clock)

    _polls(watch, clock, 10, step=lambda second: second + 1)  # a step a second for 10 s

    assert [p.step for p in tasks.writes] == [2, 4, 6, 8, 10]
    assert tasks.reads == 0
    assert tasks.writes[-1].fraction == round(10 / 30, 4)
    # The pace so far (a step a second) puts the end 20 s away.
    assert tasks.writes[-1].eta_seconds == 20.0


def test_with_no_new_step_the_cancel_is_looked_for_by_one_read_per_interval() -> None:
    tasks, clock = RecordingTasks(), FakeClock(1000.0)
    watch = _watch(tasks, clock)

    _polls(watch, clock, 6)  # Cog's sync mode: no steps reported

    assert tasks.writes == []
    assert tasks.reads == 3


def test_a_cancel_seen_by_the_write_stops_the_call() -> None:
    tasks, clock = RecordingTasks(ProgressAck.CANCEL_REQUESTED), FakeClock(1000.0)
    watch = _watch(tasks, clock)

    assert not watch.wait_cancel(0)  # nothing asked yet: within the first interval
    clock.advance(2.0)
    watch.progress(5, 30)

    assert watch.wait_cancel(0)
    assert watch.canceled


def test_a_lost_lease_stops_the_writes_but_not_the_call() -> None:
    tasks, clock = RecordingTasks(ProgressAck.LEASE_LOST), FakeClock(1000.0)
    watch = _watch(tasks, clock)

    _polls(watch, clock, 10, step=lambda second: second + 1)

    assert len(tasks.writes) == 1  # the refused one; the next holder writes its own
    assert not watch.canceled


def test_nothing_is_written_once_the_call_ended() -> None:
    tasks, clock = RecordingTasks(), FakeClock(1000.0)
    watch = _watch(tasks, clock)
    watch.progress(29, 30)
    watch.close()

    _polls(watch, clock, 6)

    assert tasks.writes == []
    assert tasks.reads == 0
