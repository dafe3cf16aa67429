"""TaskStore: the tasks table. Every state change is a conditional write, from the states
gpuqueue.task_states declares for it (the table below tells the story; that module is the
rule):
  QUEUED  -> RUNNING   claim (dispatcher), attempt + 1, lease
  QUEUED  -> CANCELED  cancel (owner)
  QUEUED  -> EXPIRED   not started (attempt 0) before its queue deadline; no GPU call
  AWAITING_UPLOAD -> QUEUED    the audio upload landed (speech, async)
  AWAITING_UPLOAD -> CANCELED  cancel (owner)
  AWAITING_UPLOAD -> EXPIRED   the upload never arrived (found when the owner's share is full)
  QUEUED  -> FAILED    the queue could not take the message, attempts exhausted, or the
                       input is unusable (an upload gone)
  RUNNING -> DONE      result written, while holding the lease
  RUNNING -> QUEUED    retryable failure, while holding the lease
  RUNNING -> FAILED    permanent failure or last attempt, while holding the lease
  RUNNING (lease expired) -> RUNNING  re-claimed by a redelivered message
  QUEUED / RUNNING (lease expired) -> FAILED  its message was dead-lettered (the DLQ consumer)
  RUNNING (lease expired) -> QUEUED  the reaper: its worker died; the message is re-sent
  RUNNING (lease expired) -> FAILED  the reaper: ... and its attempts are used up

Every open task (QUEUED, RUNNING, AWAITING_UPLOAD) is in the sparse `by-reap` index, under
`reap_shard` = "<state>#<n>" with `reap_at` = the time it became due to look at: when it
was queued, when its lease ends, when its upload window closed. Each write keeps the two
attributes current and a final state removes them, so the reaper queries a few small
partitions instead of scanning the table (reaper.py).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
import uuid
import zlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from gpuqueue.errors import InvalidInput, TaskNotFound, TaskStateConflict
from gpuqueue.models import (
    CallbackWait,
    EndpointProtocol,
    ImageRequest,
    Priority,
    SpeechInput,
    Task,
    TaskKind,
    TaskProgress,
    TaskStatus,
    WebhookAttempt,
    WebhookEvent,
    iso,
    utc_now,
)
from gpuqueue.store.dynamodb_conditions import is_conditional_failure, refused_item
from gpuqueue.store.sdk_errors import raises_store_error
from gpuqueue.store.task_ids import issued_at, new_task_id
from gpuqueue.task_states import (
    AWAIT_CALLBACK,
    CANCEL,
    CANCEL_RUNNING,
    CLAIM,
    COMPLETE,
    EXPIRE,
    EXPIRE_UPLOAD,
    FAIL,
    FAIL_ABANDONED,
    FAIL_DEAD_LETTERED,
    FAIL_UNCLAIMED,
    FAIL_UNQUEUED,
    HAND_BACK,
    INITIAL_STATUSES,
    NEXT_ATTEMPT,
    PROGRESS,
    REAP_STATE,
    REQUEST_CANCEL,
    REQUEUE_ABANDONED,
    RESEND,
    RETRY,
    UPLOADED,
    ReapState,
    Transition,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

USER_INDEX = "by-user"
REAP_INDEX = "by-reap"
# Spreads the index's writes over a few partitions; the reaper reads all of them. Changing
# it strands rows in shards no longer read: raise it only together with a backfill.
REAP_SHARDS = 4
# A submit takes its share before it writes the task row; it ends within its Lambda's 29 s.
UNWRITTEN_GRACE_SECONDS = 60.0
BATCH_GET_LIMIT = 100  # keys per BatchGetItem, DynamoDB's maximum
BATCH_GET_ROUNDS = 4  # tries for unprocessed keys (throttling) before giving up on them


@dataclass(frozen=True)
class TaskPage:
    tasks: list[Task]
    next_cursor: str | None


def _never_written(task_id: str, now: float) -> bool:
    """A missing row whose id was issued long enough ago that its submit must have ended: a
    younger one's submit may be writing it right now (it took its share just before)."""
    issued = issued_at(task_id)
    return issued is None or issued < now - UNWRITTEN_GRACE_SECONDS


def reap_shard(task_id: str, state: ReapState) -> str:
    return f"{state.value}#{zlib.crc32(task_id.encode()) % REAP_SHARDS}"


def _to_the_ms(seconds: float) -> float:
    """A time (epoch seconds) as a task holds it: to the millisecond."""
    return round(seconds, 3)


def _stored_time(seconds: float) -> Decimal:
    return Decimal(str(_to_the_ms(seconds)))


def _reap_fields(task_id: str, state: ReapState, at: float) -> dict[str, Any]:
    return {"reap_shard": reap_shard(task_id, state), "reap_at": _stored_time(at)}


_REAP_ATTRIBUTES = ("reap_shard", "reap_at")
# Inside a stored progress: when it was written (epoch seconds), for the rate bound of
# writers that remember nothing between reports (TaskProgress ignores it on reads).
PROGRESS_WRITTEN_AT = "written_at"


class ProgressAck(StrEnum):
    """What a progress write found: written, or why the call's driver should stop."""

    WRITTEN = "written"
    CANCEL_REQUESTED = "cancel requested"  # its owner asked: stop the GPU
    LEASE_LOST = "lease lost"  # no longer ours: stop writing, leave the GPU alone
    TOO_SOON = "too soon"  # written less than the rate bound ago (`not_within`): not again


@dataclass(frozen=True)
class ClaimRefused:
    """A claim's condition failed: the task as it stood (None: there is no such task)."""

    task: Task | None


@dataclass(frozen=True)
class Claim:
    """Proof that this invocation holds a task: writes succeed only with the same lease id."""

    task: Task
    lease_id: str


class TaskStore:
    def __init__(self, table: Table, *, retention: timedelta = timedelta(days=7)) -> None:
        self._table = table
        self._retention = retention

    # --- submit side ------------------------------------------------------------------------

    def create_image_task(
        self,
        owner: str,
        request: ImageRequest,
        *,
        queue_ttl_seconds: int,
        task_id: str | None = None,
        ticket: int | None = None,
        now: datetime | None = None,
    ) -> Task:
        now = now or utc_now()
        ttl = request.queue_ttl_seconds or queue_ttl_seconds
        task = Task(
            task_id=task_id or new_task_id(),
            user_id=owner,
            kind=TaskKind.IMAGE,
            status=TaskStatus.QUEUED,
            priority=request.priority,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            params=request.params(),
            created_at=iso(now),
            updated_at=iso(now),
            expires_at=int((now + self._retention).timestamp()),
            queue_ttl_seconds=ttl,
            queue_deadline=_to_the_ms(now.timestamp() + ttl),
            webhook_url=request.webhook_url,
            webhook_events=request.webhook_events,
            ticket=ticket,
        )
        return self._put_new(task, reap_at=now.timestamp())

    def create_speech_task(
        self,
        owner: str,
        speech: SpeechInput,
        *,
        prompt: str | None,
        task_id: str,
        queue_ttl_seconds: int,
        upload_window_seconds: int,
        priority: Priority = Priority.NORMAL,
        webhook_url: str | None = None,
        webhook_events: list[WebhookEvent] | None = None,
        now: datetime | None = None,
    ) -> Task:
        """A long-audio task, AWAITING_UPLOAD until its audio lands in S3 (at the latest
        `upload_window_seconds` from now)."""
        now = now or utc_now()
        task = Task(
            task_id=task_id,
            user_id=owner,
            kind=TaskKind.SPEECH,
            status=TaskStatus.AWAITING_UPLOAD,
            priority=priority,
            prompt=prompt or "",
            speech=speech,
            created_at=iso(now),
            updated_at=iso(now),
            expires_at=int((now + self._retention).timestamp()),
            queue_ttl_seconds=queue_ttl_seconds,
            upload_deadline=_to_the_ms(now.timestamp() + upload_window_seconds),
            webhook_url=webhook_url,
            webhook_events=webhook_events,
        )
        return self._put_new(task, reap_at=now.timestamp() + upload_window_seconds)

    @raises_store_error("tasks table")
    def _put_new(self, task: Task, *, reap_at: float) -> Task:
        """Write a task that must not exist yet, in a state a task may start in; the reaper
        looks at it at `reap_at`."""
        if task.status not in INITIAL_STATUSES:
            raise ValueError(f"a task does not start {task.status.value}")
        item = task.model_dump(mode="json", exclude_none=True)  # pragma: no mutate (all JSON)
        # JSON numbers come out as floats, which DynamoDB refuses: the deadlines as Decimals.
        for deadline in ("queue_deadline", "upload_deadline"):
            if (at := getattr(task, deadline)) is not None:
                item[deadline] = _stored_time(at)
        item.update(_reap_fields(task.task_id, REAP_STATE[task.status], reap_at))
        self._table.put_item(Item=item, ConditionExpression="attribute_not_exists(task_id)")
        return task

    def mark_uploaded(
        self, task: Task, *, ticket: int | None = None, now: float | None = None
    ) -> Task | None:
        """AWAITING_UPLOAD -> QUEUED once the audio is in S3; its queue deadline starts now.
        None if the task was not waiting (canceled, or a repeated upload event)."""
        now = time.time() if now is None else now
        updates: dict[str, Any] = {}
        if ticket is not None:
            updates["ticket"] = ticket
        if task.queue_ttl_seconds:
            updates["queue_deadline"] = _stored_time(now + task.queue_ttl_seconds)
        try:
            return self._transition(task.task_id, UPLOADED, updates=updates)
        except _ConditionFailed:
            return None

    def fail_unqueued(self, task_id: str, error: str) -> None:
        """The message never reached the queue: end the task instead of leaving an orphan."""
        self._transition(task_id, FAIL_UNQUEUED, updates={"error": error})

    # --- reads ------------------------------------------------------------------------------

    @raises_store_error("tasks table")
    def get(self, task_id: str) -> Task | None:
        """The task; None when missing or past its retention (DynamoDB's TTL deletes rows up
        to days late: an expired row must never be served)."""
        item = self._table.get_item(Key={"task_id": task_id}, ConsistentRead=True).get("Item")
        if not item:
            return None
        task = Task.model_validate(item)
        return None if task.is_expired(time.time()) else task

    def inactive_among(self, task_ids: Collection[str], *, now: float | None = None) -> set[str]:
        """The ids among `task_ids` that hold no share of their owner's active tasks: ended,
        gone (expired by TTL, or never written by a submit that crashed), or waiting for an
        upload that can no longer arrive (those are ended here,
        AWAITING_UPLOAD -> EXPIRED). One BatchGetItem per 100 ids."""
        now = time.time() if now is None else now
        ids = list(dict.fromkeys(task_ids))
        found: dict[str, dict[str, Any]] = {}
        # The resource's client converts Python values both ways (it is not the raw client).
        client: Any = self._table.meta.client
        for start in range(0, len(ids), BATCH_GET_LIMIT):
            keys: list[dict[str, Any]] = [
                {"task_id": i} for i in ids[start : start + BATCH_GET_LIMIT]
            ]
            for _ in range(BATCH_GET_ROUNDS):
                if not keys:
                    break
                answer = client.batch_get_item(
                    RequestItems={
                        self._table.name: {
                            "Keys": keys,
                            "ProjectionExpression": "task_id, #s, upload_deadline",
                            "ExpressionAttributeNames": {"#s": "status"},
                            "ConsistentRead": True,
                        }
                    }
                )
                for item in answer["Responses"].get(self._table.name, []):
                    found[str(item["task_id"])] = dict(item)
                keys = list(
                    answer.get("UnprocessedKeys", {}).get(self._table.name, {}).get("Keys", [])
                )
            if keys:
                # Unread after every round: count them as active (refusing is the safe side).
                found.update(
                    {str(k["task_id"]): {"status": TaskStatus.RUNNING.value} for k in keys}
                )
        inactive = set()
        for task_id in ids:
            item = found.get(task_id)
            if (
                (item is None and _never_written(task_id, now))
                or (item is not None and TaskStatus(str(item["status"])).is_terminal)
                or (
                    item is not None
                    and item["status"] == TaskStatus.AWAITING_UPLOAD.value
                    and "upload_deadline" in item
                    and float(item["upload_deadline"]) < now
                    and self.expire_upload(task_id)
                )
            ):
                inactive.add(task_id)
        return inactive

    def expire_upload(self, task_id: str) -> bool:
        """AWAITING_UPLOAD -> EXPIRED: the upload window closed without the audio."""
        try:
            self._transition(
                task_id, EXPIRE_UPLOAD, updates={"error": "the audio upload never arrived"}
            )
        except _ConditionFailed:
            return False
        return True

    def get_for_owner(self, task_id: str, owner: str) -> Task:
        """Another user's task is indistinguishable from a missing one (404, never 403)."""
        task = self.get(task_id)
        if task is None or task.user_id != owner:
            raise TaskNotFound(f"task {task_id} not found", field="task_id")
        return task

    def list_for_owner(self, owner: str, *, limit: int, cursor: str | None) -> TaskPage:
        kwargs: dict[str, Any] = {
            "IndexName": USER_INDEX,
            "KeyConditionExpression": "user_id = :u",
            "ExpressionAttributeValues": {":u": owner},
            "ScanIndexForward": False,
            "Limit": limit,
        }
        if cursor:
            start = _decode_cursor(cursor)
            if start.get("user_id") != owner:
                raise InvalidInput("cursor does not belong to this listing", field="cursor")
            kwargs["ExclusiveStartKey"] = start
        page = self._table.query(**kwargs)
        last = page.get("LastEvaluatedKey")
        now = time.time()
        tasks = [Task.model_validate(item) for item in page.get("Items", [])]
        return TaskPage(
            # Rows past retention that TTL has not deleted yet: left out (the page may be
            # shorter than `limit`; the cursor still goes on from the last row read).
            tasks=[task for task in tasks if not task.is_expired(now)],
            next_cursor=_encode_cursor(last) if last else None,
        )

    # --- owner actions ----------------------------------------------------------------------

    def cancel(self, task_id: str, owner: str) -> Task:
        """QUEUED or AWAITING_UPLOAD: CANCELED at once. RUNNING on a protocol that can stop
        a job it started: the cancel is requested (the task as it now stands; asking again
        changes nothing) and whoever drives the call stops the GPU and ends it CANCELED."""
        task = self.get_for_owner(task_id, owner)
        try:
            return self._transition(
                task_id, CANCEL, guard="user_id = :owner", updates={}, values={":owner": owner}
            )
        except _ConditionFailed as refused:
            current = task if refused.item is None else Task.model_validate(refused.item)
        if current.status is TaskStatus.RUNNING:
            if current.cancel_requested_at is not None:
                return current
            protocol = current.endpoint_protocol
            if protocol is None or not protocol.can_stop_a_running_job:
                raise TaskStateConflict(
                    f"task {task_id} is RUNNING on an endpoint whose protocol "
                    f"({protocol.value if protocol else 'unknown'}) cannot stop a job it has "
                    "started; it will finish",
                    field="task_id",
                )
            try:
                return self.request_cancel(current, owner)
            except _ConditionFailed as moved:  # it ended meanwhile
                current = current if moved.item is None else Task.model_validate(moved.item)
        raise TaskStateConflict(
            f"task {task_id} is {current.status.value}; only QUEUED, AWAITING_UPLOAD or "
            "RUNNING tasks can be canceled",
            field="task_id",
        )

    def request_cancel(self, task: Task, owner: str) -> Task:
        """RUNNING: its owner's cancel recorded, for whoever drives its call (raises
        _ConditionFailed when it is no longer running)."""
        return self._transition(
            task.task_id,
            REQUEST_CANCEL,
            guard="user_id = :owner",
            updates={"cancel_requested_at": iso(utc_now())},
            values={":owner": owner},
        )

    def report_progress(
        self,
        claim: Claim,
        progress: TaskProgress,
        *,
        not_within: float | None = None,
        now: float | None = None,
    ) -> ProgressAck:
        """The GPU's step count, written while the claim's lease holds and no cancel was
        asked for: one write that also tells the call's driver whether to stop.

        `not_within` (seconds): the write also keeps its time in the progress and is made
        only if the last one carrying a time is at least that old (TOO_SOON otherwise), for
        writers with no memory between reports (the callback route: one invocation per
        webhook, many containers). A step at or behind the stored one of the same count is
        not written either (TOO_SOON: nothing for the caller to do)."""
        # Never backwards on the same count: reports may arrive out of order (webhooks
        # handled side by side), and a user's bar must only move on (a new count, such as a
        # refiner's second bar, starts afresh).
        guard = (
            "lease_id = :lease AND attribute_not_exists(cancel_requested_at)"
            " AND (attribute_not_exists(#p) OR #p.#steps <> :steps OR #p.#step < :step)"
        )
        item = _progress_item(progress)
        values: dict[str, Any] = {
            ":lease": claim.lease_id,
            ":steps": progress.steps,
            ":step": progress.step,
        }
        names: dict[str, str] = {"#p": "progress", "#steps": "steps", "#step": "step"}
        if not_within is not None:
            now = time.time() if now is None else now
            item[PROGRESS_WRITTEN_AT] = _stored_time(now)
            guard += " AND (attribute_not_exists(#p.#at) OR #p.#at <= :cutoff)"
            values[":cutoff"] = _stored_time(now - not_within)
            names["#at"] = PROGRESS_WRITTEN_AT
        try:
            self._transition(
                claim.task.task_id,
                PROGRESS,
                guard=guard,
                updates={"progress": item},
                values=values,
                names=names,
            )
        except _ConditionFailed as refused:
            why = _why_stop(claim, refused.item)
            if why is ProgressAck.LEASE_LOST and _still_held(claim, refused.item):
                return ProgressAck.TOO_SOON
            return why
        return ProgressAck.WRITTEN

    def await_callback(self, claim: Claim, callback: CallbackWait, *, lease_until: float) -> bool:
        """Callback mode: its server accepted the job; the lease runs to `lease_until` (the
        whole generation) and the callback route finishes it. False: the lease was lost."""
        item = callback.model_dump(mode="json", exclude_none=True)
        item["started_at"] = _stored_time(callback.started_at)
        for lease in item["leases"]:
            if "call_seconds_ewma" in lease:
                lease["call_seconds_ewma"] = Decimal(str(lease["call_seconds_ewma"]))
        return self._while_holding(
            claim,
            AWAIT_CALLBACK,
            updates={"callback": item, "lease_until": _stored_time(lease_until)},
        )

    def stop_asked(self, claim: Claim) -> ProgressAck:
        """With no progress to write: one eventually consistent read of the same answer."""
        item = self._table.get_item(
            Key={"task_id": claim.task.task_id},
            ProjectionExpression="lease_id, cancel_requested_at, #s",
            ExpressionAttributeNames={"#s": "status"},
        ).get("Item")
        if (
            item is not None
            and item.get("status") == TaskStatus.RUNNING.value
            and item.get("lease_id") == claim.lease_id
            and "cancel_requested_at" not in item
        ):
            return ProgressAck.WRITTEN
        return _why_stop(claim, item)

    def cancel_running(self, claim: Claim) -> bool:
        """The GPU stopped on its owner's request: CANCELED, nothing stored."""
        return self._while_holding(
            claim, CANCEL_RUNNING, updates={}, removes=("lease_until", "progress")
        )

    def end_canceled(self, task: Task) -> bool:
        """A task whose cancel was asked for while it ran, found again before its next call
        (it went back to the queue meanwhile): CANCELED without a call."""
        try:
            self._transition(
                task.task_id,
                CANCEL_RUNNING,
                guard="attribute_exists(cancel_requested_at) AND attempt = :seen",
                updates={},
                values={":seen": task.attempt},
                removes=("lease_until", "progress"),
            )
        except _ConditionFailed:
            return False
        return True

    # --- dispatcher side --------------------------------------------------------------------

    def claim(
        self,
        task: Task,
        *,
        lease_seconds: float,
        now: float,
        endpoint_id: str | None = None,
        endpoint_protocol: EndpointProtocol | None = None,
    ) -> Claim | None:
        """QUEUED (or RUNNING with an expired lease) -> RUNNING; None if someone else has it."""
        lease_id = str(uuid.uuid4())
        updates: dict[str, Any] = {
            "started_at": iso(utc_now()),
            "lease_id": lease_id,
            "lease_until": _stored_time(now + lease_seconds),
            "attempt": task.attempt + 1,
        }
        if endpoint_id:
            updates["endpoint_id"] = endpoint_id
        if endpoint_protocol:
            updates["endpoint_protocol"] = endpoint_protocol.value
        try:
            claimed = self._transition(
                task.task_id,
                CLAIM,
                guard="attempt = :seen AND (#s <> :running OR lease_until < :now)",
                updates=updates,
                values={
                    ":seen": task.attempt,
                    ":running": TaskStatus.RUNNING.value,
                    ":now": _stored_time(now),
                },
                removes=("progress",),
            )
        except _ConditionFailed:
            return None
        return Claim(task=claimed, lease_id=lease_id)

    def claim_unread(
        self,
        task_id: str,
        *,
        lease_seconds: float,
        now: float,
        endpoint_id: str,
        max_attempts: int,
        endpoint_protocol: EndpointProtocol | None = None,
    ) -> Claim | ClaimRefused:
        """Claim a task without reading it first: one conditional UpdateItem that returns it.

        Claimed if it is QUEUED (or RUNNING with its lease over), has attempts left, is still
        within its queue deadline if it never started, and did not last fail on
        `endpoint_id` (a retry goes elsewhere when it can). Refused: the task as it stood,
        for the caller to decide (None: no such task)."""
        lease_id = str(uuid.uuid4())
        updates: dict[str, Any] = {
            "started_at": iso(utc_now()),
            "lease_id": lease_id,
            "lease_until": _stored_time(now + lease_seconds),
            "endpoint_id": endpoint_id,
        }
        if endpoint_protocol:
            updates["endpoint_protocol"] = endpoint_protocol.value
        try:
            claimed = self._transition(
                task_id,
                CLAIM,
                guard=(
                    "attempt < :max AND (#s <> :running OR lease_until < :now)"
                    " AND (attempt > :never OR attribute_not_exists(queue_deadline)"
                    " OR queue_deadline >= :now)"
                    " AND NOT (endpoint_id = :here AND attribute_exists(#error))"
                ),
                updates=updates,
                adds={"attempt": 1},
                values={
                    ":max": max_attempts,
                    ":running": TaskStatus.RUNNING.value,
                    ":now": _stored_time(now),
                    ":never": 0,
                    ":here": endpoint_id,
                },
                names={"#error": "error"},
                removes=("progress",),
            )
        except _ConditionFailed as refused:
            found = None if refused.item is None else Task.model_validate(refused.item)
            return ClaimRefused(task=found)
        return Claim(task=claimed, lease_id=lease_id)

    def next_attempt(
        self,
        claim: Claim,
        *,
        lease_seconds: float,
        now: float,
        endpoint_id: str,
        error: str | None = None,
        endpoint_protocol: EndpointProtocol | None = None,
    ) -> Claim | None:
        """Another attempt in the same invocation, on another endpoint, under a fresh lease.

        `error` (the failed attempt's) is recorded in the same write.
        """
        lease_id = str(uuid.uuid4())
        updates: dict[str, Any] = {
            "lease_id": lease_id,
            "lease_until": _stored_time(now + lease_seconds),
            "attempt": claim.task.attempt + 1,
            "endpoint_id": endpoint_id,
        }
        if error:
            updates["error"] = error
        if endpoint_protocol:
            updates["endpoint_protocol"] = endpoint_protocol.value
        try:
            task = self._transition(
                claim.task.task_id,
                NEXT_ATTEMPT,
                guard="lease_id = :lease",
                updates=updates,
                values={":lease": claim.lease_id},
                removes=("progress",),
            )
        except _ConditionFailed:
            return None
        return Claim(task=task, lease_id=lease_id)

    def complete(
        self,
        claim: Claim,
        *,
        result_key: str,
        endpoint_id: str,
        fields: Mapping[str, Any] | None = None,
    ) -> bool:
        return self._while_holding(
            claim,
            COMPLETE,
            updates={**(fields or {}), "result_key": result_key, "endpoint_id": endpoint_id},
            removes=("lease_until", "error", "progress"),
        )

    def release_for_retry(self, claim: Claim, *, error: str, endpoint_id: str | None) -> bool:
        updates: dict[str, Any] = {"error": error}
        if endpoint_id:
            updates["endpoint_id"] = endpoint_id
        return self._while_holding(
            claim, RETRY, updates=updates, removes=("lease_until", "progress")
        )

    def hand_back(self, claim: Claim) -> bool:
        """A task claimed ahead of its call (a kept slot's next task), given back uncalled
        because the slot went away: QUEUED again, for any worker. The attempt stays counted
        (its number may not go back: the stream tells a first departure by attempt 0)."""
        return self._while_holding(
            claim, HAND_BACK, updates={}, removes=("lease_until", "progress")
        )

    def fail(self, claim: Claim, *, error: str, endpoint_id: str | None = None) -> bool:
        updates: dict[str, Any] = {"error": error}
        if endpoint_id:
            updates["endpoint_id"] = endpoint_id
        return self._while_holding(
            claim, FAIL, updates=updates, removes=("lease_until", "progress")
        )

    def expire(self, task: Task, error: str) -> bool:
        """QUEUED -> EXPIRED: never started (attempt 0) before its queue deadline."""
        try:
            self._transition(
                task.task_id,
                EXPIRE,
                guard="attempt = :never",
                updates={"error": error},
                values={":never": 0},
            )
        except _ConditionFailed:
            return False
        return True

    def fail_unclaimed(self, task: Task, error: str) -> bool:
        """End a task this invocation does not hold: attempts used up, or input unusable."""
        try:
            self._transition(
                task.task_id,
                FAIL_UNCLAIMED,
                guard="attempt = :seen",
                updates={"error": error},
                values={":seen": task.attempt},
                removes=("lease_until", "progress"),
            )
        except _ConditionFailed:
            return False
        return True

    def fail_dead_lettered(self, task_id: str, error: str, *, now: float | None = None) -> bool:
        """The task's message reached the dead-letter queue: end the task FAILED, unless a
        worker still holds a live lease on it (then False: ask again later; a task already
        ended is left as it is, also False)."""
        now = time.time() if now is None else now
        try:
            self._transition(
                task_id,
                FAIL_DEAD_LETTERED,
                guard=("#s <> :running OR attribute_not_exists(lease_until) OR lease_until < :now"),
                updates={"error": error},
                values={":running": TaskStatus.RUNNING.value, ":now": _stored_time(now)},
                removes=("lease_until", "progress"),
            )
        except _ConditionFailed:
            return False
        return True

    # --- the reaper -------------------------------------------------------------------------

    def due(self, state: ReapState, *, before: float, limit: int) -> list[str]:
        """Ids of tasks in `state` whose reap time is before `before`, oldest first per shard
        (one Query per shard on the sparse index; no scan)."""
        found: list[str] = []
        for n in range(REAP_SHARDS):
            if len(found) >= limit:
                break
            # One page per shard: the index holds keys only (~100 bytes an item), so a page
            # of `limit` (at most a few hundred) is far below Query's 1 MB page.
            page = self._table.query(
                IndexName=REAP_INDEX,
                KeyConditionExpression="reap_shard = :shard AND reap_at < :before",
                ExpressionAttributeValues={
                    ":before": _stored_time(before),
                    ":shard": f"{state.value}#{n}",
                },
                Limit=limit - len(found),
            )
            found.extend(str(item["task_id"]) for item in page["Items"])
        return found

    def requeue_abandoned(self, task: Task, *, now: float, error: str) -> Task | None:
        """RUNNING with an expired lease -> QUEUED: its worker died and nobody re-claimed it.
        None if it moved on meanwhile (re-claimed, finished)."""
        return self._end_abandoned_run(task, REQUEUE_ABANDONED, now=now, error=error)

    def fail_abandoned(self, task: Task, *, now: float, error: str) -> bool:
        """RUNNING with an expired lease and no attempt left -> FAILED."""
        return self._end_abandoned_run(task, FAIL_ABANDONED, now=now, error=error) is not None

    def _end_abandoned_run(
        self, task: Task, transition: Transition, *, now: float, error: str
    ) -> Task | None:
        """Move a run whose lease (the one `task` was read with) expired; None if it moved on."""
        try:
            return self._transition(
                task.task_id,
                transition,
                guard="lease_id = :lease AND lease_until < :now",
                updates={"error": error},
                values={":lease": task.lease_id or "", ":now": _stored_time(now)},
                removes=("lease_until", "progress"),
            )
        except _ConditionFailed:
            return None

    def defer_resend(self, task_id: str, *, seen_reap_at: float, until: float) -> bool:
        """Take the right to re-send a QUEUED task's message: moves its reap time to `until`
        if nobody (another reaper run, a claim) changed the task since it was read."""
        # Not _transition: the task's state and updated_at stay as they are.
        from_states, from_values = _from_states(RESEND)
        try:
            self._table.update_item(
                Key={"task_id": task_id},
                UpdateExpression="SET reap_at = :until ADD resends :one",
                ConditionExpression=f"{from_states} AND reap_at = :seen",
                ExpressionAttributeNames={"#s": "status"},
                ExpressionAttributeValues={
                    ":until": _stored_time(until),
                    ":seen": _stored_time(seen_reap_at),
                    ":one": 1,
                    **from_values,
                },
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return False
            raise
        return True

    # --- webhooks ---------------------------------------------------------------------------

    def record_delivery(self, task_id: str, attempt: WebhookAttempt, *, max_entries: int) -> bool:
        """Append a webhook attempt to the task's delivery log (False when the log is full or
        the task is gone; the attempt is then only in the function's logs)."""
        entry = attempt.model_dump(mode="json", exclude_none=True)
        try:
            self._table.update_item(
                Key={"task_id": task_id},
                UpdateExpression=(
                    "SET deliveries = list_append(if_not_exists(deliveries, :none), :one)"
                ),
                ConditionExpression=(
                    "attribute_exists(task_id) AND "
                    "(attribute_not_exists(deliveries) OR size(deliveries) < :max)"
                ),
                ExpressionAttributeValues={":none": [], ":one": [entry], ":max": max_entries},
            )
        except ClientError as error:
            if is_conditional_failure(error):
                return False
            raise
        return True

    # --- internals --------------------------------------------------------------------------

    def _while_holding(
        self,
        claim: Claim,
        transition: Transition,
        *,
        updates: dict[str, Any],
        removes: tuple[str, ...] = (),
    ) -> bool:
        """Write only while our lease is the current one: a stale worker never overwrites."""
        try:
            self._transition(
                claim.task.task_id,
                transition,
                guard="lease_id = :lease",
                updates=updates,
                values={":lease": claim.lease_id},
                removes=removes,
            )
        except _ConditionFailed:
            return False
        return True

    @raises_store_error("tasks table")
    def _transition(
        self,
        task_id: str,
        transition: Transition,
        *,
        updates: dict[str, Any],
        guard: str | None = None,
        values: Mapping[str, Any] | None = None,
        removes: tuple[str, ...] = (),
        adds: Mapping[str, int] | None = None,
        names: Mapping[str, str] | None = None,
    ) -> Task:
        """One conditional UpdateItem moving the task along `transition`: only from its
        declared states, and only if `guard` holds too; `adds` are counters raised in the
        same write. A failed condition raises _ConditionFailed with the item as it stood
        (None: no such item). Writing a field the transition does not declare is a bug:
        ValueError, before anything is sent."""
        undeclared = sorted(
            ({*updates, *(adds or {})} - transition.sets) | (set(removes) - transition.clears)
        )
        if undeclared:
            raise ValueError(f"{transition.name} does not write {', '.join(undeclared)}")
        now = utc_now()
        status = transition.target
        updates = {**updates, "status": status.value, "updated_at": iso(now)}
        if status.is_terminal:
            removes = (*removes, *_REAP_ATTRIBUTES)  # leaves the reaper's index
        elif status is TaskStatus.QUEUED:
            updates.update(_reap_fields(task_id, REAP_STATE[status], now.timestamp()))
        elif "lease_until" in updates:
            updates.update(_reap_fields(task_id, REAP_STATE[status], float(updates["lease_until"])))
        names = {"#s": "status", **(names or {})}
        from_states, from_values = _from_states(transition)
        condition = from_states if guard is None else f"{from_states} AND ({guard})"
        sets = []
        expr_values = {**from_values, **(values or {})}
        for i, (attr, value) in enumerate(updates.items()):
            names[f"#u{i}"] = attr
            expr_values[f":u{i}"] = value
            sets.append(f"#u{i} = :u{i}")
        for k, (attr, amount) in enumerate((adds or {}).items()):
            names[f"#a{k}"] = attr
            expr_values[f":a{k}"] = amount
            sets.append(f"#a{k} = #a{k} + :a{k}")
        expression = "SET " + ", ".join(sets)  # pragma: no mutate (keywords ignore case)
        if removes:
            for j, attr in enumerate(removes):
                names[f"#r{j}"] = attr
            # pragma: no mutate start (DynamoDB's keywords ignore case)
            expression += " REMOVE " + ", ".join(f"#r{j}" for j in range(len(removes)))
            # pragma: no mutate end
        try:
            result = self._table.update_item(
                Key={"task_id": task_id},
                UpdateExpression=expression,
                ConditionExpression=f"attribute_exists(task_id) AND ({condition})",
                ExpressionAttributeNames=names,
                ExpressionAttributeValues=expr_values,
                ReturnValues="ALL_NEW",
                # Free with the refusal: callers that decide what to do next need no read.
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except ClientError as error:
            if is_conditional_failure(error):
                raise _ConditionFailed(refused_item(error)) from error
            raise
        return Task.model_validate(result["Attributes"])


def _progress_item(progress: TaskProgress) -> dict[str, Any]:
    item: dict[str, Any] = {
        "step": progress.step,
        "steps": progress.steps,
        "fraction": Decimal(str(progress.fraction)),
    }
    if progress.eta_seconds is not None:
        item["eta_seconds"] = Decimal(str(progress.eta_seconds))
    return item


def _still_held(claim: Claim, item: Mapping[str, Any] | None) -> bool:
    return (
        item is not None
        and item.get("status") == TaskStatus.RUNNING.value
        and item.get("lease_id") == claim.lease_id
    )


def _why_stop(claim: Claim, item: Mapping[str, Any] | None) -> ProgressAck:
    if (
        item is not None
        and item.get("status") == TaskStatus.RUNNING.value
        and item.get("lease_id") == claim.lease_id
        and "cancel_requested_at" in item
    ):
        return ProgressAck.CANCEL_REQUESTED
    return ProgressAck.LEASE_LOST


def _from_states(transition: Transition) -> tuple[str, dict[str, str]]:
    """The condition that the task is in one of the transition's declared "from" states."""
    values = {f":from{i}": s.value for i, s in enumerate(sorted(transition.sources))}
    return f"#s IN ({', '.join(values)})", values


class _ConditionFailed(Exception):
    def __init__(self, item: dict[str, Any] | None = None) -> None:
        super().__init__("condition failed")
        self.item = item


def _encode_cursor(key: dict[str, Any]) -> str:
    raw = json.dumps({k: str(v) for k, v in key.items()}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> dict[str, Any]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidInput("cursor is not valid", field="cursor") from None
    if not isinstance(key, dict) or set(key) != {"task_id", "user_id", "created_at"}:
        raise InvalidInput("cursor is not valid", field="cursor")
    return {k: str(v) for k, v in key.items()}
