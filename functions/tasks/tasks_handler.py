"""Task reads and owner actions: status, list, cancel, image redirect. Owner-only, else 404."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Path, Query
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.api.owner_tasks import ImageLinks, OwnerTasks
from gpuqueue.api.prefer_wait import WaitSeats
from gpuqueue.api.resolver import PUSH_URL_HEADER, build_resolver, current_caller, documented
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.intake.queue_position import QueuePositions
from gpuqueue.models import TaskStatus, TaskView
from gpuqueue.notify.redelivery import Redeliveries
from gpuqueue.notify.webhook_messages import SqsDeliverySender
from gpuqueue.observability import Observability, correlate_task
from gpuqueue.settings import TasksSettings
from gpuqueue.store.image_store import ImageStore
from gpuqueue.store.task_store import TaskStore

observed = Observability(
    correlation_id_path=correlation_paths.API_GATEWAY_HTTP, publishes_metrics=True
)
logger, metrics = observed.logger, observed.metrics
app = build_resolver()

TaskId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]


@dataclass(frozen=True)
class Deps:
    tasks: OwnerTasks
    push_url: str | None


@cache
def deps() -> Deps:
    settings = TasksSettings()
    limits = aws_clients.dynamodb().Table(settings.limits_table) if settings.limits_table else None
    return Deps(
        tasks=OwnerTasks(
            TaskStore(aws_clients.dynamodb().Table(settings.tasks_table)),
            images=ImageLinks(
                store=ImageStore(aws_clients.s3(), settings.task_files_bucket),
                url_ttl_seconds=settings.image_url_ttl_seconds,
                kept=timedelta(days=settings.image_retention_days),
            ),
            redeliveries=(
                Redeliveries.on_table(
                    SqsDeliverySender(aws_clients.sqs(), settings.webhook_queue_url),
                    limits,
                    per_user_per_hour=settings.redeliveries_per_user_per_hour,
                )
                if settings.webhook_queue_url and limits is not None
                else None
            ),
            positions=QueuePositions(limits) if limits is not None else None,
            fleet=(
                EndpointRegistry(aws_clients.dynamodb().Table(settings.endpoints_table))
                if settings.endpoints_table
                else None
            ),
            health_max_age_seconds=3.0 * settings.health_check_period_seconds,
            wait_seats=(
                WaitSeats(limits, seats=settings.prefer_wait_seats) if limits is not None else None
            ),
        ),
        push_url=settings.websocket_url,
    )


def _json(body: str, headers: dict[str, str] | None = None) -> Response[str]:
    return Response(HTTPStatus.OK.value, content_types.APPLICATION_JSON, body, headers)


@app.get(
    "/api/v1/tasks",
    responses=documented(
        HTTPStatus.OK,
        "The caller's tasks newest first (`X-Next-Cursor` for the next page); with "
        "`?task_id=`, that one task.",
        list[TaskView] | TaskView,
    ),
)
def get_or_list_tasks(
    task_id: Annotated[
        str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
) -> Response[str]:
    """`?task_id=ID` is the seed's status call; without it, the caller's tasks newest first."""
    owner = current_caller(app).sub
    if task_id is not None:
        return _status(task_id, owner)
    page = deps().tasks.page(owner, limit=limit, cursor=cursor)
    body = "[" + ",".join(view.model_dump_json() for view in page.views) + "]"
    return _json(body, {"X-Next-Cursor": page.next_cursor} if page.next_cursor else None)


def _status(task_id: str, owner: str) -> Response[str]:
    """The task; with `Prefer: wait=N`, once it is final or N seconds have passed."""
    answer = deps().tasks.status(
        task_id,
        owner,
        prefer=app.current_event.headers.get("prefer"),
        remaining_seconds=lambda: app.lambda_context.get_remaining_time_in_millis() / 1000,
    )
    push_url = deps().push_url
    headers = {PUSH_URL_HEADER: push_url} if push_url else {}
    return _json(answer.view.model_dump_json(), {**headers, **answer.headers})


@app.get(
    "/api/v1/tasks/<task_id>",
    responses=documented(HTTPStatus.OK, "The task (404 if it is not the caller's).", TaskView),
)
def get_task(task_id: TaskId) -> Response[str]:
    return _status(task_id, current_caller(app).sub)


@app.get("/api/v1/tasks/<task_id>/deliveries")
def get_deliveries(task_id: TaskId) -> Response[str]:
    """The task's webhook delivery log: every attempt, oldest first."""
    owner = current_caller(app).sub
    return _json(json.dumps(deps().tasks.deliveries(task_id, owner)))


@app.post(
    "/api/v1/tasks/<task_id>/deliveries/redeliver",
    responses=documented(
        HTTPStatus.ACCEPTED,
        "A new delivery of the final event is queued, or (`coalesced`) the one still being "
        "retried is named; 429 + Retry-After past the task's or the caller's redelivery limit.",
    ),
)
def redeliver(task_id: TaskId) -> Response[str]:
    """Send the task's final event to its webhook again (a new delivery id)."""
    queued = deps().tasks.redeliver(task_id, current_caller(app).sub)
    logger.info("webhook redelivery", extra={"task_id": task_id, "coalesced": queued.coalesced})
    body = {
        "task_id": task_id,
        "delivery_id": queued.delivery_id,
        "event": queued.event,
        "coalesced": queued.coalesced,
    }
    return Response(HTTPStatus.ACCEPTED.value, content_types.APPLICATION_JSON, json.dumps(body))


@app.delete(
    "/api/v1/tasks/<task_id>",
    responses=documented(HTTPStatus.OK, "Canceled: the task as it now stands.", TaskView)
    | documented(
        HTTPStatus.ACCEPTED,
        "Running: the cancel is requested (`cancel_requested`); its GPU is told to stop and the "
        "task ends CANCELED within seconds, with no result. A task running on an endpoint whose "
        "protocol cannot stop a started job (openai) is a 409 instead.",
        TaskView,
    ),
)
def cancel_task(task_id: TaskId) -> Response[str]:
    view = deps().tasks.cancel(task_id, current_caller(app).sub)
    if view.status is TaskStatus.RUNNING:
        logger.info("cancel requested", extra={"task_id": task_id})
        return Response(
            HTTPStatus.ACCEPTED.value, content_types.APPLICATION_JSON, view.model_dump_json()
        )
    metrics.add_metric(name="TasksCanceled", unit=MetricUnit.Count, value=1)
    logger.info("task canceled", extra={"task_id": task_id})
    return _json(view.model_dump_json())


@app.get(
    "/api/images/<task_id>",
    responses=documented(
        HTTPStatus.FOUND, "A short-lived presigned URL of the PNG in `Location` (and `url`)."
    )
    | documented(
        HTTPStatus.GONE, "The image was deleted `ImageRetentionDays` after its task ended."
    ),
)
def get_image(task_id: TaskId) -> Response[str]:
    url = deps().tasks.image_url(task_id, current_caller(app).sub)
    return Response(
        status_code=HTTPStatus.FOUND.value,
        headers={"Location": url, "Cache-Control": "no-store"},
        content_type=content_types.APPLICATION_JSON,
        body='{"url": "' + url + '"}',
    )


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    task_id = (event.get("pathParameters") or {}).get("task_id")
    if isinstance(task_id, str) and task_id:
        correlate_task(logger, task_id)
    return app.resolve(event, context)
