"""Cog's webhooks for callback-mode tasks: progress, the image, the end, and the slot freed.

Not behind the Cognito authorizer (a GPU server cannot sign in): the per-attempt token in
the URL is the authorisation (gpuqueue.dispatch.cog_callbacks). 404 for a wrong token or
an unknown task alike; 503 when a table or the bucket failed, so Cog sends it again."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Body, Path, Query
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.api.resolver import build_resolver, documented, error_response
from gpuqueue.dispatch.cog_callbacks import CallbackPolicy, CogCallbacks
from gpuqueue.errors import StoreError
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.gpu.cog_webhooks import CogPredictions, CogWebhook
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.observability import Observability, correlate_task
from gpuqueue.settings import GpuCallbackSettings
from gpuqueue.store.image_store import ImageStore
from gpuqueue.store.task_store import TaskStore

observed = Observability(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
logger = observed.logger
app = build_resolver()

TaskId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
# Cog retries a webhook that failed on our side; a moment is enough for a throttled table.
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class Deps:
    callbacks: CogCallbacks


@cache
def deps() -> Deps:
    settings = GpuCallbackSettings()
    dynamodb = aws_clients.dynamodb()
    return Deps(
        callbacks=CogCallbacks(
            TaskStore(dynamodb.Table(settings.tasks_table)),
            EndpointRegistry(dynamodb.Table(settings.endpoints_table)),
            ImageStore(aws_clients.s3(), settings.task_files_bucket),
            CogPredictions(
                credentials=GpuCredentials(
                    settings.credential_scope,
                    secrets=aws_clients.secretsmanager,
                    parameters=aws_clients.ssm,
                    ttl_seconds=settings.gpu_credential_ttl_seconds,
                )
            ),
            policy=CallbackPolicy(circuit_failure_threshold=settings.circuit_failure_threshold),
        )
    )


@app.exception_handler(StoreError)  # type: ignore[untyped-decorator]
def _store_failed(exc: StoreError) -> Response[str]:
    logger.warning("store failed; Cog sends the webhook again", extra={"error": str(exc)})
    return error_response(
        HTTPStatus.SERVICE_UNAVAILABLE,
        "try again",
        "SERVICE_UNAVAILABLE",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


@app.post(
    "/api/v1/callbacks/cog/<task_id>",
    responses=documented(
        HTTPStatus.OK,
        "Taken (`result` says what it did; a webhook for a task that moved on changes "
        "nothing). For Cog servers in callback mode, with the token the dispatcher gave "
        "them; 404 for any other.",
    ),
)
def cog_webhook(
    task_id: TaskId,
    webhook: Annotated[CogWebhook, Body()],
    token: Annotated[str | None, Query(max_length=256)] = None,
) -> Response[str]:
    answer = deps().callbacks.receive(task_id, token, webhook)
    body = json.dumps({"task_id": task_id, "result": answer.value})
    return Response(HTTPStatus.OK.value, content_types.APPLICATION_JSON, body)


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    task_id = (event.get("pathParameters") or {}).get("task_id")
    if isinstance(task_id, str) and task_id:
        correlate_task(logger, task_id)
    return app.resolve(event, context)
