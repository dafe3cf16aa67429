"""SharedReceive: one ReceiveMessage for every worker of an invocation that wants a message
about now, instead of one each.

Each worker announces when it will want its next message (its call's expected end; None
once it has one). A worker that pulls takes a message an earlier receive left for it if
there is one; else it receives for itself and for every worker due within
`window_seconds` (at most 10, SQS's limit) and leaves theirs. A message left longer than
`hold_seconds` (its worker's call ran long, or it gave its slot up) goes back to the queue,
visible at once, in one batch request; so does every message still left when the
invocation ends. Under load, n workers whose calls end together pay one receive instead of
n; a message waits for its worker at most `hold_seconds`, hidden from other invocations.

Pulls are serialised (one receive at a time), so two workers never both receive for the
same others. A receive that came back empty found the queue drained: pulls in the next
`dry_seconds` answer empty without asking again (the workers whose calls ended together
end together, on one empty receive; a message sent meanwhile goes to the event source
mapping's next invocation).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

M = TypeVar("M")

# SQS's ReceiveMessage and ChangeMessageVisibilityBatch take at most 10.
MAX_PER_RECEIVE = 10


class SharedReceive(Generic[M]):
    def __init__(
        self,
        receive: Callable[[int], list[M]],
        release: Callable[[list[M]], None],
        *,
        window_seconds: float,
        hold_seconds: float,
        dry_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`receive(n)` takes up to n messages from the queue (not waiting); `release(ms)`
        makes messages visible again at once."""
        if hold_seconds < window_seconds:
            raise ValueError("hold_seconds must cover window_seconds")
        self._receive = receive
        self._release = release
        self._window = window_seconds
        self._hold = hold_seconds
        self._dry = dry_seconds
        self._dry_at: float | None = None  # when a receive last came back short
        self._clock = clock
        self._lock = threading.Lock()  # the state below
        self._pulling = threading.Lock()  # one receive at a time
        self._due: dict[object, float] = {}
        self._left: list[tuple[M, float]] = []  # received for a worker due soon, and when
        self.receives = 0

    def expect(self, worker: object, at: float | None) -> None:
        """`worker` wants a message at about `at` (this clock's time); None: it does not."""
        with self._lock:
            if at is None:
                self._due.pop(worker, None)
            else:
                self._due[worker] = at

    def pull(self, count: int = 1) -> list[M]:
        """Up to `count` messages: left ones first, then one receive for these and for the
        workers due soon."""
        with self._pulling:
            with self._lock:
                now = self._clock()
                stale = [m for m, at in self._left if now - at > self._hold]
                fresh = [(m, at) for m, at in self._left if now - at <= self._hold]
                taken, self._left = [m for m, _ in fresh[:count]], fresh[count:]
                need = count - len(taken)
                due = sum(1 for at in self._due.values() if at - now <= self._window)
                # The workers due soon and not served by what is left: this pull's own among them.
                wanted = min(MAX_PER_RECEIVE, max(need, due - len(self._left)))
            if stale:
                self._release(stale)
            if need <= 0:
                return taken
            if stale:
                self._dry_at = None  # visible again: the queue is not dry
            if self._dry_at is not None and now - self._dry_at <= self._dry:
                return taken
            self.receives += 1
            got = self._receive(wanted)
            with self._lock:
                self._left.extend((m, now) for m in got[need:])
                # Only an empty answer: a short poll may return fewer than are waiting.
                self._dry_at = now if not got else None
            return taken + got[:need]

    def close(self) -> None:
        """The invocation ends: every message still left goes back to the queue."""
        with self._pulling, self._lock:
            left, self._left = [m for m, _ in self._left], []
            self._due.clear()
        if left:
            self._release(left)
