"""WorkerGroup: how many calls one invocation runs at once, and when it looks for more."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import pytest

from gpuqueue.dispatch.worker_group import WorkerGroup

# How long a test waits for the group to act (its threads act within milliseconds).
DEADLINE = 10.0


class Backlog:
    """Messages waiting; each worker's work holds a 'call' open until the test lets it end,
    then (like a worker keeping its slot) takes the next message itself."""

    def __init__(self, messages: int, *, slots: int = 100, keeps: bool = True) -> None:
        self.keeps = keeps  # a worker takes its next message itself (least-loaded keeps slots)
        self.waiting = list(range(messages))
        self.slots = slots  # free in the fleet
        self.asked: list[int] = []  # how many messages each look asked for
        self.looks = 0
        self.done: list[int] = []
        self.running = 0
        self.peak = 0
        self._lock = threading.Lock()
        self.release = threading.Event()
        self.group: WorkerGroup | None = None

    def free_slots(self) -> int:
        return self.slots

    def pull(self) -> int | None:
        with self._lock:
            if not self.waiting:
                return None
            message = self.waiting.pop(0)
        if self.group is not None and self.waiting:
            self.group.backlog_seen()  # as the handler's puller does
        return message

    def start_some(self, count: int) -> list[Callable[[], None]]:
        self.looks += 1
        self.asked.append(count)
        with self._lock:
            taken, self.waiting = self.waiting[:count], self.waiting[count:]
        if taken and self.waiting and self.group is not None:
            self.group.backlog_seen()
        return [functools.partial(self.serve, message) for message in taken]

    def serve(self, message: int | None) -> None:
        while message is not None:
            with self._lock:
                self.running += 1
                self.peak = max(self.peak, self.running)
            assert self.release.wait(DEADLINE)
            with self._lock:
                self.running -= 1
                self.done.append(message)
            message = self.pull() if self.keeps else None


def group_for(backlog: Backlog, size: int, *, remaining: float = 900.0) -> WorkerGroup:
    group = WorkerGroup(
        size=size,
        start_some=backlog.start_some,
        free_slots=backlog.free_slots,
        remaining_seconds=lambda: remaining,
        min_seconds=125.0,
    )
    backlog.group = group
    return group


def run_first(backlog: Backlog, group: WorkerGroup, *, let_go: Callable[[], bool]) -> None:
    """The invocation's own first task, inside the group, with the calls held until
    `let_go()` holds (checked against a deadline), then released."""
    first = backlog.pull()
    releaser = threading.Thread(target=_release_when, args=(backlog, let_go))
    releaser.start()
    with group:
        backlog.serve(first)
    releaser.join(DEADLINE)


def _release_when(backlog: Backlog, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not (condition() or backlog.release.is_set()) and time.monotonic() < deadline:
        time.sleep(0.01)
    backlog.release.set()


def test_a_backlog_fills_the_group_to_its_size_and_no_further():
    backlog = Backlog(messages=9)
    group = group_for(backlog, size=3)

    run_first(backlog, group, let_go=lambda: backlog.running == 3)

    assert backlog.peak == 3
    assert sorted(backlog.done) == list(range(9))  # every message, each once
    assert group.started == 2  # the first task and two more workers
    assert backlog.asked[0] == 2  # both in one receive


def test_a_look_takes_no_more_messages_than_the_fleet_has_free_slots():
    backlog = Backlog(messages=9, slots=1)
    group = group_for(backlog, size=4)

    run_first(backlog, group, let_go=lambda: backlog.looks >= 1)

    assert backlog.asked[0] == 1
    assert max(backlog.asked) == 1


def test_workers_that_end_after_one_task_are_replaced_while_messages_wait():
    # The strategies that choose an endpoint per task keep no slot: each worker runs one.
    backlog = Backlog(messages=7, keeps=False)
    group = group_for(backlog, size=3)
    first = backlog.pull()

    with group:
        backlog.release.set()
        backlog.serve(first)
        _wait_until(lambda: len(backlog.done) == 7)

    assert sorted(backlog.done) == list(range(7))
    assert backlog.peak <= 3
    assert group.started == 6


def test_one_call_per_invocation_never_looks_for_more():
    backlog = Backlog(messages=4)
    group = group_for(backlog, size=1)

    run_first(backlog, group, let_go=lambda: backlog.running == 1)

    assert backlog.looks == 0
    assert backlog.peak == 1
    assert sorted(backlog.done) == [0, 1, 2, 3]  # the one worker still takes the rest


def test_without_a_free_slot_in_the_fleet_no_message_is_taken():
    backlog = Backlog(messages=4, slots=0)
    group = group_for(backlog, size=4)

    run_first(backlog, group, let_go=lambda: backlog.running == 1)

    assert backlog.looks == 0
    assert backlog.peak == 1


def test_without_time_for_a_whole_call_no_worker_is_started():
    backlog = Backlog(messages=4)
    group = group_for(backlog, size=4, remaining=100.0)  # < min_seconds (125)

    run_first(backlog, group, let_go=lambda: backlog.running == 1)

    assert group.started == 0
    assert backlog.peak == 1


def test_an_idle_queue_costs_one_look_per_invocation():
    backlog = Backlog(messages=1)
    group = group_for(backlog, size=4)

    run_first(backlog, group, let_go=lambda: backlog.looks >= 1)

    assert backlog.looks == 1
    assert group.started == 0


def test_the_group_ends_only_when_every_worker_has():
    backlog = Backlog(messages=3)
    group = group_for(backlog, size=3)
    backlog.pull()  # the first task's message: its work ends at once below
    releaser = threading.Thread(target=_release_when, args=(backlog, lambda: backlog.running == 2))
    releaser.start()

    with group:
        _wait_until(lambda: group.started == 2)
    running_when_the_invocation_ended = backlog.running
    releaser.join(DEADLINE)

    assert running_when_the_invocation_ended == 0
    assert sorted(backlog.done) == [1, 2]


def _wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert condition()


def test_a_group_of_no_calls_is_refused():
    with pytest.raises(ValueError, match=r"^size must be at least 1$"):
        WorkerGroup(
            size=0,
            start_some=lambda count: [],
            free_slots=lambda: 1,
            remaining_seconds=lambda: 900.0,
            min_seconds=1.0,
        )


class Scripted:
    """A fleet and a queue the test scripts: `free_slots` answers from `free` (its last
    answer repeated), each look starts up to `per_look` works, and each work runs until the
    test ends it."""

    def __init__(self, *, free: list[int], per_look: int = 1) -> None:
        self.free = list(free)
        self.per_look = per_look
        self.fleet_reads = 0
        self.looks = 0
        self.ends: list[threading.Event] = []
        self.changed = threading.Condition()

    def free_slots(self) -> int:
        with self.changed:
            self.fleet_reads += 1
            answer = self.free.pop(0) if len(self.free) > 1 else self.free[0]
            self.changed.notify_all()
            return answer

    def start_some(self, count: int) -> list[Callable[[], None]]:
        with self.changed:
            self.looks += 1
            events = [threading.Event() for _ in range(min(count, self.per_look))]
            self.ends.extend(events)
            self.changed.notify_all()
        return [functools.partial(self._work, end) for end in events]

    @staticmethod
    def _work(end: threading.Event) -> None:
        assert end.wait(DEADLINE)

    def wait_for(self, condition: Callable[[], bool]) -> None:
        with self.changed:
            assert self.changed.wait_for(condition, DEADLINE)

    def end_all(self) -> None:
        for end in list(self.ends):
            end.set()

    def group(self, size: int, *, remaining: float = 900.0) -> WorkerGroup:
        return WorkerGroup(
            size=size,
            start_some=self.start_some,
            free_slots=self.free_slots,
            remaining_seconds=lambda: remaining,
            min_seconds=125.0,
        )


def test_a_group_of_two_runs_a_second_call():
    script = Scripted(free=[1, 0])

    with script.group(size=2):
        script.wait_for(lambda: script.looks == 1)
        script.end_all()

    assert len(script.ends) == 1


def test_starting_a_worker_looks_again_at_once_while_the_group_has_room():
    script = Scripted(free=[1, 1, 0])

    with script.group(size=3):
        script.wait_for(lambda: script.looks == 2)  # no worker has ended, no backlog seen
        script.end_all()

    assert len(script.ends) == 2


def test_a_worker_ending_after_a_look_that_found_work_makes_the_scout_look_again():
    # Look 1 starts a worker; look 2 finds every slot taken. When the worker ends, messages
    # were last seen waiting, so its place is looked at again (look 3 starts another).
    script = Scripted(free=[1, 0, 1, 0])

    with script.group(size=3):
        script.wait_for(lambda: script.fleet_reads == 2)
        script.ends[0].set()
        script.wait_for(lambda: script.looks == 2)
        script.end_all()

    assert len(script.ends) == 2


def test_a_backlog_seen_while_every_slot_was_taken_wakes_the_scout():
    script = Scripted(free=[0, 1, 0])

    with script.group(size=3) as group:
        script.wait_for(lambda: script.fleet_reads == 1)  # no free slot: nothing taken
        assert script.looks == 0
        group.backlog_seen()  # a worker found a message waiting at its hand-off
        script.wait_for(lambda: script.looks == 1)
        script.end_all()

    assert len(script.ends) == 1


def test_a_full_group_does_not_read_the_fleet_again():
    script = Scripted(free=[1, 0])

    with script.group(size=2):
        script.wait_for(lambda: script.looks == 1)  # the group is full now
        # Nothing is due to happen: a read within the next moments would be a wasted query.
        with script.changed:
            read_again = script.changed.wait_for(lambda: script.fleet_reads > 1, 0.3)
        script.end_all()

    assert not read_again


def test_a_call_that_fits_the_time_left_exactly_is_started():
    script = Scripted(free=[1, 0])

    with script.group(size=2, remaining=125.0):  # min_seconds is 125
        script.wait_for(lambda: script.looks == 1)
        script.end_all()

    assert len(script.ends) == 1


def test_a_look_that_fails_starts_nothing_and_the_invocation_goes_on():
    def failing(count: int) -> list[Callable[[], None]]:
        raise RuntimeError("ReceiveMessage failed")

    reads: list[int] = []
    group = WorkerGroup(
        size=3,
        start_some=failing,
        free_slots=lambda: reads.append(1) or 2,
        remaining_seconds=lambda: 900.0,
        min_seconds=125.0,
    )

    with group:
        _wait_until(lambda: len(reads) == 1)

    assert group.started == 0
