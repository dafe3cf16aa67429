"""The dispatcher's side of a running GPU call: the server's progress written to the task
at a bounded rate, and its owner's cancel learnt from the same writes.

At most one request per task per `interval` (2 s by default): a progress write when the
server reported a new step (conditional on the lease and on no cancel asked, so a refusal
says which), else, when the adapter asks whether to stop, one eventually consistent read.
A protocol that neither reports steps nor can stop a job never asks, so costs nothing.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from gpuqueue.models import TaskProgress
from gpuqueue.store.task_store import Claim, ProgressAck, TaskStore

PROGRESS_WRITE_SECONDS = 2.0


class TaskWatch:
    """A `gpu.call_watch.CallWatch` for one claimed task; `close` it when the call ends."""

    def __init__(
        self,
        tasks: TaskStore,
        claim: Claim,
        *,
        interval: float = PROGRESS_WRITE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._tasks = tasks
        self._claim = claim
        self._interval = interval
        self._clock = clock
        self._started = clock()
        self._next_check = self._started + interval
        self._lock = threading.Lock()
        self._latest: TaskProgress | None = None
        self._written: TaskProgress | None = None
        self._canceled = threading.Event()
        self._closed = False
        self._lease_lost = False
        self.job_id: str | None = None
        self.writes = 0  # requests made (progress writes and cancel reads), for the tests

    @property
    def canceled(self) -> bool:
        return self._canceled.is_set()

    def progress(self, step: int, steps: int, *, eta_seconds: float | None = None) -> None:
        if eta_seconds is None and step > 0:
            # From the pace so far: the steps left at the rate of those done.
            elapsed = self._clock() - self._started
            eta_seconds = elapsed * (steps - step) / step
        with self._lock:
            self._latest = TaskProgress.of(step, steps, eta_seconds=eta_seconds)

    def job_started(self, job_id: str) -> None:
        self.job_id = job_id

    def wait_cancel(self, seconds: float) -> bool:
        if not self._canceled.is_set() and self._clock() >= self._next_check:
            self._check()
        return self._canceled.wait(seconds)

    def close(self) -> None:
        """The call ended: nothing more is written (a poll thread may still be waking)."""
        with self._lock:
            self._closed = True

    def _check(self) -> None:
        with self._lock:
            if self._closed or self._lease_lost:
                return
            self._next_check = self._clock() + self._interval
            latest = self._latest if self._latest != self._written else None
        self.writes += 1
        if latest is not None:
            ack = self._tasks.report_progress(self._claim, latest)
            if ack is ProgressAck.WRITTEN:
                self._written = latest
        else:
            ack = self._tasks.stop_asked(self._claim)
        if ack is ProgressAck.CANCEL_REQUESTED:
            self._canceled.set()
        elif ack is ProgressAck.LEASE_LOST:
            # Someone else holds the task now: leave their GPU call alone, write no more.
            self._lease_lost = True
