"""Cog callback mode: no Lambda waits on the GPU.

The dispatcher claims the task and a slot as for any call, then (`CallbackStarter`) records
what the callback needs on the task in one conditional write (the prediction's id, the hash
of a fresh per-attempt token, the slot leases, and a task lease as long as a whole
generation), holds the slot to the same end, starts the prediction with
`Prefer: respond-async` and a webhook to `POST /api/v1/callbacks/cog/{task_id}?token=...`,
and returns. Recorded first, started second: a prediction fast enough to finish before the
dispatcher's next write still finds its task ready for it.

The callback route (`CogCallbacks`) takes Cog's webhooks. Cog signs nothing, so the token
in the URL is the authorisation: only its hash is stored, compared in constant time, and
a wrong token or an unknown task is 404 alike. Then:
- `processing` with logs: the step count, written at most once per task per 2 s (a
  condition on the time stored with it: one invocation per webhook remembers nothing);
  if its owner asked to cancel, `POST /predictions/{id}/cancel` instead.
- `succeeded`: the PNG stored, DONE, the slot freed, the endpoint's success recorded. If
  its owner had asked to cancel (a model that logs nothing shows no chance sooner), it
  ends CANCELED and nothing is stored.
- `failed`: FAILED with Cog's error. Not retried: Cog's `failed` is the predictor raising
  (its input, its code), which the sync adapter also treats as permanent; the endpoint's
  failure count goes up, as for a failed sync call.
- `canceled`: CANCELED when its owner asked; else FAILED (the server gave up on it).
Every final status frees the slot leases the token names (conditional on their lease ids,
so a late webhook never frees a slot someone else holds now). A webhook for a task that
moved on (ended, or another attempt holds it) changes nothing else and is answered 2xx;
Cog retries on 5xx, which our own failures (S3, DynamoDB) give, and bad bodies are 4xx.

A lost `completed` webhook: the task's lease ends, the reaper puts it back (or fails it)
as for a dead worker, and the slot's lease lapses by itself at the same time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import quote

from aws_lambda_powertools import Logger

from gpuqueue.errors import GpuError, InvalidInput, StoreError, TaskNotFound
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.slot_broker import HeldSlot
from gpuqueue.gpu.cog_client import parse_progress, prediction_id
from gpuqueue.gpu.cog_webhooks import (
    CogPredictions,
    CogStatus,
    CogWebhook,
    fits_callback,
    png_of,
)
from gpuqueue.models import (
    CallbackLease,
    CallbackWait,
    Endpoint,
    EndpointProtocol,
    SlotLease,
    Task,
    TaskKind,
    TaskProgress,
    TaskStatus,
)
from gpuqueue.store.image_store import ImageStore
from gpuqueue.store.task_store import Claim, ProgressAck, TaskStore

logger = Logger(child=True)

CALLBACK_ROUTE = "/api/v1/callbacks/cog/{task_id}"
TOKEN_BYTES = 32
# A callback-mode task's progress is written at most this often (as the dispatcher's).
PROGRESS_WRITE_SECONDS = 2.0


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str | None, stored_hash: str) -> bool:
    """Constant time: how much of a guess matched never shows in the answer's timing."""
    return token is not None and hmac.compare_digest(token_hash(token), stored_hash)


def callback_url(base_url: str, task_id: str, token: str) -> str:
    path = CALLBACK_ROUTE.format(task_id=quote(task_id, safe=""))
    return f"{base_url.rstrip('/')}{path}?token={quote(token, safe='')}"


class CallbackStartRefused(Exception):
    """The slot's lease was lost before the prediction started (the worker stalled): the
    task went back to the queue, nothing was sent."""


class CallbackStarter:
    """The dispatcher's side: which calls go by callback, and starting one."""

    def __init__(
        self,
        predictions: CogPredictions,
        tasks: TaskStore,
        registry: EndpointRegistry,
        *,
        base_url: str | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._predictions = predictions
        self._tasks = tasks
        self._registry = registry
        self._base_url = base_url
        self._clock = clock

    def takes(self, endpoint: Endpoint, task: Task) -> bool:
        """A Cog endpoint in callback mode, a route to call back, and an answer that fits
        in one callback request (larger images go the sync way)."""
        return (
            self._base_url is not None
            and endpoint.callback
            and endpoint.protocol is EndpointProtocol.COG
            and task.kind is TaskKind.IMAGE
            and fits_callback(task.params)
        )

    def start(self, claim: Claim, slot: HeldSlot, *, lease_seconds: float) -> bool:
        """Record, hold, start. True: the server has it, the slot stays leased (not
        released here, nor kept for another task) until the callback frees it. False: the
        task's lease was lost (nothing was sent). Raises GpuError when the server refused
        or was unreachable (the slot is still the caller's to release), and
        CallbackStartRefused when the slot's lease was lost."""
        assert self._base_url is not None  # takes() said so
        task = claim.task
        endpoint = slot.endpoint
        token = new_token()
        now = self._clock()
        until = now + lease_seconds
        leases = [lease for lease in (slot.lease, slot.seat) if lease is not None]
        wait = CallbackWait(
            prediction_id=prediction_id(task),  # one per attempt
            token_hash=token_hash(token),
            lease_id=claim.lease_id,
            endpoint_id=endpoint.endpoint_id,
            leases=[
                CallbackLease(
                    endpoint_id=lease.endpoint_id,
                    slot=lease.slot,
                    lease_id=lease.lease_id,
                    call_seconds_ewma=lease.call_seconds_ewma,
                )
                for lease in leases
            ],
            started_at=now,
        )
        if not self._tasks.await_callback(claim, wait, lease_until=until):
            return False
        for lease in leases:
            if not self._registry.extend_lease(lease, until=until, now=now):
                self._tasks.release_for_retry(
                    claim, error="the slot's lease ended before the call", endpoint_id=None
                )
                raise CallbackStartRefused("the slot's lease ended before the call")
        self._predictions.start(
            endpoint,
            task,
            prediction_id=wait.prediction_id,
            webhook=callback_url(self._base_url, task.task_id, token),
        )
        # Held to the task lease's end: the callback (or, lost, the lease's end) frees it.
        slot.keep_until_lease_ends()
        return True


class CallbackAnswer(StrEnum):
    """What a webhook did (the route answers 200 with it; 404 and 5xx are raised)."""

    PROGRESS = "progress"  # the step count written
    NOTHING_NEW = "nothing new"  # no new step, or written less than 2 s ago
    CANCEL_SENT = "cancel sent"  # its owner asked: the server was told to stop
    DONE = "done"
    FAILED = "failed"
    CANCELED = "canceled"
    STALE = "stale"  # the task moved on (ended, or another attempt): nothing changed


@dataclass(frozen=True)
class CallbackPolicy:
    circuit_failure_threshold: int = 3
    progress_write_seconds: float = PROGRESS_WRITE_SECONDS


class CogCallbacks:
    """The callback route's logic: one webhook in, the task moved on (or left alone)."""

    def __init__(
        self,
        tasks: TaskStore,
        registry: EndpointRegistry,
        images: ImageStore,
        predictions: CogPredictions,
        *,
        policy: CallbackPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._tasks = tasks
        self._registry = registry
        self._images = images
        self._predictions = predictions
        self._policy = policy or CallbackPolicy()
        self._clock = clock

    def receive(self, task_id: str, token: str | None, webhook: CogWebhook) -> CallbackAnswer:
        task = self._tasks.get(task_id)
        wait = task.callback if task is not None else None
        if task is None or wait is None or not token_matches(token, wait.token_hash):
            # No such task, no callback for it, or the wrong token: one answer for all.
            raise TaskNotFound(f"no callback for task {task_id}", field="task_id")
        if webhook.id != wait.prediction_id:
            raise InvalidInput("id: not the prediction this callback is for", field="id")
        log = {"task_id": task_id, "prediction_id": wait.prediction_id, "status": webhook.status}
        current = task.status is TaskStatus.RUNNING and task.lease_id == wait.lease_id
        if not webhook.status.is_final:
            if not current:
                return CallbackAnswer.STALE
            return self._running(task, wait, webhook)
        # Every end frees the slot (only while the lease is still this call's).
        call_seconds = max(0.0, self._clock() - wait.started_at)
        if not current:
            self._free_slots(wait, call_seconds=None)
            logger.info("late webhook: the task moved on", extra=log)
            return CallbackAnswer.STALE
        claim = Claim(task=task, lease_id=wait.lease_id)
        if webhook.status is CogStatus.SUCCEEDED:
            answer = self._succeeded(claim, wait, webhook, call_seconds=call_seconds)
        elif webhook.status is CogStatus.CANCELED and task.cancel_requested_at is not None:
            self._free_slots(wait, call_seconds=None)
            answer = self._canceled(claim)
        else:
            answer = self._failed(claim, wait, webhook)
        logger.info("callback ended the task", extra={**log, "answer": answer.value})
        return answer

    def _running(self, task: Task, wait: CallbackWait, webhook: CogWebhook) -> CallbackAnswer:
        if task.cancel_requested_at is not None:
            return self._cancel(wait)
        counted = parse_progress(webhook.logs or "")
        if counted is None:
            return CallbackAnswer.NOTHING_NEW
        step, steps = counted
        now = self._clock()
        elapsed = now - wait.started_at
        eta = elapsed * (steps - step) / step if step > 0 else None
        progress = TaskProgress.of(step, steps, eta_seconds=eta)
        if task.progress is not None and (task.progress.step, task.progress.steps) == (
            progress.step,
            progress.steps,
        ):
            return CallbackAnswer.NOTHING_NEW
        ack = self._tasks.report_progress(
            Claim(task=task, lease_id=wait.lease_id),
            progress,
            not_within=self._policy.progress_write_seconds,
            now=now,
        )
        if ack is ProgressAck.WRITTEN:
            return CallbackAnswer.PROGRESS
        if ack is ProgressAck.CANCEL_REQUESTED:  # asked since our read
            return self._cancel(wait)
        if ack is ProgressAck.LEASE_LOST:
            return CallbackAnswer.STALE
        return CallbackAnswer.NOTHING_NEW

    def _cancel(self, wait: CallbackWait) -> CallbackAnswer:
        """Tell the server to stop; its `completed` webhook (canceled) ends the task."""
        endpoint = self._registry.get(wait.endpoint_id)
        if endpoint is None:
            # Deleted meanwhile: nobody to tell; the lease's end settles the task.
            logger.warning("cancel: the endpoint is gone", extra={"endpoint_id": wait.endpoint_id})
            return CallbackAnswer.NOTHING_NEW
        try:
            self._predictions.cancel(endpoint, wait.prediction_id)
        except (GpuError, OSError) as error:
            # The next logs webhook asks again; a 5xx would have Cog resend this one only.
            logger.warning("cancel call failed", extra={"error": type(error).__name__})
        return CallbackAnswer.CANCEL_SENT

    def _succeeded(
        self, claim: Claim, wait: CallbackWait, webhook: CogWebhook, *, call_seconds: float
    ) -> CallbackAnswer:
        task = claim.task
        if task.cancel_requested_at is not None:
            # Asked too late to stop the GPU (no logs webhook came after it): no image.
            self._free_slots(wait, call_seconds=None)
            return self._canceled(claim)
        try:
            png = png_of(self._endpoint_of(wait), webhook.output, params=task.params)
        except GpuError as error:
            return self._failed(claim, wait, webhook, error=str(error))
        key = self._images.put_png(task.task_id, png)  # StoreError: 5xx, Cog sends it again
        self._free_slots(wait, call_seconds=call_seconds)
        endpoint = self._registry.get(wait.endpoint_id)
        if endpoint is not None:
            self._registry.record_dispatch_success(endpoint)
        if not self._tasks.complete(claim, result_key=key, endpoint_id=wait.endpoint_id):
            return CallbackAnswer.STALE
        return CallbackAnswer.DONE

    def _canceled(self, claim: Claim) -> CallbackAnswer:
        if self._tasks.cancel_running(claim):
            return CallbackAnswer.CANCELED
        return CallbackAnswer.STALE

    def _failed(
        self, claim: Claim, wait: CallbackWait, webhook: CogWebhook, *, error: str | None = None
    ) -> CallbackAnswer:
        self._free_slots(wait, call_seconds=None)
        why = error or webhook.error or f"the server ended the prediction {webhook.status.value}"
        reason = f"attempt {claim.task.attempt} on {wait.endpoint_id}: {why[:500]}"
        self._registry.record_dispatch_failure(
            wait.endpoint_id,
            threshold=self._policy.circuit_failure_threshold,
            now=self._clock(),
        )
        if not self._tasks.fail(claim, error=reason):
            return CallbackAnswer.STALE
        return CallbackAnswer.FAILED

    def _endpoint_of(self, wait: CallbackWait) -> Endpoint:
        """The endpoint row (its id alone, for messages, if it was deleted meanwhile)."""
        found = self._registry.get(wait.endpoint_id)
        if found is not None:
            return found
        return Endpoint(endpoint_id=wait.endpoint_id, url="http://gone", kind=TaskKind.IMAGE)

    def _free_slots(self, wait: CallbackWait, *, call_seconds: float | None) -> None:
        for held in wait.leases:
            lease = SlotLease(
                endpoint_id=held.endpoint_id,
                slot=held.slot,
                lease_id=held.lease_id,
                task_id="",
                lease_until=0.0,
                call_seconds_ewma=held.call_seconds_ewma,
            )
            try:
                # Only the slot's EWMA learns the call's time (a lane seat has none).
                self._registry.release_slot(
                    lease, call_seconds=call_seconds if held is wait.leases[0] else None
                )
            except StoreError:
                # It lapses at the lease's end; the task's end matters more than the slot.
                logger.warning("slot release failed; its lease lapses", exc_info=True)
