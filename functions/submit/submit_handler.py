"""POST /api/v1/image/async: validate, enqueue, answer 202 with the task id at once."""

from __future__ import annotations

from datetime import timedelta
from functools import cache
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Body
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.api import build_resolver, current_caller
from gpuqueue.models import ImageRequest, SubmitResponse
from gpuqueue.rate_limiter import RateLimiter
from gpuqueue.settings import SubmitSettings
from gpuqueue.submission import SubmissionService
from gpuqueue.task_queue import TaskQueue
from gpuqueue.task_store import TaskStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()
app = build_resolver()


@cache
def submissions() -> SubmissionService:
    settings = SubmitSettings()
    return SubmissionService(
        tasks=TaskStore(
            aws_clients.dynamodb().Table(settings.tasks_table),
            retention=timedelta(days=settings.task_retention_days),
        ),
        queue=TaskQueue(aws_clients.sqs(), settings.task_queue_url),
        capacity=settings.queue_capacity,
        retry_after_seconds=settings.queue_full_retry_after_seconds,
        default_queue_ttl_seconds=settings.queue_ttl_seconds,
        limiter=(
            RateLimiter(
                aws_clients.dynamodb().Table(settings.limits_table),
                rate_per_second=settings.submit_rate_per_second,
                burst=settings.submit_burst,
            )
            if settings.limits_table
            else None
        ),
    )


@app.post("/api/v1/image/async")
def submit_image(request: Annotated[ImageRequest, Body()]) -> Response[str]:
    caller = current_caller(app)
    rate_headers = submissions().admit(caller.sub)
    task = submissions().submit_image(caller.sub, request)
    logger.append_keys(task_id=task.task_id)
    logger.info("task queued")
    metrics.add_metric(name="TasksSubmitted", unit=MetricUnit.Count, value=1)
    body = SubmitResponse(
        task_id=task.task_id, status=task.status, message="task submitted successfully"
    )
    return Response(
        status_code=HTTPStatus.ACCEPTED.value,
        content_type=content_types.APPLICATION_JSON,
        body=body.model_dump_json(),
        headers={"Location": f"/api/v1/tasks/{task.task_id}", **rate_headers},
    )


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
