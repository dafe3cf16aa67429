"""MemoryBudget: how many bytes of GPU answers one dispatcher process holds at once.

A dispatcher invocation runs several GPU calls side by side (CallsPerWorker), and Lambda
bills every second of them at the function's MemorySize, so the function is sized by what
it really holds (the runtime, and the answers being read, decoded and stored), not by the
worst case of every call at once. What keeps that safe is this budget: a call reserves its
answer's bytes when the answer starts to arrive (the GPU has finished; only the read and
the decode wait, never the generation), keeps what its output needs until that is stored,
and gives the rest back. A call whose answer would overrun the budget waits for another's
to be stored (within its own deadline); one larger than the whole budget is refused rather
than let the process run out of memory, which would kill every call in it.
"""

from __future__ import annotations

import resource
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

MIB = 1024 * 1024
# Left out of a function's budget besides its runtime: threads' stacks, the SDK's buffers,
# logs, and the output of a call between its decode and its store's request.
HEADROOM_MB = 16


class AnswerTooLarge(Exception):
    """An answer larger than this process may hold (or than its caller allows)."""


class MemoryWaitExceeded(Exception):
    """No room for the answer within the call's time."""


def resident_peak_bytes() -> int:
    """The process's peak resident memory so far (what Lambda reports as Max Memory Used)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


class MemoryBudget:
    """Bytes shared by the holds of one process, handed out in the order asked (a large
    answer is not overtaken forever by small ones). `total=None`: no bound (a process
    that reads one answer at a time, or a test)."""

    def __init__(self, total: int | None, *, clock: Callable[[], float] = time.monotonic) -> None:
        if total is not None and total <= 0:
            raise ValueError("a memory budget needs room for at least one answer")
        self.total = total
        self._used = 0
        self._queue: deque[object] = deque()
        self._changed = threading.Condition()
        self._clock = clock

    @classmethod
    def of_function(cls, memory_size_mb: int, *, headroom_mb: float = HEADROOM_MB) -> MemoryBudget:
        """What a function of `memory_size_mb` has left for answers once its runtime is up
        (this process's peak so far, measured, not assumed), less `headroom_mb`."""
        total = memory_size_mb * MIB - resident_peak_bytes() - int(headroom_mb * MIB)
        return cls(max(total, MIB))

    @property
    def used(self) -> int:
        with self._changed:
            return self._used

    def hold(self) -> MemoryHold:
        return MemoryHold(self)

    def _take(self, nbytes: int, within: float) -> None:
        if self.total is None or nbytes <= 0:
            return
        if nbytes > self.total:
            raise AnswerTooLarge(
                f"an answer of {nbytes / MIB:.1f} MB in memory is more than the "
                f"{self.total / MIB:.0f} MB this dispatcher has for answers "
                "(raise the dispatcher's MemorySize)"
            )
        ticket = object()
        deadline = self._clock() + within
        with self._changed:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._used + nbytes > self.total:
                    left = deadline - self._clock()
                    if left <= 0:
                        raise MemoryWaitExceeded(
                            "no memory free for the answer within the call's time"
                        )
                    self._changed.wait(left)
                self._used += nbytes
            finally:
                self._queue.remove(ticket)
                self._changed.notify_all()

    def _give_back(self, nbytes: int) -> None:
        if self.total is None or nbytes <= 0:
            return
        with self._changed:
            self._used -= nbytes
            self._changed.notify_all()


class MemoryHold:
    """One call's share of the budget: reserved as its answer arrives, cut down to what
    its output needs once decoded, and given back when that is stored (`release`; or when
    the hold is dropped unreleased, so a crashed worker's share is not lost for good)."""

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self._held = [0]  # shared with the finalizer, which must not refer to self
        self._finalizer = weakref.finalize(self, _give_back_all, budget, self._held)

    @property
    def held(self) -> int:
        return self._held[0]

    def reserve(self, nbytes: int, *, within: float) -> None:
        """Hold `nbytes` more, waiting up to `within` seconds; raises AnswerTooLarge or
        MemoryWaitExceeded."""
        self._budget._take(nbytes, within)
        self._held[0] += max(nbytes, 0) if self._budget.total is not None else 0

    def for_answer(self, size: int | None, *, limit: int, factor: float, within: float) -> int:
        """Reserve room for an answer of `size` bytes (None: not announced, so up to
        `limit`) taking `factor` times that in memory while read and decoded; the most the
        body may then be. An unannounced answer whose limit would take more than the
        whole budget gets the whole budget (it runs alone) and is held to what fits."""
        total = self._budget.total
        if size is not None:
            self.reserve(int(size * factor), within=within)
            return limit
        want = int(limit * factor)
        if total is not None and want > total:
            self.reserve(total, within=within)
            return int(total / factor)
        self.reserve(want, within=within)
        return limit

    def reserver(self, *, limit: int, factor: float) -> Callable[[int | None, float], int]:
        """`for_answer` with this limit and factor: what `post_within(on_answer=)` calls."""
        return lambda size, within: self.for_answer(size, limit=limit, factor=factor, within=within)

    def keep_only(self, nbytes: int) -> None:
        """Give back all but `nbytes` (what the decoded output still takes)."""
        extra = self._held[0] - max(nbytes, 0)
        if extra > 0:
            self._held[0] -= extra
            self._budget._give_back(extra)

    def release(self) -> None:
        self.keep_only(0)


def _give_back_all(budget: MemoryBudget, held: list[int]) -> None:
    if held[0] > 0:
        budget._give_back(held[0])
        held[0] = 0
