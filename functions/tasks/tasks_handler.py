"""Task reads and owner actions: status, list, cancel, image redirect. Owner-only, else 404."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Path, Query
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.api.prefer_wait import WaitSeats, requested_wait, wait_if_worthwhile
from gpuqueue.api.resolver import PUSH_URL_HEADER, build_resolver, current_caller, documented
from gpuqueue.errors import TaskStateConflict
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.intake.queue_position import QueuePositions, estimate
from gpuqueue.log_context import correlate_task
from gpuqueue.models import Task, TaskStatus, TaskView, utc_now
from gpuqueue.notify import webhooks
from gpuqueue.notify.redelivery import Redeliveries
from gpuqueue.notify.webhooks import SqsDeliverySender
from gpuqueue.settings import TasksSettings
from gpuqueue.store.image_store import ImageStore, check_image_kept
from gpuqueue.store.task_store import TaskStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()
app = build_resolver()

TaskId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]


@dataclass(frozen=True)
class Deps:
    tasks: TaskStore
    images: ImageStore
    url_ttl_seconds: int
    image_kept: timedelta
    redeliveries: Redeliveries | None
    positions: QueuePositions | None
    fleet: EndpointRegistry | None
    health_max_age_seconds: float
    push_url: str | None
    wait_seats: WaitSeats | None


@cache
def deps() -> Deps:
    settings = TasksSettings()
    return Deps(
        tasks=TaskStore(aws_clients.dynamodb().Table(settings.tasks_table)),
        images=ImageStore(aws_clients.s3(), settings.task_files_bucket),
        url_ttl_seconds=settings.image_url_ttl_seconds,
        image_kept=timedelta(days=settings.image_retention_days),
        redeliveries=(
            Redeliveries.on_table(
                SqsDeliverySender(aws_clients.sqs(), settings.webhook_queue_url),
                aws_clients.dynamodb().Table(settings.limits_table),
                per_user_per_hour=settings.redeliveries_per_user_per_hour,
            )
            if settings.webhook_queue_url and settings.limits_table
            else None
        ),
        positions=(
            QueuePositions(aws_clients.dynamodb().Table(settings.limits_table))
            if settings.limits_table
            else None
        ),
        fleet=(
            EndpointRegistry(aws_clients.dynamodb().Table(settings.endpoints_table))
            if settings.endpoints_table
            else None
        ),
        health_max_age_seconds=3.0 * settings.health_check_period_seconds,
        push_url=settings.websocket_url,
        wait_seats=(
            WaitSeats(
                aws_clients.dynamodb().Table(settings.limits_table),
                seats=settings.prefer_wait_seats,
            )
            if settings.limits_table
            else None
        ),
    )


def view(task: Task) -> TaskView:
    """The task as the API shows it; a QUEUED task with its position and ETA (estimates)."""
    shown = TaskView.of(task)
    d = deps()
    if d.positions is None or task.status is not TaskStatus.QUEUED:
        return shown
    lane = d.positions.lane(task.priority)
    position = d.positions.position(task, lane)
    if position is None:
        return shown
    eta = None
    if d.fleet is not None:
        eta = estimate(
            position,
            d.fleet.fleet(task.kind),
            now=time.time(),
            max_age_seconds=d.health_max_age_seconds,
            gap_seconds=lane.gap_seconds,
        ).eta_seconds
    return shown.model_copy(update={"queue_position": position, "eta_seconds": eta})


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
    page = deps().tasks.list_for_owner(owner, limit=limit, cursor=cursor)
    body = "[" + ",".join(TaskView.of(t).model_dump_json() for t in page.tasks) + "]"
    return _json(body, {"X-Next-Cursor": page.next_cursor} if page.next_cursor else None)


def _status(task_id: str, owner: str) -> Response[str]:
    """The task; with `Prefer: wait=N`, once it is final or N seconds have passed."""
    wait = requested_wait(app.current_event.headers.get("prefer"))
    push_url = deps().push_url
    headers = {PUSH_URL_HEADER: push_url} if push_url else {}
    if wait is None:
        return _json(view(deps().tasks.get_for_owner(task_id, owner)).model_dump_json(), headers)
    waited = wait_if_worthwhile(
        lambda: deps().tasks.get_for_owner(task_id, owner),
        requested=wait,
        remaining_seconds=app.lambda_context.get_remaining_time_in_millis() / 1000,
        seats=deps().wait_seats,
    )
    if waited.applied:
        headers["Preference-Applied"] = f"wait={wait}"
    return _json(view(waited.task).model_dump_json(), headers)


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
    return _json(json.dumps(webhooks.as_log(deps().tasks.get_for_owner(task_id, owner))))


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
    owner = current_caller(app).sub
    task = deps().tasks.get_for_owner(task_id, owner)
    redeliveries = deps().redeliveries
    if redeliveries is None:
        raise TaskStateConflict(f"task {task_id} has no webhook_url", field="task_id")
    queued = redeliveries.request(task)
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
    responses=documented(HTTPStatus.OK, "Canceled: the task as it now stands.", TaskView),
)
def cancel_task(task_id: TaskId) -> Response[str]:
    owner = current_caller(app).sub
    task = deps().tasks.cancel(task_id, owner)
    metrics.add_metric(name="TasksCanceled", unit=MetricUnit.Count, value=1)
    logger.info("task canceled", extra={"task_id": task_id})
    return _json(TaskView.of(task).model_dump_json())


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
    owner = current_caller(app).sub
    task = deps().tasks.get_for_owner(task_id, owner)
    if task.status is not TaskStatus.DONE or not task.result_key:
        raise TaskStateConflict(
            f"task {task_id} is {task.status.value}; no image yet", field="task_id"
        )
    check_image_kept(datetime.fromisoformat(task.updated_at), kept=deps().image_kept, now=utc_now())
    url = deps().images.presigned_get(task.result_key, expires_in_seconds=deps().url_ttl_seconds)
    return Response(
        status_code=HTTPStatus.FOUND.value,
        headers={"Location": url, "Cache-Control": "no-store"},
        content_type=content_types.APPLICATION_JSON,
        body='{"url": "' + url + '"}',
    )


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True
)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    task_id = (event.get("pathParameters") or {}).get("task_id")
    if isinstance(task_id, str) and task_id:
        correlate_task(logger, task_id)
    return app.resolve(event, context)
