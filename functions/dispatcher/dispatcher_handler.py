"""SQS-triggered worker: a message, a GPU slot, and the next messages on that slot while a
whole call fits in the invocation's time; up to CallsPerWorker such calls at once in one
invocation (QueueWorker.serve); partial batch responses."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.batch.types import PartialItemFailureResponse
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.dispatch.cog_callbacks import CallbackStarter
from gpuqueue.dispatch.dispatcher import DispatchPolicy, TaskDispatcher
from gpuqueue.dispatch.jobs import ImageJob, SpeechJob
from gpuqueue.dispatch.metrics import DispatchMetrics
from gpuqueue.dispatch.queue_worker import QueueWorker
from gpuqueue.fleet.balancer import Balancer
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.gpu.cog_webhooks import CogPredictions
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.gpu.image_client import image_generators
from gpuqueue.gpu.memory_budget import MemoryBudget
from gpuqueue.gpu.speech_client import OpenAITranscriptionClient
from gpuqueue.models import QueueMessage, TaskKind
from gpuqueue.observability import Observability, correlate_task
from gpuqueue.settings import DispatcherSettings
from gpuqueue.speech.audio_store import AudioStore
from gpuqueue.store.image_store import ImageStore
from gpuqueue.store.task_queue import TaskQueue
from gpuqueue.store.task_store import TaskStore

observed = Observability(publishes_metrics=True)
logger, metrics = observed.logger, observed.metrics
# A batch where every record failed is still a normal, partial response: those records come
# back after their delay; raising would count as a function error and skew the alarms.
processor = BatchProcessor(event_type=EventType.SQS, raise_on_entire_batch_failure=False)


@dataclass(frozen=True)
class Deps:
    worker: QueueWorker


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
    tasks = TaskStore(dynamodb.Table(settings.tasks_table))
    registry = EndpointRegistry(dynamodb.Table(settings.endpoints_table))
    dispatcher = TaskDispatcher(
        tasks=tasks,
        registry=registry,
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
        callbacks=CallbackStarter(
            CogPredictions(credentials=credentials),
            tasks,
            registry,
            base_url=settings.gpu_callback_base_url,
        ),
    )
    return Deps(
        worker=QueueWorker(
            dispatcher,
            queue,
            calls_per_worker=settings.calls_per_worker,
            metrics=metrics,
            logger=logger,
        )
    )


def record_handler(record: SQSRecord, lambda_context: LambdaContext) -> None:
    message = QueueMessage.model_validate_json(record.body)
    correlate_task(logger, message.task_id)
    deps().worker.serve(
        message,
        record.receipt_handle,
        remaining_seconds=lambda: lambda_context.get_remaining_time_in_millis() / 1000,
    )


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> PartialItemFailureResponse:
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
