"""SharedReceive: one receive for the messages of every worker due about now."""

from __future__ import annotations

import threading

import pytest

from fakes import FakeClock
from gpuqueue.dispatch.shared_receive import SharedReceive


class Queue:
    """Messages m0, m1, ... ; records each receive's size and each release."""

    def __init__(self, waiting: int) -> None:
        self.waiting = [f"m{i}" for i in range(waiting)]
        self.asked: list[int] = []
        self.released: list[list[str]] = []

    def receive(self, count: int) -> list[str]:
        self.asked.append(count)
        got, self.waiting = self.waiting[:count], self.waiting[count:]
        return got

    def release(self, messages: list[str]) -> None:
        self.released.append(list(messages))
        self.waiting = list(messages) + self.waiting


def shared(queue: Queue, clock: FakeClock, *, dry: float = 0.0) -> SharedReceive[str]:
    return SharedReceive(
        queue.receive,
        queue.release,
        window_seconds=1.0,
        hold_seconds=2.0,
        dry_seconds=dry,
        clock=clock,
    )


def test_workers_due_together_share_one_receive() -> None:
    queue, clock = Queue(10), FakeClock()
    receiver = shared(queue, clock)
    workers = [object() for _ in range(3)]
    for i, worker in enumerate(workers):
        receiver.expect(worker, clock.now + 0.2 * i)  # all within the window

    firsts = [receiver.pull() for _ in workers]

    assert firsts == [["m0"], ["m1"], ["m2"]]
    assert queue.asked == [3]
    assert receiver.receives == 1


def test_a_worker_due_later_than_the_window_is_not_received_for() -> None:
    queue, clock = Queue(10), FakeClock()
    receiver = shared(queue, clock)
    now, later = object(), object()
    receiver.expect(now, clock.now)
    receiver.expect(later, clock.now + 5.0)

    assert receiver.pull() == ["m0"]
    assert queue.asked == [1]
    assert queue.waiting[0] == "m1"  # still in the queue, for anyone


def test_a_worker_that_has_its_message_is_not_counted() -> None:
    queue, clock = Queue(10), FakeClock()
    receiver = shared(queue, clock)
    a, b = object(), object()
    receiver.expect(a, clock.now)
    receiver.expect(b, clock.now)
    receiver.expect(b, None)

    receiver.pull()

    assert queue.asked == [1]


def test_a_message_its_worker_did_not_come_for_goes_back_at_once() -> None:
    queue, clock = Queue(10), FakeClock()
    receiver = shared(queue, clock)
    for _ in range(2):
        receiver.expect(object(), clock.now)
    assert receiver.pull() == ["m0"]  # m1 left for the other worker

    clock.now += 2.5  # it never came (its call ran long)
    got = receiver.pull()

    assert queue.released == [["m1"]]
    # The stale message is not handed out; the pull receives afresh (m1 is visible again).
    assert got == ["m1"]
    assert queue.asked == [2, 2]


def test_what_is_left_at_the_end_goes_back_in_one_release() -> None:
    queue, clock = Queue(10), FakeClock()
    receiver = shared(queue, clock)
    for _ in range(4):
        receiver.expect(object(), clock.now)
    receiver.pull()

    receiver.close()

    assert queue.released == [["m1", "m2", "m3"]]
    receiver.close()  # nothing more
    assert len(queue.released) == 1


def test_a_pull_for_several_takes_what_is_left_first() -> None:
    queue, clock = Queue(10), FakeClock()
    receiver = shared(queue, clock)
    workers = [object() for _ in range(3)]
    for worker in workers:
        receiver.expect(worker, clock.now)
    receiver.pull()
    for worker in workers:
        receiver.expect(worker, None)  # they ended: the scout starts new ones

    assert receiver.pull(4) == ["m1", "m2", "m3", "m4"]
    assert queue.asked == [3, 2]


def test_one_receive_asks_for_at_most_ten() -> None:
    queue, clock = Queue(30), FakeClock()
    receiver = shared(queue, clock)
    for _ in range(15):
        receiver.expect(object(), clock.now)

    receiver.pull()

    assert queue.asked == [10]


def test_an_empty_queue_costs_one_receive_and_leaves_nothing() -> None:
    queue, clock = Queue(0), FakeClock()
    receiver = shared(queue, clock)
    for _ in range(3):
        receiver.expect(object(), clock.now)

    assert receiver.pull() == []
    receiver.close()
    assert queue.released == []


def test_racing_pulls_never_receive_twice_for_the_same_workers() -> None:
    queue, clock = Queue(100), FakeClock()
    receiver = shared(queue, clock)
    for _ in range(8):
        receiver.expect(object(), clock.now)
    got: list[list[str]] = []
    lock = threading.Lock()

    def pull() -> None:
        messages = receiver.pull()
        with lock:
            got.append(messages)

    threads = [threading.Thread(target=pull) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert sorted(m for ms in got for m in ms) == sorted(f"m{i}" for i in range(8))
    assert queue.asked == [8]


def test_hold_must_cover_the_window() -> None:
    queue = Queue(0)
    with pytest.raises(ValueError, match="hold_seconds"):
        SharedReceive(queue.receive, queue.release, window_seconds=2.0, hold_seconds=1.0)


def test_workers_ending_together_end_on_one_empty_receive() -> None:
    queue, clock = Queue(0), FakeClock()
    receiver = shared(queue, clock, dry=0.5)

    assert [receiver.pull() for _ in range(4)] == [[], [], [], []]
    assert len(queue.asked) == 1

    clock.now += 0.6  # later, the queue is asked again
    queue.waiting = ["late"]
    assert receiver.pull() == ["late"]
    assert len(queue.asked) == 2


def test_a_short_answer_is_not_taken_for_a_drained_queue() -> None:
    queue, clock = Queue(1), FakeClock()
    receiver = shared(queue, clock, dry=0.5)
    for _ in range(3):
        receiver.expect(object(), clock.now)

    assert receiver.pull() == ["m0"]  # asked for 3, got 1: a short poll may do that
    queue.waiting = ["m1"]
    assert receiver.pull() == ["m1"]
    assert queue.asked == [3, 3]
