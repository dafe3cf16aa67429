"""SQS-triggered worker: a message, a GPU slot, and the next messages on that slot while a
whole call fits in the invocation's time; up to CallsPerWorker such calls at once in one
invocation (a WorkerGroup); partial batch responses."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import ValidationError

from gpuqueue import aws_clients
from gpuqueue.dispatch.dispatcher import (
    SHARED_RECEIVE_DRY_SECONDS,
    SHARED_RECEIVE_HOLD_SECONDS,
    SHARED_RECEIVE_WINDOW_SECONDS,
    DispatchOutcome,
    DispatchPolicy,
    Pulled,
    TaskDispatcher,
)
from gpuqueue.dispatch.jobs import ImageJob, SpeechJob
from gpuqueue.dispatch.metrics import DispatchMetrics
from gpuqueue.dispatch.shared_receive import SharedReceive
from gpuqueue.dispatch.worker_group import WorkerGroup
from gpuqueue.errors import RetryLater
from gpuqueue.fleet.balancer import Balancer
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.gpu.image_client import image_generators
from gpuqueue.gpu.memory_budget import MemoryBudget
from gpuqueue.gpu.speech_client import OpenAITranscriptionClient
from gpuqueue.log_context import correlate_task, correlate_thread
from gpuqueue.models import QueueMessage, TaskKind
from gpuqueue.settings import DispatcherSettings
from gpuqueue.speech.audio_store import AudioStore
from gpuqueue.store.image_store import ImageStore
from gpuqueue.store.task_queue import DELETE_BATCH, TaskQueue
from gpuqueue.store.task_store import TaskStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()
# A batch where every record failed is still a normal, partial response: those records come
# back after their delay; raising would count as a function error and skew the alarms.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@dataclass(frozen=True)
class Deps:
    dispatcher: TaskDispatcher
    queue: TaskQueue
    calls_per_worker: int


@cache
def deps() -> Deps:
    settings = DispatcherSettings()
    dynamodb = aws_clients.dynamodb()
    s3 = aws_clients.s3()
    policy = DispatchPolicy(
        task_timeout_seconds=settings.task_timeout_seconds,
        max_attempts=settings.max_attempts,
        health_max_age_seconds=settings.health_max_age_seconds,
        retry_base_delay_seconds=settings.retry_base_delay_seconds,
        retry_max_delay_seconds=settings.retry_max_delay_seconds,
        no_endpoint_delay_seconds=settings.no_endpoint_delay_seconds,
        circuit_failure_threshold=settings.circuit_failure_threshold,
        slot_wait_seconds=settings.slot_wait_seconds,
        slot_poll_seconds=settings.slot_poll_seconds,
        no_slot_delay_seconds=settings.no_slot_delay_seconds,
        priority_lane_slots=settings.priority_lane_slots,
        fleet_view_max_age_seconds=settings.fleet_view_max_age_seconds,
    )
    queue = TaskQueue(aws_clients.sqs(), settings.task_queue_url)
    credentials = GpuCredentials(
        settings.credential_scope,
        secrets=aws_clients.secretsmanager,
        parameters=aws_clients.ssm,
        ttl_seconds=settings.gpu_credential_ttl_seconds,
    )
    # Measured once the runtime, the SDK and the clients are up: what is left is the answers'.
    memory_mb = settings.aws_lambda_function_memory_size
    memory = MemoryBudget.of_function(memory_mb) if memory_mb else MemoryBudget(None)
    logger.info("memory for GPU answers", extra={"memory_budget_bytes": memory.total})
    return Deps(
        dispatcher=TaskDispatcher(
            tasks=TaskStore(dynamodb.Table(settings.tasks_table)),
            registry=EndpointRegistry(dynamodb.Table(settings.endpoints_table)),
            jobs={
                TaskKind.IMAGE: ImageJob(
                    image_generators(credentials=credentials),
                    ImageStore(s3, settings.task_files_bucket),
                    memory=memory,
                ),
                TaskKind.SPEECH: SpeechJob(
                    OpenAITranscriptionClient(credentials=credentials),
                    AudioStore(s3, settings.task_files_bucket),
                    memory=memory,
                ),
            },
            policy=policy,
            balancer=Balancer(settings.dispatch_strategy),
            backlog=lambda: queue.depth().queued,
            observer=DispatchMetrics(metrics),
        ),
        queue=queue,
        calls_per_worker=settings.calls_per_worker,
    )


class QueuePuller:
    """The dispatcher's next tasks from this function's own queue: a worker still holding a
    GPU slot receives its next message itself. Each is settled as the event source mapping
    settles a record: deleted once its task's state is durable (in batches, at the end),
    sent back later on RetryLater, left to come back on any other error."""

    def __init__(self, queue: TaskQueue, *, on_pulled: Callable[[], None] | None = None) -> None:
        self._queue = queue
        self._shared: SharedReceive[Pulled] = SharedReceive(
            self._receive,
            lambda pulled: queue.release([p.receipt for p in pulled]),
            window_seconds=SHARED_RECEIVE_WINDOW_SECONDS,
            hold_seconds=SHARED_RECEIVE_HOLD_SECONDS,
            dry_seconds=SHARED_RECEIVE_DRY_SECONDS,
        )
        self._done: list[str] = []
        self._lock = threading.Lock()  # the group's workers settle side by side
        self._taken: set[str] = set()
        self.on_pulled = on_pulled

    def take(self, task_id: str) -> bool:
        with self._lock:
            if task_id in self._taken:
                return False
            self._taken.add(task_id)
            return True

    def give_back(self, task_id: str) -> None:
        with self._lock:
            self._taken.discard(task_id)

    def expect(self, worker: object, at: float | None) -> None:
        self._shared.expect(worker, at)

    def pull(self) -> Pulled | None:
        pulled = self.pull_many(1)
        return pulled[0] if pulled else None

    def pull_many(self, count: int) -> list[Pulled]:
        """Up to `count` messages: ones received for this invocation's workers due now, then
        one receive (SharedReceive)."""
        pulled = self._shared.pull(count)
        if pulled and self.on_pulled is not None:
            self.on_pulled()
        return pulled

    def _receive(self, count: int) -> list[Pulled]:
        pulled: list[Pulled] = []
        for body, receipt in self._queue.receive(count):
            try:
                message = QueueMessage.model_validate_json(body)
            except ValidationError:
                # Left alone: it comes back until its receive count sends it to the DLQ.
                logger.warning("unreadable message left for the dead-letter queue")
                continue
            pulled.append(Pulled(message=message, receipt=receipt))
        return pulled

    def settle(self, pulled: Pulled, result: DispatchOutcome | Exception) -> None:
        if isinstance(result, DispatchOutcome):
            count(result)
            self._delete_later(pulled.receipt)
        elif isinstance(result, RetryLater):
            if return_later(result, pulled.message, pulled.receipt):
                self._delete_later(pulled.receipt)
        else:
            logger.error(
                "pulled task failed; its message comes back",
                extra={"task_id": pulled.message.task_id},
                exc_info=result,
            )

    def _delete_later(self, receipt: str) -> None:
        with self._lock:
            self._done.append(receipt)
            full = len(self._done) >= DELETE_BATCH
        if full:
            self.flush()

    def flush(self) -> None:
        """Delete the messages whose tasks are done (a batch at a time, and at the end)."""
        with self._lock:
            done, self._done = self._done, []
        self._queue.delete(done)

    def close(self) -> None:
        """The invocation ends: hand back what no worker took, delete what is done."""
        self._shared.close()
        self.flush()


def return_later(retry: RetryLater, message: QueueMessage, receipt: str) -> bool:
    """Have a message come back after the retry's delay; True if it is to be deleted (a
    fresh, delayed copy was sent in its place)."""
    log = {"reason": retry.reason, "delay_seconds": retry.delay_seconds}
    if retry.requeue:
        deps().queue.send(message, delay_seconds=retry.delay_seconds)
        logger.info("task requeued", extra=log)
        return True
    deps().queue.retry_after(receipt, retry.delay_seconds)
    metrics.add_metric(name="TaskRetries", unit=MetricUnit.Count, value=1)
    logger.info("message returned to the queue", extra=log)
    return False


def count(outcome: DispatchOutcome) -> None:
    if outcome is DispatchOutcome.DONE:
        metrics.add_metric(name="TasksSucceeded", unit=MetricUnit.Count, value=1)
    elif outcome is DispatchOutcome.FAILED:
        metrics.add_metric(name="TasksFailed", unit=MetricUnit.Count, value=1)
    elif outcome is DispatchOutcome.EXPIRED:
        metrics.add_metric(name="TasksExpired", unit=MetricUnit.Count, value=1)


def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> None:
    message = QueueMessage.model_validate_json(record.body)
    correlate_task(logger, message.task_id)
    puller = QueuePuller(deps().queue)
    dispatcher = deps().dispatcher

    def remaining_seconds() -> float:
        return lambda_context.get_remaining_time_in_millis() / 1000

    def work_on(pulled: Pulled) -> Callable[[], None]:
        def work() -> None:
            correlate_thread(logger, pulled.message.task_id)
            try:
                dispatcher.serve_pulled(
                    pulled, remaining_seconds=remaining_seconds, next_tasks=puller
                )
            finally:
                logger.thread_safe_clear_keys()

        return work

    def start_some(count: int) -> list[Callable[[], None]]:
        return [work_on(pulled) for pulled in puller.pull_many(count)]

    group = WorkerGroup(
        size=deps().calls_per_worker,
        start_some=start_some,
        free_slots=dispatcher.free_slots,
        remaining_seconds=remaining_seconds,
        min_seconds=dispatcher.seconds_for_a_call,
    )
    puller.on_pulled = group.backlog_seen
    try:
        with group:
            outcome = dispatcher.dispatch(
                message, remaining_seconds=remaining_seconds, next_tasks=puller
            )
    except RetryLater as retry:
        if return_later(retry, message, record.receipt_handle):
            return  # returning normally deletes this one
        raise
    finally:
        puller.close()
    count(outcome)


@logger.inject_lambda_context(clear_state=True)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
