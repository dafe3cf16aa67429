"""Idempotent submit (`Idempotency-Key`), on Powertools' idempotency utility.

The record's key is the caller + their key (keys are scoped per user); its payload hash is
the request body. Same key + same body within the expiry: the first answer again, no new
task, no second message. Same key + another body: 422. A replay that arrives while the first
is still running: 409 (retry in a second). Records live in the limits table, TTL'd.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

from aws_lambda_powertools.utilities.idempotency import (
    DynamoDBPersistenceLayer,
    IdempotencyConfig,
    idempotent_function,
)
from aws_lambda_powertools.utilities.idempotency.exceptions import (
    IdempotencyAlreadyInProgressError,
    IdempotencyValidationError,
)
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue.errors import IdempotencyConflict, InvalidInput, TaskStateConflict

IDEMPOTENCY_KEY_HEADER = "idempotency-key"
MAX_KEY_LENGTH = 255

# (user, body, the user's groups) -> the answer to replay. The groups are not part of the
# key or of the compared payload: they only authorise (e.g. the priority lane).
Submit = Callable[[str, dict[str, Any], frozenset[str]], dict[str, Any]]


def validate_key(key: str) -> str:
    key = key.strip()
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidInput(
            f"Idempotency-Key: 1-{MAX_KEY_LENGTH} printable characters", field="Idempotency-Key"
        )
    return key


class IdempotentSubmitter:
    def __init__(
        self, *, table_name: str, expires_after_seconds: int, submit: Submit, client: Any = None
    ) -> None:
        self._config = IdempotencyConfig(
            event_key_jmespath="[user, key]",
            payload_validation_jmespath="body",
            expires_after_seconds=expires_after_seconds,
            raise_on_no_idempotency_key=True,
        )
        persistence = DynamoDBPersistenceLayer(
            table_name=table_name,
            key_attr="pk",
            expiry_attr="expires_at",
            boto3_client=client,
        )

        @idempotent_function(  # type: ignore[untyped-decorator]
            data_keyword_argument="request", persistence_store=persistence, config=self._config
        )
        def run(request: dict[str, Any]) -> dict[str, Any]:
            return submit(request["user"], request["body"], frozenset(request["groups"]))

        self._run = run

    def register_lambda_context(self, context: LambdaContext) -> None:
        """Lets an in-progress record expire with the invocation that holds it."""
        self._config.register_lambda_context(context)

    def submit(
        self, user: str, key: str, body: dict[str, Any], groups: Collection[str] = ()
    ) -> dict[str, Any]:
        request = {"user": user, "key": validate_key(key), "body": body, "groups": sorted(groups)}
        try:
            result: dict[str, Any] = self._run(request=request)
        except IdempotencyValidationError as error:
            raise IdempotencyConflict(
                "Idempotency-Key was used with another request body", field="Idempotency-Key"
            ) from error
        except IdempotencyAlreadyInProgressError as error:
            raise TaskStateConflict(
                "a request with this Idempotency-Key is still being processed; retry shortly",
                field="Idempotency-Key",
            ) from error
        return result
