"""POST /register, /register/confirm and /login: username + password -> Bearer token (Cognito
underneath; where the stack verifies sign-ups by e-mail, /register answers 202 and the code
goes to /register/confirm)."""

from __future__ import annotations

from functools import cache
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Body
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.api.resolver import build_resolver, documented
from gpuqueue.auth.accounts import Accounts
from gpuqueue.auth.sign_in_throttle import BucketSpec, SignInThrottle, client_address
from gpuqueue.auth.user_directory import UserDirectory
from gpuqueue.models import (
    Credentials,
    Registration,
    SignUpConfirmation,
    SignUpPending,
    TokenResponse,
)
from gpuqueue.observability import Observability
from gpuqueue.settings import AuthSettings

observed = Observability(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)
logger = observed.logger
app = build_resolver()


@cache
def auth_settings() -> AuthSettings:
    return AuthSettings()


@cache
def accounts() -> Accounts:
    settings = auth_settings()
    return Accounts(
        UserDirectory(
            aws_clients.cognito(),
            user_pool_id=settings.user_pool_id,
            client_id=settings.user_pool_client_id,
            password_policy=settings.password_policy,
            verification=settings.sign_up_verification,
        ),
        SignInThrottle(
            aws_clients.dynamodb().Table(settings.limits_table),
            login_per_username=BucketSpec(
                settings.login_username_failure_burst,
                settings.login_username_failure_refill_seconds,
            ),
            login_per_source=BucketSpec(
                settings.login_source_failure_burst, settings.login_source_failure_refill_seconds
            ),
            register_per_source=BucketSpec(
                settings.register_source_burst, settings.register_source_refill_seconds
            ),
        ),
    )


def caller_address() -> str:
    """The address the per-source limits count (the client's, also behind CloudFront)."""
    event = app.current_event
    secret = auth_settings().origin_verify_secret
    return client_address(
        event.request_context.http.source_ip,
        event.headers,
        origin_secret=None if secret is None else secret.get_secret_value(),
    )


@app.post(
    "/register",
    responses={
        **documented(HTTPStatus.CREATED, "Registered and signed in.", TokenResponse),
        **documented(
            HTTPStatus.ACCEPTED,
            "SignUpVerification=email: a code was e-mailed if the name was free (the same "
            "answer either way); confirm it at POST /register/confirm.",
            SignUpPending,
        ),
    },
)
def register(registration: Annotated[Registration, Body()]) -> Response[str]:
    result = accounts().register(registration, source=caller_address())
    status = HTTPStatus.ACCEPTED if isinstance(result, SignUpPending) else HTTPStatus.CREATED
    if status is HTTPStatus.CREATED:
        logger.info("user registered", extra={"username": registration.username})
    return Response(
        status_code=status.value,
        content_type=content_types.APPLICATION_JSON,
        body=result.model_dump_json(),
    )


@app.post("/register/confirm")
def confirm_registration(confirmation: Annotated[SignUpConfirmation, Body()]) -> TokenResponse:
    return accounts().confirm(confirmation)


@app.post("/login")
def login(credentials: Annotated[Credentials, Body()]) -> TokenResponse:
    return accounts().login(credentials, source=caller_address())


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
