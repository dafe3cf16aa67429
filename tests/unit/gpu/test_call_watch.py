"""`watched`: a blocking GPU call followed by a side thread that polls its progress and stops
it when its owner cancels."""

from __future__ import annotations

import threading

import pytest

from gpuqueue.errors import GpuCanceled, RetryableGpuError
from gpuqueue.gpu.call_watch import NO_WATCH, watched

DEADLINE = 5.0


class ScriptedWatch:
    """Cancels once `cancel_after` waits have passed (None: never)."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.cancel_after = cancel_after
        self.waits = 0
        self.steps: list[tuple[int, int]] = []

    def progress(self, step: int, steps: int, *, eta_seconds: float | None = None) -> None:
        self.steps.append((step, steps))

    def job_started(self, job_id: str) -> None:
        return None

    def wait_cancel(self, seconds: float) -> bool:
        self.waits += 1
        return self.cancel_after is not None and self.waits > self.cancel_after


def test_the_call_s_result_comes_back_and_progress_is_polled_while_it_runs() -> None:
    watch = ScriptedWatch()
    polled = threading.Event()
    step = iter(range(1, 1000))

    def poll() -> None:
        watch.progress(next(step), 1000)
        if len(watch.steps) >= 3:
            polled.set()

    def call() -> bytes:
        assert polled.wait(DEADLINE), "progress was never polled during the call"
        return b"png"

    assert watched(call, watch=watch, poll=poll, poll_seconds=0.001) == b"png"
    assert [s for s, _ in watch.steps[:3]] == [1, 2, 3]


def test_a_cancel_interrupts_the_server_and_the_call_raises_gpu_canceled() -> None:
    interrupted = threading.Event()

    def call() -> bytes:
        # The server answers once interrupted (A1111 even sends its partial image).
        assert interrupted.wait(DEADLINE)
        return b"partial image"

    with pytest.raises(GpuCanceled):
        watched(call, watch=ScriptedWatch(cancel_after=2), interrupt=interrupted.set)
    assert interrupted.is_set()


def test_an_error_of_a_canceled_call_is_the_cancel() -> None:
    def call() -> bytes:
        raise RetryableGpuError("connection reset by the interrupted server")

    interrupted = threading.Event()

    def interrupted_call() -> bytes:
        assert interrupted.wait(DEADLINE)
        return call()

    with pytest.raises(GpuCanceled):
        watched(interrupted_call, watch=ScriptedWatch(cancel_after=0), interrupt=interrupted.set)


def test_a_failing_progress_poll_or_interrupt_costs_only_itself() -> None:
    failures = 0
    done = threading.Event()

    def poll() -> None:
        nonlocal failures
        failures += 1
        if failures >= 3:
            done.set()
        raise ConnectionError("the progress route is down")

    def call() -> bytes:
        assert done.wait(DEADLINE)
        return b"png"

    assert watched(call, watch=ScriptedWatch(), poll=poll, poll_seconds=0.001) == b"png"

    tried = threading.Event()

    def refuse() -> None:
        tried.set()
        raise ConnectionError("interrupt refused")

    def call_ending_after_the_try() -> bytes:
        assert tried.wait(DEADLINE)
        return b"png"

    with pytest.raises(GpuCanceled):
        watched(call_ending_after_the_try, watch=ScriptedWatch(cancel_after=0), interrupt=refuse)


def test_errors_of_an_uncanceled_call_pass_through() -> None:
    def call() -> bytes:
        raise RetryableGpuError("HTTP 503")

    with pytest.raises(RetryableGpuError, match="503"):
        watched(call, watch=NO_WATCH)
