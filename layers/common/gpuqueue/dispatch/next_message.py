"""NextMessage: a worker that keeps its GPU slot receives its next message shortly before
its call is expected to end, so the hand-off does not wait on a receive.

Received too early, a message would sit hidden from every other worker for a whole call
(a slower endpoint's worker would hold what a faster slot could start first); received
after the call, the GPU waits for the receive. So it is received `lead_seconds` before the
slot's measured call time runs out, and only when the worker means to keep the slot; a
call that ends first receives it then, as before. A message received but not served is
handed back by the worker (never dropped).

With `prepare`, the writes that hand the slot to that message's task (the slot's renewal,
the task's claim) are made then too, while the call still runs: when it ends, the next
call starts at once.

With `announce`, the worker tells its queue when it will want its next message (its call's
expected end; None once it has it), so one receive can fetch the messages of every worker
in the invocation due about then (QueuePuller).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import Enum, auto
from typing import TYPE_CHECKING, Generic, TypeVar

from aws_lambda_powertools import Logger

if TYPE_CHECKING:
    from gpuqueue.dispatch.dispatcher import Pulled

logger = Logger(child=True)

Slot = TypeVar("Slot")


class _State(Enum):
    IDLE = auto()  # nothing due: the worker receives when it needs one
    ARMED = auto()  # a receive is due at a set time
    RECEIVING = auto()
    RECEIVED = auto()  # `_pulled` holds its answer (None: the queue had nothing)


class NextMessage(Generic[Slot]):
    def __init__(
        self,
        receive: Callable[[], Pulled | None],
        *,
        lead_seconds: float,
        wanted: Callable[[Slot], bool],
        prepare: Callable[[Slot, Pulled], None] | None = None,
        announce: Callable[[float | None], None] | None = None,
    ) -> None:
        """`receive()` takes a message from the queue (None: none waiting); `wanted(slot)`,
        asked just before an early receive, tells whether the worker would keep `slot`
        for another task; `prepare(slot, pulled)` runs after an early receive, before the
        worker can take the message (a failure is logged: the worker does it after);
        `announce(at)` is told the monotonic time the worker will want its next message."""
        self._announce = announce
        self._receive = receive
        self._prepare = prepare
        self._lead = lead_seconds
        self._wanted = wanted
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._state = _State.IDLE
        self._pulled: Pulled | None = None
        self._timer: threading.Timer | None = None
        self._expected: float | None = None  # the last call's expected seconds

    def arm(self, slot: Slot, expected_call_seconds: float | None) -> None:
        """A call started on `slot`: receive the next message `lead_seconds` before the call
        should end, if the worker then still wants to keep the slot. Unmeasured slots (no
        call time yet) and short calls (up to twice the lead) receive after their call."""
        self._expected = expected_call_seconds
        if self._announce is not None and expected_call_seconds is not None:
            self._announce(time.monotonic() + expected_call_seconds)
        if expected_call_seconds is None or expected_call_seconds <= 2 * self._lead:
            # A short call: receiving early would save little, and its check and its
            # thread would cost as much (an unloaded control plane's ceiling fell 40 %).
            return
        with self._lock:
            if self._state is not _State.IDLE:
                return  # one is due or in hand already
            self._state = _State.ARMED
            timer = threading.Timer(
                max(0.0, expected_call_seconds - self._lead), self._early, args=(slot,)
            )
            timer.daemon = True
            self._timer = timer
        timer.start()

    @property
    def in_hand(self) -> bool:
        """A message was received early and waits for the worker (after waiting out a
        receive under way)."""
        with self._lock:
            self._ready.wait_for(lambda: self._state is not _State.RECEIVING)
            return self._pulled is not None

    def take(self) -> Pulled | None:
        """The message for the next task: the one received early, or one received now."""
        with self._lock:
            self._disarm()
            if self._state is _State.RECEIVED:
                pulled, self._pulled = self._pulled, None
                self._state = _State.IDLE
                return pulled  # its announcement was withdrawn when it was received
            self._state = _State.IDLE
        try:
            return self._receive()
        finally:
            self._announce_next()

    def _announce_next(self, after: float = 0.0) -> None:
        """Received: the worker's next want is after `after` s and another call like its
        last (re-announced when that call starts); unknown, no want announced."""
        if self._announce is not None:
            expected = self._expected
            self._announce(None if expected is None else time.monotonic() + after + expected)

    def unused(self) -> Pulled | None:
        """The worker is done: a message received early and not served (for the worker to
        hand back), after waiting out a receive under way; none will be received later."""
        with self._lock:
            self._disarm()
            pulled, self._pulled = self._pulled, None
            self._state = _State.IDLE
        if self._announce is not None:
            self._announce(None)  # done: it wants no more
        return pulled

    def _disarm(self) -> None:
        # Under the lock: no receive starts after this, and one under way has ended.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._state is _State.ARMED:
            self._state = _State.IDLE
        self._ready.wait_for(lambda: self._state is not _State.RECEIVING)

    def _early(self, slot: Slot) -> None:
        with self._lock:
            if self._state is not _State.ARMED:
                return  # taken (or given up) before its time
            self._state = _State.RECEIVING
        try:
            if not self._wanted(slot):
                # Not received: the worker decides (and receives) after its call.
                with self._lock:
                    self._state = _State.IDLE
                    self._ready.notify_all()
                return
            try:
                pulled = self._receive()  # None, the queue was empty, stands for the hand-off
            finally:
                self._announce_next(after=self._lead)
            if pulled is not None and self._prepare is not None:
                self._prepare_quietly(slot, pulled)
        except Exception:
            logger.warning("early receive failed; the worker receives after it", exc_info=True)
            with self._lock:
                self._state = _State.IDLE
                self._ready.notify_all()
            return
        with self._lock:
            self._pulled = pulled
            self._state = _State.RECEIVED
            self._ready.notify_all()

    def _prepare_quietly(self, slot: Slot, pulled: Pulled) -> None:
        assert self._prepare is not None
        try:
            self._prepare(slot, pulled)
        except Exception:
            logger.warning("early hand-off failed; the worker makes it after", exc_info=True)
