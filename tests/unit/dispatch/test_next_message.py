"""NextMessage: the next message received shortly before a kept slot's call should end."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from gpuqueue.dispatch.dispatcher import Pulled
from gpuqueue.dispatch.next_message import NextMessage
from gpuqueue.models import QueueMessage


class Receives:
    def __init__(self, *task_ids: str | None, fail_first: bool = False) -> None:
        self.waiting = list(task_ids)
        self.count = 0
        self.fail_first = fail_first
        self.done = threading.Event()

    def __call__(self) -> Pulled | None:
        self.count += 1
        self.done.set()
        if self.fail_first and self.count == 1:
            raise ConnectionError("queue unreachable")
        task_id = self.waiting.pop(0) if self.waiting else None
        if task_id is None:
            return None
        return Pulled(message=QueueMessage(task_id=task_id), receipt=f"r-{task_id}")


def ahead(receive: Receives, wanted: Callable[[str], bool] = lambda slot: True) -> NextMessage[str]:
    return NextMessage(receive, lead_seconds=0.5, wanted=wanted)


def test_a_message_due_before_the_call_ends_is_received_early_and_taken_once() -> None:
    receive = Receives("t1", "t2")
    nxt = ahead(receive)

    nxt.arm("slot", 1.1)  # due in 0.6 s: a 1.1 s call, 0.5 s lead
    assert receive.done.wait(5)

    pulled = nxt.take()
    assert pulled is not None
    assert pulled.message.task_id == "t1"
    assert receive.count == 1  # the take used the early receive
    assert nxt.unused() is None


def test_a_call_that_ends_before_the_receive_is_due_receives_then() -> None:
    receive = Receives("t1")
    nxt = ahead(receive)

    nxt.arm("slot", 600.0)  # not due for ten minutes
    pulled = nxt.take()

    assert pulled is not None
    assert pulled.message.task_id == "t1"
    assert receive.count == 1
    assert nxt.unused() is None  # the early receive was called off


def test_an_unmeasured_slot_or_a_short_call_receives_after_its_call() -> None:
    receive = Receives("t1")
    nxt = ahead(receive)

    nxt.arm("slot", None)
    nxt.arm("slot", 1.0)  # no more than twice the lead

    assert nxt.unused() is None
    assert receive.count == 0
    assert nxt.take() is not None
    assert receive.count == 1


def test_a_slot_not_worth_keeping_receives_nothing_early() -> None:
    asked: list[str] = []
    receive = Receives("t1")

    def wanted(slot: str) -> bool:
        asked.append(slot)
        return False

    nxt = ahead(receive, wanted)
    nxt.arm("slow-slot", 1.1)
    deadline = time.monotonic() + 5
    while not asked and time.monotonic() < deadline:
        time.sleep(0.01)

    assert asked == ["slow-slot"]
    assert receive.count == 0
    assert nxt.unused() is None


def test_an_empty_queue_at_the_early_receive_stands_for_the_hand_off() -> None:
    receive = Receives()
    nxt = ahead(receive)

    nxt.arm("slot", 1.1)
    assert receive.done.wait(5)

    assert nxt.take() is None
    assert receive.count == 1  # not asked again


def test_a_failed_early_receive_is_made_again_after_the_call() -> None:
    receive = Receives("t1", fail_first=True)
    nxt = ahead(receive)

    nxt.arm("slot", 1.1)
    assert receive.done.wait(5)
    pulled = nxt.take()

    assert pulled is not None
    assert pulled.message.task_id == "t1"
    assert receive.count == 2


def test_a_message_received_early_and_not_taken_is_handed_over_once() -> None:
    receive = Receives("t1")
    nxt = ahead(receive)

    nxt.arm("slot", 1.1)
    assert receive.done.wait(5)

    left = nxt.unused()
    assert left is not None
    assert left.message.task_id == "t1"
    assert nxt.unused() is None


def test_one_receive_is_due_at_a_time() -> None:
    receive = Receives("t1", "t2")
    nxt = ahead(receive)

    nxt.arm("slot", 1.1)
    assert receive.done.wait(5)
    nxt.arm("slot", 1.1)  # a message is in hand: nothing more is received

    pulled = nxt.take()
    assert pulled is not None
    assert pulled.message.task_id == "t1"
    assert receive.count == 1


class Prepares:
    def __init__(self, *, fail: bool = False) -> None:
        self.seen: list[tuple[str, str]] = []
        self.fail = fail

    def __call__(self, slot: str, pulled: Pulled) -> None:
        self.seen.append((slot, pulled.message.task_id))
        if self.fail:
            raise ConnectionError("table unreachable")


def test_the_hand_off_for_an_early_message_is_prepared_before_the_worker_can_take_it() -> None:
    receive = Receives("t1")
    prepare = Prepares()
    nxt = NextMessage(receive, lead_seconds=0.5, wanted=lambda slot: True, prepare=prepare)

    nxt.arm("slot-3", 1.1)
    assert receive.done.wait(5)
    pulled = nxt.take()  # waits for the preparation under way, if any

    assert pulled is not None
    assert prepare.seen == [("slot-3", "t1")]


def test_a_failed_preparation_still_hands_the_message_over() -> None:
    receive = Receives("t1")
    prepare = Prepares(fail=True)
    nxt = NextMessage(receive, lead_seconds=0.5, wanted=lambda slot: True, prepare=prepare)

    nxt.arm("slot", 1.1)
    assert receive.done.wait(5)
    pulled = nxt.take()

    assert pulled is not None
    assert pulled.message.task_id == "t1"
    assert receive.count == 1  # not received again: the worker prepares it itself
    assert prepare.seen == [("slot", "t1")]


def test_nothing_is_prepared_for_an_empty_queue_nor_for_a_receive_after_the_call() -> None:
    empty, prepare = Receives(), Prepares()
    nxt = NextMessage(empty, lead_seconds=0.5, wanted=lambda slot: True, prepare=prepare)
    nxt.arm("slot", 1.1)
    assert empty.done.wait(5)
    assert nxt.take() is None

    late = Receives("t1")
    after = NextMessage(late, lead_seconds=0.5, wanted=lambda slot: True, prepare=prepare)
    after.arm("slot", 30.0)  # the call ends long before the receive is due
    assert after.take() is not None

    assert prepare.seen == []


def test_the_worker_announces_when_it_will_want_its_next_message() -> None:
    receive = Receives("t1", "t2")
    announced: list[float | None] = []
    nxt: NextMessage[str] = NextMessage(
        receive, lead_seconds=0.5, wanted=lambda slot: True, announce=announced.append
    )
    nxt.arm("slot", 0.2)  # a short call: received after it, but announced all the same
    start = time.monotonic()
    assert announced[0] is not None
    assert abs(announced[0] - (start + 0.2)) < 0.05

    assert nxt.take() is not None
    # Received: the next want is after another call like it (re-announced when it starts).
    assert announced[1] is not None
    assert abs(announced[1] - (time.monotonic() + 0.2)) < 0.05

    assert nxt.unused() is None
    assert announced[-1] is None  # done: it wants nothing more


def test_an_unmeasured_slot_announces_nothing() -> None:
    receive = Receives("t1")
    announced: list[float | None] = []
    nxt: NextMessage[str] = NextMessage(
        receive, lead_seconds=0.5, wanted=lambda slot: True, announce=announced.append
    )
    nxt.arm("slot", None)

    assert nxt.take() is not None
    assert announced == [None]
