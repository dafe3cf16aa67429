"""The task state machine: which changes of state the tasks table allows (from which
states, to which), which task fields each change writes, and what becomes of each open state.

The states themselves are TaskStatus, with TERMINAL_STATUSES / OPEN_STATUSES and the fields
TaskView shows per state beside it (models.py: every model refers to them). The store builds
each conditional write's "from" states from the transitions here (no code path can move a
task out of a state not listed), the reaper goes through REAPER_TRANSITIONS' states, and
the task-events stream's filter (template.yaml) is checked against what its consumer needs
(lifecycle/task_events.py), which is built from these sets.

Adding a state: declare it in TaskStatus, terminal or open; give it its transitions here;
an open state also needs its reap partition, its reaper rule and the reaper policy's wait.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import StrEnum

from gpuqueue.models import OPEN_STATUSES, TaskStatus

# What a task is created as: an image task queued at once, a long-audio task waiting for
# its upload.
INITIAL_STATUSES = frozenset({TaskStatus.QUEUED, TaskStatus.AWAITING_UPLOAD})
# The waiting line (queue positions) is the tasks QUEUED and never started.
WAITING_LINE_STATUS = TaskStatus.QUEUED


class ReapState(StrEnum):
    """An open state, as the reaper's index partitions it (`reap_shard` "<value>#<n>")."""

    QUEUED = "queued"  # reap_at: when it was (re)queued
    RUNNING = "running"  # reap_at: when its lease ends
    WAITING = "waiting"  # reap_at: when its upload window closes


REAP_STATE = {
    TaskStatus.QUEUED: ReapState.QUEUED,
    TaskStatus.RUNNING: ReapState.RUNNING,
    TaskStatus.AWAITING_UPLOAD: ReapState.WAITING,
}


@dataclass(frozen=True)
class Transition:
    """A change of state the tasks table allows: from any of `sources` to `target`, writing
    only `sets` and removing only `clears` (beside status, updated_at and the reap index's
    attributes, which every write keeps current)."""

    name: str
    sources: frozenset[TaskStatus]
    target: TaskStatus
    sets: frozenset[str] = frozenset()
    clears: frozenset[str] = frozenset()


def _transition(
    name: str,
    sources: AbstractSet[TaskStatus],
    target: TaskStatus,
    sets: AbstractSet[str] = frozenset(),
    clears: AbstractSet[str] = frozenset(),
) -> Transition:
    return Transition(name, frozenset(sources), target, frozenset(sets), frozenset(clears))


_S = TaskStatus
_CLAIM_FIELDS = {
    "started_at",
    "lease_id",
    "lease_until",
    "attempt",
    "endpoint_id",
    "endpoint_protocol",
}

# The audio landed: queued, with its ticket; its queue deadline starts now.
UPLOADED = _transition("uploaded", {_S.AWAITING_UPLOAD}, _S.QUEUED, {"ticket", "queue_deadline"})
CANCEL = _transition("cancel", {_S.QUEUED, _S.AWAITING_UPLOAD}, _S.CANCELED)  # by its owner
# Its owner asks to cancel it while it runs: whoever drives its GPU call stops the server
# (interrupt, cancel) and ends it CANCELED (CANCEL_RUNNING).
REQUEST_CANCEL = _transition("request cancel", {_S.RUNNING}, _S.RUNNING, {"cancel_requested_at"})
# A worker takes it: queued, or running under a lease that ended (its worker died). Its
# GPU starts over: a dead worker's progress goes (and the stream's progress filter sees a
# claim as no progress: lifecycle/task_events.py).
CLAIM = _transition("claim", {_S.QUEUED, _S.RUNNING}, _S.RUNNING, _CLAIM_FIELDS, {"progress"})
# The same invocation tries again elsewhere, under a fresh lease.
NEXT_ATTEMPT = _transition(
    "next attempt",
    {_S.RUNNING},
    _S.RUNNING,
    {"lease_id", "lease_until", "attempt", "endpoint_id", "endpoint_protocol", "error"},
    {"progress"},
)
# The GPU's step count, as its server reports it (at a bounded rate: dispatch/call_watch.py).
PROGRESS = _transition("progress", {_S.RUNNING}, _S.RUNNING, {"progress"})
# Callback mode: its server accepted the job and will report by webhook; the dispatcher
# records what the callback route needs and a lease long enough for the whole generation,
# and returns (dispatch/cog_callbacks.py).
AWAIT_CALLBACK = _transition(
    "await callback", {_S.RUNNING}, _S.RUNNING, {"lease_until", "callback"}
)
COMPLETE = _transition(
    "complete",
    {_S.RUNNING},
    _S.DONE,
    {"result_key", "endpoint_id", "transcript_text"},
    {"lease_until", "error", "progress"},
)
# The GPU stopped on its owner's request (or the request found it between attempts): no
# output is stored.
CANCEL_RUNNING = _transition(
    "cancel running", {_S.RUNNING, _S.QUEUED}, _S.CANCELED, {"error"}, {"lease_until", "progress"}
)
RETRY = _transition(
    "retry", {_S.RUNNING}, _S.QUEUED, {"error", "endpoint_id"}, {"lease_until", "progress"}
)
# Claimed ahead of its call, given back uncalled (the attempt stays counted).
HAND_BACK = _transition("hand back", {_S.RUNNING}, _S.QUEUED, clears={"lease_until", "progress"})
FAIL = _transition(
    "fail", {_S.RUNNING}, _S.FAILED, {"error", "endpoint_id"}, {"lease_until", "progress"}
)
# Never started (attempt 0) before its queue deadline.
EXPIRE = _transition("expire", {_S.QUEUED}, _S.EXPIRED, {"error"})
EXPIRE_UPLOAD = _transition("expire upload", {_S.AWAITING_UPLOAD}, _S.EXPIRED, {"error"})
# The queue never took its message.
FAIL_UNQUEUED = _transition("fail unqueued", {_S.QUEUED}, _S.FAILED, {"error"})
# Ended by someone who does not hold it: attempts used up, or its input unusable.
FAIL_UNCLAIMED = _transition(
    "fail unclaimed", OPEN_STATUSES, _S.FAILED, {"error"}, {"lease_until", "progress"}
)
# Its message was dead-lettered (not while a live lease holds it).
FAIL_DEAD_LETTERED = _transition(
    "fail dead-lettered", OPEN_STATUSES, _S.FAILED, {"error"}, {"lease_until", "progress"}
)
# The reaper: a run whose lease ended long ago (its worker died), put back or ended.
REQUEUE_ABANDONED = _transition(
    "requeue abandoned", {_S.RUNNING}, _S.QUEUED, {"error"}, {"lease_until", "progress"}
)
FAIL_ABANDONED = _transition(
    "fail abandoned", {_S.RUNNING}, _S.FAILED, {"error"}, {"lease_until", "progress"}
)
# The reaper re-sends a queued task's message (its state stays).
RESEND = _transition("resend", {_S.QUEUED}, _S.QUEUED, {"reap_at", "resends"})

TRANSITIONS = (
    UPLOADED,
    CANCEL,
    REQUEST_CANCEL,
    CLAIM,
    NEXT_ATTEMPT,
    PROGRESS,
    AWAIT_CALLBACK,
    COMPLETE,
    CANCEL_RUNNING,
    RETRY,
    HAND_BACK,
    FAIL,
    EXPIRE,
    EXPIRE_UPLOAD,
    FAIL_UNQUEUED,
    FAIL_UNCLAIMED,
    FAIL_DEAD_LETTERED,
    REQUEUE_ABANDONED,
    FAIL_ABANDONED,
    RESEND,
)

# What the reaper may do with an overdue task, per open state (reaper.py chooses among them).
REAPER_TRANSITIONS = {
    TaskStatus.RUNNING: (REQUEUE_ABANDONED, FAIL_ABANDONED),
    TaskStatus.QUEUED: (EXPIRE, RESEND),
    TaskStatus.AWAITING_UPLOAD: (EXPIRE_UPLOAD,),
}


def allowed(source: TaskStatus, target: TaskStatus) -> bool:
    """Whether some declared transition moves a task from `source` to `target`."""
    return any(source in t.sources and t.target is target for t in TRANSITIONS)
