"""WebSocket `$disconnect`: the connection is forgotten (best effort on API Gateway's side
too: a connection it never reports gone is dropped at the first push that gets 410)."""

from __future__ import annotations

from functools import cache
from http import HTTPStatus
from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.notify.push import ConnectionStore, DisconnectEvent
from gpuqueue.observability import Observability
from gpuqueue.settings import DisconnectSettings

observed = Observability(correlation_id_path=correlation_paths.API_GATEWAY_REST)
logger = observed.logger


@cache
def connections() -> ConnectionStore:
    return ConnectionStore(aws_clients.dynamodb().Table(DisconnectSettings().connections_table))


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = DisconnectEvent.model_validate(event)
    connection = request.request_context
    connections().delete(connection.connection_id)
    logger.info(
        "disconnected",
        extra={
            "connection_id": connection.connection_id,
            "code": connection.disconnect_status_code,
        },
    )
    return {"statusCode": HTTPStatus.OK.value}
