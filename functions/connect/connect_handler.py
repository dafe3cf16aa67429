"""WebSocket `$connect`: the caller's Cognito access token (`?token=` or `Authorization:
Bearer`) is verified, then the connection is recorded under its user. Any answer but 2xx
refuses the handshake: a bad token gets 401 and no connection is made."""

from __future__ import annotations

import json
from functools import cache
from http import HTTPStatus
from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.auth.access_token import AccessTokenVerifier, InvalidToken
from gpuqueue.notify.push import ConnectEvent, ConnectionStore
from gpuqueue.notify.push_connections import PushConnections
from gpuqueue.observability import Observability
from gpuqueue.settings import ConnectSettings

observed = Observability(correlation_id_path=correlation_paths.API_GATEWAY_REST)
logger = observed.logger


@cache
def settings() -> ConnectSettings:
    return ConnectSettings()


@cache
def connections() -> PushConnections:
    config = settings()
    return PushConnections(
        AccessTokenVerifier.for_user_pool(
            issuer=config.token_issuer,
            client_id=config.user_pool_client_id,
            jwks_url=config.jwks_url,
        ),
        ConnectionStore(
            aws_clients.dynamodb().Table(config.connections_table),
            ttl_seconds=config.connection_ttl_seconds,
        ),
    )


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    request = ConnectEvent.model_validate(event)
    connection_id = request.request_context.connection_id
    try:
        claims = connections().open(request)
    except InvalidToken as error:
        logger.info("connection refused", extra={"reason": str(error)})
        return {
            "statusCode": HTTPStatus.UNAUTHORIZED.value,
            "body": json.dumps({"message": "Unauthorized"}),
        }
    logger.info("connected", extra={"connection_id": connection_id, "user_id": claims.sub})
    return {"statusCode": HTTPStatus.OK.value}
