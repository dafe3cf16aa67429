"""POST /api/v1/image/async: validate, enqueue, answer 202 with the task id at once."""

from __future__ import annotations

import json
from functools import cache
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Body
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.api.prefer_wait import WaitSeats, requested_wait, wait_if_worthwhile
from gpuqueue.api.resolver import PUSH_URL_HEADER, build_resolver, current_caller, documented
from gpuqueue.errors import ActiveTaskLimit, RateLimited
from gpuqueue.intake.idempotent_submit import IDEMPOTENCY_KEY_HEADER, IdempotentSubmitter
from gpuqueue.intake.submission import SubmissionService
from gpuqueue.models import ImageRequest, SubmitResponse, TaskView
from gpuqueue.observability import Observability, correlate_task
from gpuqueue.settings import SubmitSettings

observed = Observability(
    correlation_id_path=correlation_paths.API_GATEWAY_HTTP, publishes_metrics=True
)
logger, metrics = observed.logger, observed.metrics
app = build_resolver()


@cache
def submissions() -> SubmissionService:
    return SubmissionService.from_settings(SubmitSettings())


def _submit(owner: str, body: dict[str, Any], groups: frozenset[str]) -> dict[str, Any]:
    """One image task; its answer as JSON-ready data (what an Idempotency-Key replays)."""
    try:
        task = submissions().submit_image(owner, ImageRequest.model_validate(body), groups=groups)
    except ActiveTaskLimit:
        metrics.add_metric(name="ActiveTaskLimitHits", unit=MetricUnit.Count, value=1)
        raise
    except RateLimited:
        metrics.add_metric(name="RateLimitHits", unit=MetricUnit.Count, value=1)
        raise
    correlate_task(logger, task.task_id)
    logger.info("task queued")
    metrics.add_metric(name="TasksSubmitted", unit=MetricUnit.Count, value=1)
    answer = SubmitResponse(
        task_id=task.task_id, status=task.status, message="task submitted successfully"
    )
    return answer.model_dump(mode="json")


@cache
def wait_seats() -> WaitSeats:
    settings = SubmitSettings()
    table = aws_clients.dynamodb().Table(settings.limits_table)
    return WaitSeats(table, seats=settings.prefer_wait_seats)


@cache
def idempotent() -> IdempotentSubmitter | None:
    settings = SubmitSettings()
    if not settings.limits_table:
        return None
    return IdempotentSubmitter(
        table_name=settings.limits_table,
        expires_after_seconds=settings.idempotency_ttl_seconds,
        submit=_submit,
        client=aws_clients.dynamodb_client(),
    )


@app.post(
    "/api/v1/image/async",
    responses={
        **documented(
            HTTPStatus.ACCEPTED,
            "Queued: poll `Location` (or use the webhook or the push channel).",
            SubmitResponse,
        ),
        **documented(
            HTTPStatus.OK, "With `Prefer: wait=N`: the task, finished within N seconds.", TaskView
        ),
    },
)
def submit_image(request: Annotated[ImageRequest, Body()]) -> Response[str]:
    caller = current_caller(app)
    headers = app.current_event.headers
    key = headers.get(IDEMPOTENCY_KEY_HEADER)
    submitter = idempotent()
    body = request.model_dump(mode="json", exclude_none=True)
    if key is not None and submitter is not None:
        answer = submitter.submit(caller.sub, key, body, caller.groups)
    else:
        answer = _submit(caller.sub, body, caller.groups)
    task_id = str(answer["task_id"])
    response_headers = {
        "Location": f"/api/v1/tasks/{task_id}",
        **submissions().rate_headers(caller.sub),
    }
    push_url = SubmitSettings().websocket_url
    if push_url:
        response_headers[PUSH_URL_HEADER] = push_url
    wait = requested_wait(headers.get("prefer"))
    if wait is not None:
        waited = wait_if_worthwhile(
            lambda: submissions().tasks.get_for_owner(task_id, caller.sub),
            requested=wait,
            remaining_seconds=app.lambda_context.get_remaining_time_in_millis() / 1000,
            seats=wait_seats(),
        )
        if waited.applied:
            response_headers["Preference-Applied"] = f"wait={wait}"
        task = waited.task
        if task.status.is_terminal:
            # Finished within the wait: the task itself, as a status call would answer.
            return Response(
                status_code=HTTPStatus.OK.value,
                content_type=content_types.APPLICATION_JSON,
                body=TaskView.of(task).model_dump_json(),
                headers=response_headers,
            )
    return Response(
        status_code=HTTPStatus.ACCEPTED.value,
        content_type=content_types.APPLICATION_JSON,
        body=json.dumps(answer),
        headers=response_headers,
    )


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    submitter = idempotent()
    if submitter is not None:
        submitter.register_lambda_context(context)
    return app.resolve(event, context)
