"""WorkerGroup: one invocation running up to N GPU calls at once.

A dispatcher invocation is billed for its whole life, and its life is mostly waiting on a
GPU's answer. One invocation per call pays that wait once per call; a group pays it once
for up to `size` calls. The invocation's first task runs as before; beside it a scout
starts more workers, each on a message it receives itself, while the group has room, the
fleet has a free slot and messages are waiting: as many at once as both allow, in one
receive, so the group's calls start together rather than one receive after another.
Each worker keeps its slot for its next task (TaskDispatcher's one-step hand-off); when
every worker has ended, the group ends.

The scout looks when the invocation starts, whenever a worker finds a message waiting at a
hand-off, and when a worker ends while messages were last seen waiting; never on a timer,
so an idle queue costs it one receive per invocation and no more.

The pool stays bounded: at most `size` calls per invocation, invocations bounded by reserved
concurrency and the mapping's MaximumConcurrency, calls by each endpoint's slots.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType

from aws_lambda_powertools import Logger

logger = Logger(child=True)


class WorkerGroup:
    def __init__(
        self,
        *,
        size: int,
        start_some: Callable[[int], list[Callable[[], None]]],
        free_slots: Callable[[], int],
        remaining_seconds: Callable[[], float],
        min_seconds: float,
    ) -> None:
        """`start_some(n)` receives up to n messages (not waiting for one) and gives the work
        that drives each (none: the queue was empty); `free_slots()` tells how many slots
        the fleet has free; no new work starts with less than `min_seconds` left."""
        if size < 1:
            raise ValueError("size must be at least 1")
        self._size = size
        self._start_some = start_some
        self._free_slots = free_slots
        self._remaining = remaining_seconds
        self._min_seconds = min_seconds
        self._changed = threading.Condition()
        self._running = 1  # the invocation's own first task
        self._look = True  # look for work at once
        self._backlog = True  # the last look found a message (or a worker saw one since)
        self._workers: list[threading.Thread] = []
        self._scout: threading.Thread | None = None
        self.started = 0  # workers the scout started

    def __enter__(self) -> WorkerGroup:
        if self._size > 1:
            # pragma: no mutate start (names are for stack dumps; every thread is joined)
            self._scout = threading.Thread(target=self._scout_loop, name="scout", daemon=True)
            # pragma: no mutate end
            self._scout.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        """The first task is over: wait for the scout and every worker it started."""
        self._ended()
        if self._scout is not None:
            self._scout.join()
        for worker in list(self._workers):
            worker.join()

    def backlog_seen(self) -> None:
        """A worker found a message waiting: there may be more for the group to take."""
        with self._changed:
            self._look = self._backlog = True
            self._changed.notify_all()

    def _ended(self) -> None:
        # Its place is looked at again only while messages were seen waiting: a worker that
        # found the queue empty, or its last look, cost nothing more.
        with self._changed:
            self._running -= 1
            self._look = self._look or self._backlog
            self._changed.notify_all()

    def _scout_loop(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(
                    lambda: self._running == 0 or (self._look and self._running < self._size)
                )
                if self._running == 0:
                    return
                self._look = False
                room = self._size - self._running
            if self._remaining() < self._min_seconds:
                return  # too late to start another call; the workers finish theirs
            try:
                wanted = min(room, self._free_slots())
                if wanted < 1:
                    continue  # every slot taken: a worker that ends, or a backlog, wakes it
                works = self._start_some(wanted)
            except Exception:
                logger.exception("scout could not start a worker")
                works = []
            if not works:
                with self._changed:
                    self._backlog = False
            for work in works:
                self._start(work)

    def _start(self, work: Callable[[], None]) -> None:
        with self._changed:
            self._running += 1
            self._look = True  # and look again at once: a backlog may fill the group
        self.started += 1

        def run() -> None:
            try:
                work()
            except Exception:
                logger.exception("worker failed")
            finally:
                self._ended()

        # pragma: no mutate start (names are for stack dumps; every thread is joined)
        worker = threading.Thread(target=run, name=f"worker-{self.started}", daemon=True)
        # pragma: no mutate end
        self._workers.append(worker)
        worker.start()
