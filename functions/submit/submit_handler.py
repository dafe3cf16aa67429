"""POST /api/v1/image/async: validate, enqueue, answer 202 with the task id at once."""

from __future__ import annotations

import json
from functools import cache
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Body
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue.api.resolver import PUSH_URL_HEADER, build_resolver, current_caller, documented
from gpuqueue.intake.idempotent_submit import IDEMPOTENCY_KEY_HEADER, IdempotentSubmitter
from gpuqueue.intake.image_intake import ImageIntake
from gpuqueue.models import ImageRequest, SubmitResponse, TaskView
from gpuqueue.observability import Observability
from gpuqueue.settings import SubmitSettings

observed = Observability(
    correlation_id_path=correlation_paths.API_GATEWAY_HTTP, publishes_metrics=True
)
logger, metrics = observed.logger, observed.metrics
app = build_resolver()


@cache
def intake() -> ImageIntake:
    return ImageIntake.from_settings(SubmitSettings(), metrics=metrics, logger=logger)


@cache
def idempotent() -> IdempotentSubmitter | None:
    return intake().idempotent


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
    accepted = intake().accept(
        caller.sub,
        request,
        groups=caller.groups,
        idempotency_key=headers.get(IDEMPOTENCY_KEY_HEADER),
        prefer=headers.get("prefer"),
        remaining_seconds=lambda: app.lambda_context.get_remaining_time_in_millis() / 1000,
    )
    response_headers = {
        "Location": f"/api/v1/tasks/{accepted.task_id}",
        **accepted.rate_headers,
    }
    push_url = SubmitSettings().websocket_url
    if push_url:
        response_headers[PUSH_URL_HEADER] = push_url
    response_headers.update(accepted.wait_headers)
    if accepted.finished is not None:
        return Response(
            status_code=HTTPStatus.OK.value,
            content_type=content_types.APPLICATION_JSON,
            body=accepted.finished.model_dump_json(),
            headers=response_headers,
        )
    return Response(
        status_code=HTTPStatus.ACCEPTED.value,
        content_type=content_types.APPLICATION_JSON,
        body=json.dumps(accepted.answer),
        headers=response_headers,
    )


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    submitter = idempotent()
    if submitter is not None:
        submitter.register_lambda_context(context)
    return app.resolve(event, context)
