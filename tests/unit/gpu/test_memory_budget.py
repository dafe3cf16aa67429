"""MemoryBudget: a dispatcher's GPU answers never hold more than its budget at once; a call
waits (in turn, within its deadline) rather than overrun it, and every byte comes back."""

from __future__ import annotations

import gc
import threading

import pytest

from gpuqueue.gpu import memory_budget
from gpuqueue.gpu.memory_budget import (
    MIB,
    AnswerTooLarge,
    MemoryBudget,
    MemoryWaitExceeded,
)

DEADLINE = 10.0


def wait_until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    done = threading.Event()
    for _ in range(int(DEADLINE / 0.01)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError(f"not {what} within {DEADLINE} s")


def test_a_reservation_is_held_until_released() -> None:
    budget = MemoryBudget(100)
    hold = budget.hold()

    hold.reserve(60, within=0)
    assert (budget.used, hold.held) == (60, 60)
    hold.keep_only(20)  # the decoded output is smaller than its answer
    assert budget.used == 20
    hold.release()
    assert budget.used == 0


def test_a_call_that_would_overrun_the_budget_waits_for_another_to_give_back() -> None:
    budget = MemoryBudget(100)
    first = budget.hold()
    first.reserve(70, within=0)
    second = budget.hold()
    waiter = threading.Thread(target=lambda: second.reserve(50, within=DEADLINE))
    waiter.start()

    waiter.join(0.2)
    assert waiter.is_alive()
    assert budget.used == 70

    first.release()
    waiter.join(DEADLINE)
    assert not waiter.is_alive()
    assert budget.used == 50


def test_calls_are_served_in_turn_so_a_large_answer_is_not_overtaken() -> None:
    budget = MemoryBudget(100)
    first = budget.hold()
    first.reserve(60, within=0)
    order: list[str] = []
    large, small = budget.hold(), budget.hold()

    def take(hold, nbytes: int, name: str) -> None:  # type: ignore[no-untyped-def]
        hold.reserve(nbytes, within=DEADLINE)
        order.append(name)

    big = threading.Thread(target=take, args=(large, 90, "large"))
    big.start()
    wait_until(lambda: len(budget._queue) == 1, "queued")
    little = threading.Thread(target=take, args=(small, 30, "small"))
    little.start()
    wait_until(lambda: len(budget._queue) == 2, "queued")
    # 30 would fit now beside the 60, but the large one asked first.
    little.join(0.2)
    assert order == []

    first.release()
    big.join(DEADLINE)
    assert order == ["large"]
    large.release()
    little.join(DEADLINE)
    assert order == ["large", "small"]


def test_a_wait_past_the_calls_time_ends_holding_nothing() -> None:
    budget = MemoryBudget(100)
    holder = budget.hold()
    holder.reserve(100, within=0)
    late = budget.hold()

    with pytest.raises(MemoryWaitExceeded):
        late.reserve(10, within=0.05)

    assert (late.held, budget.used, len(budget._queue)) == (0, 100, 0)


def test_an_answer_larger_than_the_whole_budget_is_refused_at_once() -> None:
    budget = MemoryBudget(100)

    with pytest.raises(AnswerTooLarge, match="MemorySize"):
        budget.hold().reserve(101, within=DEADLINE)
    assert budget.used == 0


def test_a_hold_dropped_without_release_gives_its_bytes_back() -> None:
    budget = MemoryBudget(100)
    hold = budget.hold()
    hold.reserve(80, within=0)

    del hold
    gc.collect()

    assert budget.used == 0


def test_an_announced_answer_reserves_its_size_times_what_decoding_takes() -> None:
    budget = MemoryBudget(1000)
    hold = budget.hold()

    cap = hold.for_answer(100, limit=300, factor=3, within=0)

    assert (hold.held, cap) == (300, 300)


def test_an_unannounced_answer_reserves_its_limit_or_runs_alone_held_to_what_fits() -> None:
    budget = MemoryBudget(1000)
    small = budget.hold()
    assert small.for_answer(None, limit=200, factor=3, within=0) == 200
    assert small.held == 600
    small.release()

    alone = budget.hold()
    assert alone.for_answer(None, limit=500, factor=4, within=0) == 250  # 1000 / 4
    assert alone.held == 1000


def test_no_budget_never_waits_nor_refuses() -> None:
    budget = MemoryBudget(None)
    hold = budget.hold()

    hold.reserve(10**12, within=0)
    assert hold.for_answer(None, limit=10**9, factor=3, within=0) == 10**9
    assert budget.used == 0


def test_a_functions_budget_is_its_memory_less_what_the_runtime_took_and_headroom(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory_budget, "resident_peak_bytes", lambda: 90 * MIB)

    budget = MemoryBudget.of_function(144, headroom_mb=16)

    assert budget.total == 38 * MIB


def test_a_real_process_has_a_resident_peak() -> None:
    assert memory_budget.resident_peak_bytes() > 10 * MIB
