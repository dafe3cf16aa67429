"""The dispatcher's domain logic: one queue message in, one task driven to its next state.

Generic over task kinds: a `Job` per kind (image generation, transcription) prepares the
input, makes the one GPU call and stores the output; states, leases, retries and slots are
the same for all.

Idempotent on task_id: a duplicate delivery finds the task terminal (or held by a live
lease) and does nothing; result keys are deterministic, so a repeated run overwrites
the same object; every write after the claim is conditional on holding the lease.

Capacity: a GPU call happens only while holding one of the endpoint's slots (a lease in
the endpoints table). No free slot: wait briefly, then hand the message back without
spending an attempt. A failed call counts against the endpoint at once (its circuit opens
after `circuit_failure_threshold` in a row) and the task moves to another endpoint in the
same invocation when enough time is left for a full call.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from aws_lambda_powertools import Logger

from gpuqueue.dispatch.cog_callbacks import CallbackStarter, CallbackStartRefused
from gpuqueue.dispatch.jobs import InvalidTaskInput, Job
from gpuqueue.dispatch.metrics import DispatchObserver
from gpuqueue.dispatch.next_message import NextMessage
from gpuqueue.dispatch.task_watch import PROGRESS_WRITE_SECONDS, TaskWatch
from gpuqueue.errors import GpuCanceled, GpuError, GpuTimeout, RetryLater, StoreError
from gpuqueue.fleet.balancer import Balancer
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.slot_broker import (
    HeldSlot,
    NoFreeSlot,
    NoRoutableEndpoint,
    SlotBroker,
    SlotRequest,
)
from gpuqueue.models import CircuitState, Priority, QueueMessage, Task, TaskKind, TaskStatus
from gpuqueue.store.task_store import Claim, ClaimRefused, TaskStore

logger = Logger(child=True)

# Time kept back from the Lambda's remaining time for the writes after the GPU call.
SAFETY_MARGIN_SECONDS = 5.0
# Below this much budget a GPU call is not worth starting.
MIN_CALL_SECONDS = 1.0
# A read of the fleet this recent tells whether a slot is free, for a worker with room.
FLEET_VIEW_MAX_AGE = 2.0
# A worker keeping its slot receives its next message this long before its call should end
# (NextMessage): more than a receive takes, little against a call.
RECEIVE_LEAD_SECONDS = 0.5
# One receive serves the invocation's workers due within this (SharedReceive): a worker's
# early receive and those of the calls ending just after it.
SHARED_RECEIVE_WINDOW_SECONDS = 2 * RECEIVE_LEAD_SECONDS
# A message received for a worker that has not come for it by then goes back to the queue.
SHARED_RECEIVE_HOLD_SECONDS = SHARED_RECEIVE_WINDOW_SECONDS + 1.0
# After a receive found the queue drained, workers ending this soon after end without asking.
SHARED_RECEIVE_DRY_SECONDS = RECEIVE_LEAD_SECONDS


@dataclass(frozen=True)
class _Work:
    job: Job
    job_input: Any


@dataclass(frozen=True)
class _Handoff:
    """A kept slot's writes for its next task: the slot renewed for it and the task claimed
    (made side by side; ahead of the hand-off when the next message came early)."""

    slot: HeldSlot
    claimed: Claim | ClaimRefused
    renewed: bool
    budget: float
    now: float


@dataclass(frozen=True)
class Pulled:
    """A message a worker took from its queue itself, and the queue's handle to settle it."""

    message: QueueMessage
    receipt: str


class NextTasks(Protocol):
    """Where a worker still holding a slot gets its next task (the handler's side of SQS)."""

    def pull(self) -> Pulled | None:
        """The next message waiting, if any (not waiting for one)."""
        ...

    def settle(self, pulled: Pulled, result: DispatchOutcome | Exception) -> None:
        """Done with `pulled`: delete it, send it back later (RetryLater), or leave it to
        come back (another exception)."""
        ...

    def take(self, task_id: str) -> bool:
        """Note that this invocation drives the task; False if one of its workers already
        does (or did): the message is a duplicate, which needs no read and must not wait
        out the invocation's own lease as if it were another's."""
        ...

    def give_back(self, task_id: str) -> None:
        """The invocation did not drive the task to a durable state (it went back to the
        queue, or failed here): a later message for it is not a duplicate."""
        ...

    def expect(self, worker: object, at: float | None) -> None:
        """`worker` will pull its next message at about monotonic time `at` (None: it has
        it, or is done): one receive may fetch the messages of all workers due together."""
        ...


# pragma: no mutate start (the hand-off, not the claim: docs/mutation.md)
def _submit(
    finisher: ThreadPoolExecutor, outcome: DispatchOutcome | Callable[[], DispatchOutcome]
) -> Future[DispatchOutcome]:
    """An outcome as a future: known already, or the finishing work run in the background."""
    if callable(outcome):
        return finisher.submit(outcome)
    done: Future[DispatchOutcome] = Future()
    done.set_result(outcome)
    return done


# pragma: no mutate end


class DispatchOutcome(StrEnum):
    DONE = "DONE"
    CANCELED = "CANCELED"  # its owner canceled it while it ran; the GPU stopped
    # Started in callback mode: the server reports by webhook, the callback route ends it.
    DETACHED = "DETACHED"
    FAILED = "FAILED"
    RETRY = "RETRY"
    SKIPPED = "SKIPPED"
    EXPIRED = "EXPIRED"


@dataclass(frozen=True)
class DispatchPolicy:
    task_timeout_seconds: float
    max_attempts: int
    health_max_age_seconds: float
    retry_base_delay_seconds: float = 2.0
    retry_max_delay_seconds: float = 60.0
    no_endpoint_delay_seconds: int = 10
    circuit_failure_threshold: int = 3
    slot_wait_seconds: float = 5.0
    slot_poll_seconds: float = 0.1
    no_slot_delay_seconds: int = 2
    # Slots of a kind high-priority tasks may hold at once; None: no cap.
    priority_lane_slots: int | None = None
    # How old a read of the fleet a worker keeping its slot may go by at a hand-off (its
    # workers read it often under load); 0: read at every hand-off.
    fleet_view_max_age_seconds: float = 0.0
    # A running call's progress is written (and its owner's cancel looked for) at most this
    # often per task.
    progress_write_seconds: float = PROGRESS_WRITE_SECONDS

    def backoff_seconds(self, attempt: int, rng: random.Random) -> int:
        """Capped exponential backoff with jitter in [ceiling/2, ceiling], whole seconds up."""
        ceiling = min(
            self.retry_max_delay_seconds, self.retry_base_delay_seconds * 2 ** (attempt - 1)
        )
        return math.ceil(rng.uniform(ceiling / 2, ceiling))


class TaskDispatcher:
    # pragma: no mutate start (wiring, and the worker group's entry points: docs/mutation.md)
    def __init__(
        self,
        *,
        tasks: TaskStore,
        registry: EndpointRegistry,
        jobs: Mapping[TaskKind, Job],
        policy: DispatchPolicy,
        balancer: Balancer | None = None,
        backlog: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        observer: DispatchObserver | None = None,
        callbacks: CallbackStarter | None = None,
    ) -> None:
        self._observer = observer
        self._callbacks = callbacks
        self._tasks = tasks
        self._registry = registry
        self._jobs = jobs
        self._policy = policy
        self._slots = SlotBroker(
            registry,
            health_max_age_seconds=policy.health_max_age_seconds,
            balancer=balancer,
            poll_seconds=policy.slot_poll_seconds,
            backlog=backlog,
            priority_lane_slots=policy.priority_lane_slots,
            clock=clock,
            sleep=sleep,
            view_max_age_seconds=policy.fleet_view_max_age_seconds,
        )
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        # A hand-off's slot renewal runs beside its claim (two writes, one round trip).
        self._beside = ThreadPoolExecutor(thread_name_prefix="renew")

    @property
    def seconds_for_a_call(self) -> float:
        """The time a worker needs left to start another task: a whole call and its writes."""
        return self._policy.task_timeout_seconds + SAFETY_MARGIN_SECONDS

    def free_slots(self) -> int:
        """How many slots the endpoints this dispatcher serves have free (a recent read of
        the fleet stands): as many messages are worth taking at once."""
        return self._slots.free_slot_count(self._jobs.keys(), max_age_seconds=FLEET_VIEW_MAX_AGE)

    def serve_pulled(
        self, pulled: Pulled, *, remaining_seconds: Callable[[], float], next_tasks: NextTasks
    ) -> None:
        """A message a worker took itself (a worker group's): driven, then settled."""
        try:
            result: DispatchOutcome | Exception = self.dispatch(
                pulled.message, remaining_seconds=remaining_seconds, next_tasks=next_tasks
            )
        except Exception as error:
            result = error
        next_tasks.settle(pulled, result)

    # pragma: no mutate end

    def dispatch(
        self,
        message: QueueMessage,
        *,
        remaining_seconds: Callable[[], float],
        next_tasks: NextTasks | None = None,
        lane: Priority = Priority.NORMAL,
    ) -> DispatchOutcome:
        """Drive one task; raises RetryLater when the message should come back later.

        With `next_tasks`, a worker whose call ended with its slot still held takes its next
        task itself while a whole call still fits in its time (`_keep_serving`): the freed
        slot goes to the next task in one step, with no waiter polling for it. Storing a
        result and marking it DONE run beside the next call; every pulled message is settled
        once its task's state is durable, and all before this returns.
        """
        if next_tasks is None:
            return self._serve(message, remaining_seconds, None, lane)
        if not next_tasks.take(message.task_id):
            return DispatchOutcome.SKIPPED
        try:
            return self._serve(message, remaining_seconds, next_tasks, lane)
        except BaseException:
            next_tasks.give_back(message.task_id)
            raise

    # pragma: no mutate start (the kept slot's hand-off, issue 16: docs/mutation.md)
    def _serve(
        self,
        message: QueueMessage,
        remaining_seconds: Callable[[], float],
        next_tasks: NextTasks | None,
        lane: Priority,
    ) -> DispatchOutcome:
        if next_tasks is None:
            outcome, _ = self._dispatch_one(message, remaining_seconds, offered=None, keep=None)
            return outcome if isinstance(outcome, DispatchOutcome) else outcome()

        def wanted(slot: HeldSlot) -> bool:
            # Asked just before a call should end: another call fits, and the slot is worth
            # keeping (else nothing is received early; the worker decides after its call).
            return remaining_seconds() - SAFETY_MARGIN_SECONDS - RECEIVE_LEAD_SECONDS >= (
                self._policy.task_timeout_seconds
            ) and self._slots.worth_keeping(slot, priority=lane)

        # The hand-off written while the call before it ran, by the message's receipt.
        ready: dict[str, _Handoff] = {}

        def prepare(slot: HeldSlot, pulled: Pulled) -> None:
            if slot.endpoint.kind is not pulled.message.kind:
                return
            handoff = self._hand_over(pulled.message, slot, remaining_seconds)
            if handoff is None:
                return
            if isinstance(handoff.claimed, Claim):
                if handoff.renewed:
                    ready[pulled.receipt] = handoff
                else:
                    self._hand_back(handoff)  # the slot is not ours any more
            # Refused: the worker finds out why at the hand-off, the usual way.

        worker = object()
        ahead: NextMessage[HeldSlot] = NextMessage(
            next_tasks.pull,
            lead_seconds=RECEIVE_LEAD_SECONDS,
            wanted=wanted,
            prepare=prepare,
            announce=lambda at: next_tasks.expect(worker, at),
        )
        pending: list[tuple[Pulled, Future[DispatchOutcome]]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="finish") as finisher:
            try:
                outcome, held = self._dispatch_one(
                    message, remaining_seconds, offered=None, keep=ahead
                )
                first = _submit(finisher, outcome)
                self._keep_serving(
                    held,
                    next_tasks,
                    ahead,
                    ready,
                    remaining_seconds=remaining_seconds,
                    lane=lane,
                    finisher=finisher,
                    pending=pending,
                )
            finally:
                unused = ahead.unused()
                if unused is not None:
                    # Received early for a call that did not come: visible again at once.
                    self._drop_handoff(ready, unused)
                    next_tasks.settle(unused, RetryLater("not served here", delay_seconds=0))
                for pulled, result in pending:
                    try:
                        next_tasks.settle(pulled, result.result())
                    except Exception as error:
                        next_tasks.give_back(pulled.message.task_id)
                        next_tasks.settle(pulled, error)
            return first.result()

    def _keep_serving(
        self,
        held: HeldSlot | None,
        next_tasks: NextTasks,
        ahead: NextMessage[HeldSlot],
        ready: dict[str, _Handoff],
        *,
        remaining_seconds: Callable[[], float],
        lane: Priority,
        finisher: ThreadPoolExecutor,
        pending: list[tuple[Pulled, Future[DispatchOutcome]]],
    ) -> None:
        slot = held
        try:
            while True:
                if slot is not None and (
                    remaining_seconds() - SAFETY_MARGIN_SECONDS < self._policy.task_timeout_seconds
                    or not self._still_worth_keeping(slot, ahead, ready, lane)
                ):
                    slot.release()
                    slot = None
                if slot is not None:
                    pulled = ahead.take()
                else:
                    # The slot is gone: a message received early for it is served the usual
                    # way (a slot of its own), if a call still fits; else it goes back.
                    pulled = ahead.unused()
                    if pulled is not None:
                        self._drop_handoff(ready, pulled)
                    if pulled is not None and (
                        remaining_seconds() - SAFETY_MARGIN_SECONDS
                        < self._policy.task_timeout_seconds
                    ):
                        next_tasks.settle(pulled, RetryLater("not served here", delay_seconds=0))
                        return
                if pulled is None:
                    return  # nothing waiting: the slot goes back
                handoff = ready.get(pulled.receipt)
                if handoff is not None and handoff.slot is not slot:
                    # Written for the slot a failed call gave up (its task moved on to
                    # another endpoint): not this one's.
                    self._drop_handoff(ready, pulled)
                handoff = ready.pop(pulled.receipt, None)
                if not next_tasks.take(pulled.message.task_id):
                    self._hand_back(handoff)
                    pending.append((pulled, _submit(finisher, DispatchOutcome.SKIPPED)))
                    continue
                try:
                    outcome, slot = self._dispatch_one(
                        pulled.message,
                        remaining_seconds,
                        offered=slot,
                        keep=ahead,
                        handoff=handoff,
                    )
                except Exception as error:
                    next_tasks.give_back(pulled.message.task_id)
                    next_tasks.settle(pulled, error)
                    return
                pending.append((pulled, _submit(finisher, outcome)))
        finally:
            if slot is not None:
                slot.release()

    def _still_worth_keeping(
        self,
        slot: HeldSlot,
        ahead: NextMessage[HeldSlot],
        ready: dict[str, _Handoff],
        lane: Priority,
    ) -> bool:
        # A hand-off written ahead for this slot was decided then (the same check, on a read
        # of the fleet as recent): the next call starts now.
        if ahead.in_hand and any(handoff.slot is slot for handoff in ready.values()):
            return True
        return self._slots.worth_keeping(slot, priority=lane, holding_task=ahead.in_hand)

    def _drop_handoff(self, ready: dict[str, _Handoff], pulled: Pulled) -> None:
        """The slot a hand-off was written for is gone: its task goes back, uncalled."""
        self._hand_back(ready.pop(pulled.receipt, None))

    def _hand_back(self, handoff: _Handoff | None) -> None:
        if handoff is None or not isinstance(handoff.claimed, Claim):
            return
        try:
            self._tasks.hand_back(handoff.claimed)
        except StoreError:
            # Its lease ends it: the message, back in the queue, finds it claimable then.
            logger.warning(
                "hand-back failed; the task's lease lapses",
                extra={"task_id": handoff.claimed.task.task_id},
                exc_info=True,
            )

    def _dispatch_one(
        self,
        message: QueueMessage,
        remaining_seconds: Callable[[], float],
        *,
        offered: HeldSlot | None,
        keep: NextMessage[HeldSlot] | None,
        handoff: _Handoff | None = None,
    ) -> tuple[DispatchOutcome | Callable[[], DispatchOutcome], HeldSlot | None]:
        """One task: its outcome (or the work that finishes it), and the slot if `keep` (the
        worker's next message, received early while it keeps its slot) and its call ended
        with the GPU free. An offered slot is used or released, never leaked; `handoff`, the
        writes for it made ahead on `offered`."""
        if offered is None and keep is not None and message.priority is Priority.NORMAL:
            ran = self._run_first_unread(message, remaining_seconds, keep)
            if ran is not None:
                return ran
        try:
            return self._prepare_and_run(
                message, remaining_seconds, offered=offered, keep=keep, handoff=handoff
            )
        except BaseException:
            if offered is not None:
                offered.release()
            raise

    # pragma: no mutate end

    def _prepare_and_run(
        self,
        message: QueueMessage,
        remaining_seconds: Callable[[], float],
        *,
        offered: HeldSlot | None,
        keep: NextMessage[HeldSlot] | None,
        handoff: _Handoff | None = None,
    ) -> tuple[DispatchOutcome | Callable[[], DispatchOutcome], HeldSlot | None]:
        if offered is not None:
            if keep is not None and offered.endpoint.kind is message.kind:
                ran = self._run_unread(message, offered, remaining_seconds, keep, handoff)
                if ran is not None:
                    return ran
            # Not for this slot (another kind, or a retry this endpoint failed): the usual way.
            offered.release()
        task = self._tasks.get(message.task_id)
        if task is None:
            logger.warning(
                "message for a task that does not exist", extra={"task_id": message.task_id}
            )
            return DispatchOutcome.SKIPPED, None
        ended = self._end_if_unrunnable(task, self._clock())
        if ended is not None:
            return ended, None
        work = self._work_for(task)
        if isinstance(work, str):
            self._tasks.fail_unclaimed(task, work)
            return DispatchOutcome.FAILED, None
        tried = {task.endpoint_id} if task.endpoint_id and task.error else set()
        try:
            return self._run(task, work, tried, remaining_seconds, keep=keep)
        finally:
            work.job.release(work.job_input)

    def _run_unread(
        self,
        message: QueueMessage,
        held: HeldSlot,
        remaining_seconds: Callable[[], float],
        keep: NextMessage[HeldSlot],
        handoff: _Handoff | None = None,
    ) -> tuple[DispatchOutcome | Callable[[], DispatchOutcome], HeldSlot | None] | None:
        """A pulled task on the slot this worker holds: the lease renewed for it and the task
        claimed without a read first (`handoff`, when made ahead). None: not on this slot
        after all (too little time, or a retry of a call this endpoint failed)."""
        if handoff is None:
            handoff = self._hand_over(message, held, remaining_seconds)
            if handoff is None:
                return None
        claimed, renewed, budget, now = (
            handoff.claimed,
            handoff.renewed,
            handoff.budget,
            handoff.now,
        )
        if not renewed:
            # The slot's lease was lost meanwhile (the worker stalled past it).
            if isinstance(claimed, ClaimRefused):
                return None
            return self._run_claimed_elsewhere(claimed, remaining_seconds, keep)
        if isinstance(claimed, ClaimRefused):
            ended = self._refused(claimed, message, now)
            return None if ended is None else (ended, held)
        work = self._work_for(claimed.task)
        if isinstance(work, str):
            self._tasks.fail(claimed, error=work)
            return DispatchOutcome.FAILED, held
        try:
            return self._call_unread(
                claimed,
                work,
                held,
                budget=budget,
                now=now,
                remaining_seconds=remaining_seconds,
                keep=keep,
            )
        finally:
            work.job.release(work.job_input)

    def _run_first_unread(
        self,
        message: QueueMessage,
        remaining_seconds: Callable[[], float],
        keep: NextMessage[HeldSlot],
    ) -> tuple[DispatchOutcome | Callable[[], DispatchOutcome], HeldSlot | None] | None:
        """A worker's first task, when nothing about the task but its kind picks the slot
        (least-loaded, a normal-priority task whose input needs no check first): a
        slot taken, then the task claimed without a read (the claim returns it), as a kept
        slot's next task is. A read and a write fewer on every worker's first task, the
        start of every burst. None: the usual way (a read first), with no slot held."""
        job = self._jobs.get(message.kind)
        if job is None or job.checks_input_first or not self._slots.keeps_slots:
            return None
        budget = self._budget(remaining_seconds)
        if budget < MIN_CALL_SECONDS:
            return None
        lease_seconds = budget + SAFETY_MARGIN_SECONDS
        request = SlotRequest(
            kind=message.kind,
            task_id=message.task_id,
            user_id="",  # least-loaded does not look at it
            lease_seconds=lease_seconds,
            wait_seconds=0.0,  # none free now: the usual way, which waits, decides
        )
        try:
            held = self._slots.acquire(request)
        except (NoRoutableEndpoint, NoFreeSlot):
            return None  # the usual way decides (and sends the message back) with the task
        try:
            now = self._clock()
            claimed = self._claim_unread(message, held, lease_seconds=lease_seconds, now=now)
            handoff = _Handoff(slot=held, claimed=claimed, renewed=True, budget=budget, now=now)
            ran = self._run_unread(message, held, remaining_seconds, keep, handoff)
        except BaseException:
            held.release()
            raise
        if ran is None:
            held.release()  # it last failed on this endpoint: the usual way finds another
        return ran

    def _claim_unread(
        self, message: QueueMessage, held: HeldSlot, *, lease_seconds: float, now: float
    ) -> Claim | ClaimRefused:
        """The message's task claimed for `held`'s endpoint without a read first."""
        return self._tasks.claim_unread(
            message.task_id,
            lease_seconds=lease_seconds,
            now=now,
            endpoint_id=held.endpoint.endpoint_id,
            max_attempts=self._policy.max_attempts,
            endpoint_protocol=held.endpoint.protocol,
        )

    def _hand_over(
        self, message: QueueMessage, held: HeldSlot, remaining_seconds: Callable[[], float]
    ) -> _Handoff | None:
        """The slot renewed for the message's task and the task claimed without a read first
        (two writes, side by side). None: not for this slot (its job prepares its input
        before a slot is held, or too little time is left)."""
        job = self._jobs.get(message.kind)
        if job is None or job.checks_input_first:
            return None  # prepared before a slot is held (its input may be missing)
        budget = self._budget(remaining_seconds)
        if budget < MIN_CALL_SECONDS:
            return None
        lease_seconds = budget + SAFETY_MARGIN_SECONDS
        now = self._clock()
        renewal = self._beside.submit(
            held.renew_for,
            message.task_id,
            lease_seconds=lease_seconds,
            now=now,
            starts_at=held.call_ends_at,  # ahead of the call's end: the next starts then
        )
        try:
            claimed = self._claim_unread(message, held, lease_seconds=lease_seconds, now=now)
        finally:
            renewed = renewal.result()
        return _Handoff(slot=held, claimed=claimed, renewed=renewed, budget=budget, now=now)

    def _refused(
        self, refused: ClaimRefused, message: QueueMessage, now: float
    ) -> DispatchOutcome | None:
        """How a task this worker could not claim ends here; None: claimable, but not on
        this slot (it last failed on this endpoint)."""
        if refused.task is None:
            logger.warning(
                "message for a task that does not exist", extra={"task_id": message.task_id}
            )
            return DispatchOutcome.SKIPPED
        return self._end_if_unrunnable(refused.task, now)

    def _run_claimed_elsewhere(
        self,
        claimed: Claim,
        remaining_seconds: Callable[[], float],
        keep: NextMessage[HeldSlot],
    ) -> tuple[DispatchOutcome | Callable[[], DispatchOutcome], HeldSlot | None]:
        """A task claimed for a slot whose lease was lost: it takes a slot afresh, as a retry
        in the same invocation would (its next attempt)."""
        work = self._work_for(claimed.task)
        if isinstance(work, str):
            self._tasks.fail(claimed, error=work)
            return DispatchOutcome.FAILED, None
        try:
            return self._run(claimed.task, work, set(), remaining_seconds, keep=keep, claim=claimed)
        finally:
            work.job.release(work.job_input)

    def _call_unread(
        self,
        claimed: Claim,
        work: _Work,
        held: HeldSlot,
        *,
        budget: float,
        now: float,
        remaining_seconds: Callable[[], float],
        keep: NextMessage[HeldSlot],
    ) -> tuple[DispatchOutcome | Callable[[], DispatchOutcome], HeldSlot | None]:
        if self._observer is not None:
            self._observer.task_started(claimed.task, at=now)
        tried: set[str] = set()
        try:
            outcome, last_error = self._call(
                claimed,
                work,
                held,
                budget=budget,
                tried=tried,
                remaining_seconds=remaining_seconds,
                keep=keep,
            )
        except BaseException:
            held.release()
            raise
        if outcome is not DispatchOutcome.RETRY:
            return outcome, held if held.held else None
        held.release()  # on to another endpoint, as a first delivery would
        return self._run(
            claimed.task,
            work,
            tried,
            remaining_seconds,
            keep=keep,
            claim=claimed,
            last_error=last_error,
        )

    def _end_if_unrunnable(self, task: Task, now: float) -> DispatchOutcome | None:
        """End (or send back) a task that cannot run now; None if it can."""
        if task.status.is_terminal:
            # Canceled before dispatch, or a duplicate delivery of finished work.
            return DispatchOutcome.SKIPPED
        if task.cancel_requested_at is not None and not (
            task.status is TaskStatus.RUNNING
            and task.lease_until is not None
            and task.lease_until >= now
        ):
            # Its owner canceled it while it ran and it came back (a retry): end it here.
            self._tasks.end_canceled(task)
            logger.info("task canceled between attempts", extra={"task_id": task.task_id})
            return DispatchOutcome.CANCELED
        if (
            task.status is TaskStatus.QUEUED
            and task.attempt == 0
            and task.queue_deadline is not None
            and now > task.queue_deadline
        ):
            # Never started in time: end it without touching a GPU.
            self._tasks.expire(
                task, f"not started within its queue deadline ({task.queue_ttl_seconds} s)"
            )
            logger.info("task expired in the queue", extra={"task_id": task.task_id})
            return DispatchOutcome.EXPIRED
        if (
            task.lease_until is not None
            and task.status is TaskStatus.RUNNING
            and task.lease_until >= now
        ):
            # Someone holds a live lease: come back when it would have expired.
            raise RetryLater(
                "task is running elsewhere",
                delay_seconds=int(task.lease_until - now) + 1,
                requeue=True,
            )
        if task.attempt >= self._policy.max_attempts:
            last_error = task.error or "the worker's lease expired"
            self._tasks.fail_unclaimed(
                task, f"gave up after {task.attempt} attempts; last error: {last_error}"
            )
            return DispatchOutcome.FAILED
        if task.status not in (TaskStatus.QUEUED, TaskStatus.RUNNING):
            return DispatchOutcome.SKIPPED  # not queued yet (its upload has not landed)
        return None

    def _work_for(self, task: Task) -> _Work | str:
        """The task's job and its input; or why it cannot run anywhere (it fails)."""
        job = self._jobs.get(task.kind)
        if job is None:
            return f"no worker handles {task.kind.value} tasks"
        try:
            return _Work(job, job.prepare(task))
        except InvalidTaskInput as error:
            logger.warning("task input unusable", extra={"task_id": task.task_id})
            return str(error)

    def _budget(self, remaining_seconds: Callable[[], float]) -> float:
        return min(self._policy.task_timeout_seconds, remaining_seconds() - SAFETY_MARGIN_SECONDS)

    def _run(
        self,
        task: Task,
        work: _Work,
        tried: set[str],
        remaining_seconds: Callable[[], float],
        *,
        keep: NextMessage[HeldSlot] | None = None,
        claim: Claim | None = None,
        last_error: str | None = None,  # the failed attempt this invocation moves on from
    ) -> tuple[DispatchOutcome | Callable[[], DispatchOutcome], HeldSlot | None]:
        while True:
            budget = self._budget(remaining_seconds)
            if budget < MIN_CALL_SECONDS:
                if claim is not None:
                    self._tasks.release_for_retry(
                        claim, error=last_error or "ran out of time", endpoint_id=None
                    )
                raise RetryLater("not enough time left in this invocation", delay_seconds=0)
            lease_seconds = budget + SAFETY_MARGIN_SECONDS
            try:
                slot = self._acquire_slot(task, tried, lease_seconds)
            except RetryLater:
                if claim is not None:  # a retry found no slot: give the task back, QUEUED
                    self._tasks.release_for_retry(
                        claim, error=last_error or "no free slot", endpoint_id=None
                    )
                raise
            kept = False
            try:
                now = self._clock()
                claim = self._claim_on(
                    slot, task, claim, lease_seconds=lease_seconds, now=now, last_error=last_error
                )
                if claim is None:
                    # Another delivery won the race; it owns the task. The slot is still ours.
                    kept = keep is not None
                    return DispatchOutcome.SKIPPED, slot if kept else None
                if self._observer is not None:
                    self._observer.task_started(claim.task, at=now)
                outcome, last_error = self._call(
                    claim,
                    work,
                    slot,
                    budget=budget,
                    tried=tried,
                    remaining_seconds=remaining_seconds,
                    keep=keep,
                )
                if outcome is not DispatchOutcome.RETRY:
                    kept = keep is not None and slot.held
                    return outcome, slot if kept else None
            finally:
                if not kept:
                    slot.release()

    def _claim_on(
        self,
        slot: HeldSlot,
        task: Task,
        claim: Claim | None,
        *,
        lease_seconds: float,
        now: float,
        last_error: str | None,
    ) -> Claim | None:
        """The task's lease for a call on `slot`: its claim, or its next attempt."""
        endpoint_id = slot.endpoint.endpoint_id
        protocol = slot.endpoint.protocol
        if claim is None:
            return self._tasks.claim(
                task,
                lease_seconds=lease_seconds,
                now=now,
                endpoint_id=endpoint_id,
                endpoint_protocol=protocol,
            )
        return self._tasks.next_attempt(
            claim,
            lease_seconds=lease_seconds,
            now=now,
            endpoint_id=endpoint_id,
            error=last_error,
            endpoint_protocol=protocol,
        )

    def _acquire_slot(self, task: Task, tried: set[str], lease_seconds: float) -> HeldSlot:
        """Lease a slot on the best endpoint; wait briefly for one; else hand the task back.

        Either way the wait is not the task's fault, so it costs no attempt.
        """
        request = SlotRequest(
            kind=task.kind,
            task_id=task.task_id,
            user_id=task.user_id,
            lease_seconds=lease_seconds,
            wait_seconds=self._policy.slot_wait_seconds,
            tried=tried,
            priority=task.priority,
        )
        try:
            return self._slots.acquire(request)
        except NoRoutableEndpoint as error:
            raise RetryLater(
                str(error), delay_seconds=self._policy.no_endpoint_delay_seconds, requeue=True
            ) from error
        except NoFreeSlot as error:
            raise RetryLater(
                str(error), delay_seconds=self._policy.no_slot_delay_seconds, requeue=True
            ) from error

    def _canceled(
        self, claim: Claim, slot: HeldSlot, *, kept: bool, log: Mapping[str, object]
    ) -> DispatchOutcome:
        """The server stopped the job on its owner's request: its slot is free now (the next
        task's, when kept), nothing is stored, and the endpoint did nothing wrong."""
        if not kept:
            slot.release(call_seconds=None)
        if self._tasks.cancel_running(claim):
            logger.info("task canceled while running", extra=dict(log))
            return DispatchOutcome.CANCELED
        logger.warning("lease lost before the cancel was recorded", extra=dict(log))
        return DispatchOutcome.SKIPPED

    def _failed(
        self,
        claim: Claim,
        slot: HeldSlot,
        error: GpuError,
        *,
        tried: set[str],
        remaining_seconds: Callable[[], float],
        log: dict[str, Any],
    ) -> tuple[DispatchOutcome, str]:
        """A call that failed: counted against its endpoint; the task fails, moves on to
        another endpoint here (RETRY, with the error its next attempt records), or goes
        back to the queue (RetryLater)."""
        task = claim.task
        endpoint = slot.endpoint
        attempt = task.attempt
        reason = f"attempt {attempt} on {endpoint.endpoint_id}: {error}"
        tried.add(endpoint.endpoint_id)
        if isinstance(error, GpuTimeout):
            # The GPU may still be generating: its slot stays taken until the lease ends
            # (the margin past the timeout), so the endpoint never gets more than its
            # capacity of calls.
            slot.keep_until_lease_ends(now=self._clock(), margin=SAFETY_MARGIN_SECONDS)
        if self._observer is not None:
            self._observer.gpu_call_failed(
                task, endpoint_id=endpoint.endpoint_id, retryable=error.retryable
            )
        opened = self._registry.record_dispatch_failure(
            endpoint.endpoint_id,
            threshold=self._policy.circuit_failure_threshold,
            now=self._clock(),
        )
        if opened:
            logger.warning("circuit opened", extra=log)
        if not error.retryable or attempt >= self._policy.max_attempts:
            # (The row names this endpoint already: the claim for this call wrote it.)
            self._tasks.fail(claim, error=reason)
            logger.warning("task failed", extra={**log, "error": reason})
            return DispatchOutcome.FAILED, reason
        # Another full call must fit in what is left of this invocation.
        if remaining_seconds() - SAFETY_MARGIN_SECONDS >= self._policy.task_timeout_seconds:
            # Straight to another endpoint, in this invocation.
            logger.warning("retrying on another endpoint", extra={**log, "error": reason})
            return DispatchOutcome.RETRY, reason
        self._tasks.release_for_retry(claim, error=reason, endpoint_id=None)
        logger.warning("task will be retried", extra={**log, "error": reason})
        raise RetryLater(
            reason, delay_seconds=self._policy.backoff_seconds(attempt, self._rng)
        ) from error

    def _detach(
        self,
        claim: Claim,
        slot: HeldSlot,
        *,
        tried: set[str],
        remaining_seconds: Callable[[], float],
        log: dict[str, Any],
    ) -> tuple[DispatchOutcome, str | None]:
        """Callback mode: the prediction started, its slot held until the callback (or the
        lease's end) frees it, and this invocation moves on at once: no Lambda waits on
        the GPU. A whole generation's lease, whatever is left of this invocation."""
        assert self._callbacks is not None
        logger.info("starting in callback mode", extra=log)
        try:
            started = self._callbacks.start(
                claim,
                slot,
                lease_seconds=self._policy.task_timeout_seconds + SAFETY_MARGIN_SECONDS,
            )
        except CallbackStartRefused as refused:
            raise RetryLater(str(refused), delay_seconds=0) from None
        except GpuError as error:
            return self._failed(
                claim, slot, error, tried=tried, remaining_seconds=remaining_seconds, log=log
            )
        if not started:
            logger.warning("lease lost before the prediction started", extra=log)
            return DispatchOutcome.SKIPPED, None
        return DispatchOutcome.DETACHED, None

    def _call(
        self,
        claim: Claim,
        work: _Work,
        slot: HeldSlot,
        *,
        budget: float,
        tried: set[str],
        remaining_seconds: Callable[[], float],
        keep: NextMessage[HeldSlot] | None = None,
    ) -> tuple[DispatchOutcome | Callable[[], DispatchOutcome], str | None]:
        """One GPU call; RETRY comes with the error the next attempt records. A good call
        gives the work that stores its output and marks the task DONE (run beside the next
        call when the slot is kept)."""
        task = claim.task
        endpoint = slot.endpoint
        attempt = task.attempt
        log = {"task_id": task.task_id, "endpoint_id": endpoint.endpoint_id, "attempt": attempt}
        started = self._clock()
        # The call must end inside its slot's lease (set before the writes ahead of it): a
        # call outliving it shares the GPU with the next lease's. (The task's own lease is
        # set later, for as long: it ends after the slot's.)
        budget = min(budget, slot.seconds_for_a_call(started))
        if budget < MIN_CALL_SECONDS:
            # The writes before the call took most of the leases' margin (a stalled worker).
            logger.warning("leases ran short before the call", extra=log)
            self._tasks.release_for_retry(
                claim, error="the call could not start within its slot's lease", endpoint_id=None
            )
            raise RetryLater("the slot's lease ran short before the call", delay_seconds=0)
        if task.cancel_requested_at is not None:  # asked for between its attempts
            self._tasks.cancel_running(claim)
            logger.info("task canceled before its call", extra=log)
            return DispatchOutcome.CANCELED, None
        if self._callbacks is not None and self._callbacks.takes(endpoint, task):
            return self._detach(
                claim, slot, tried=tried, remaining_seconds=remaining_seconds, log=log
            )
        logger.info("dispatching", extra=log)
        slot.note_start(started)
        if keep is not None:
            keep.arm(slot, slot.expected_call_seconds)
        watch = TaskWatch(self._tasks, claim, interval=self._policy.progress_write_seconds)
        try:
            output = work.job.run(
                endpoint, task, work.job_input, timeout_seconds=budget, watch=watch
            )
        except GpuCanceled:
            watch.close()
            return self._canceled(claim, slot, kept=keep is not None, log=log), None
        except GpuError as error:
            return self._failed(
                claim, slot, error, tried=tried, remaining_seconds=remaining_seconds, log=log
            )
        finally:
            watch.close()
        # The GPU is free once it has answered: the slot goes to the next task (ours, when
        # kept; else whoever takes it) before the output is stored.
        call_seconds = self._clock() - started
        if keep is not None:
            slot.note_call(call_seconds)
            # What the success write below makes true: the next call on this slot need not
            # write it again.
            slot.endpoint = endpoint.model_copy(
                update={"consecutive_failures": 0, "circuit": CircuitState.CLOSED}
            )
        else:
            slot.release(call_seconds=call_seconds)

        def finish() -> DispatchOutcome:
            completion = work.job.store(task, output)
            self._registry.record_dispatch_success(endpoint)
            if not self._tasks.complete(
                claim,
                result_key=completion.result_key,
                endpoint_id=endpoint.endpoint_id,
                fields=completion.fields,
            ):
                # Our lease was taken over; the holder's result stands (results are written
                # once per task), so nothing is lost.
                logger.warning("lease lost before completion", extra=log)
                return DispatchOutcome.SKIPPED
            logger.info("task done", extra=log)
            if self._observer is not None:
                self._observer.task_done(task, call_seconds=call_seconds, at=self._clock())
            return DispatchOutcome.DONE

        return finish, None
