"""Domain errors. The HTTP layer maps these classes to status codes (gpuqueue.api.resolver)."""

from __future__ import annotations


class GpuqueueError(Exception):
    """Base of every error the domain raises on purpose."""

    code = "ERROR"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidInput(GpuqueueError):
    code = "INVALID_INPUT"


class InvalidJson(InvalidInput):
    """The request body cannot be parsed as JSON (its bytes, not its fields)."""

    code = "INVALID_JSON"


class TaskNotFound(GpuqueueError):
    code = "NOT_FOUND"


class TaskStateConflict(GpuqueueError):
    code = "CONFLICT"


class ResultExpired(GpuqueueError):
    """The task exists but its result was deleted by the retention rule."""

    code = "GONE"


class EndpointNotFound(GpuqueueError):
    code = "NOT_FOUND"


class EndpointConflict(GpuqueueError):
    """The change contradicts how the endpoint is managed (e.g. a stack-declared row)."""

    code = "CONFLICT"


class UserAlreadyExists(GpuqueueError):
    code = "USER_EXISTS"


class WeakPassword(GpuqueueError):
    code = "WEAK_PASSWORD"


class InvalidCredentials(GpuqueueError):
    code = "INVALID_CREDENTIALS"


class AccountNotConfirmed(GpuqueueError):
    """The right password for an account whose e-mailed code was never confirmed."""

    code = "ACCOUNT_NOT_CONFIRMED"


class InvalidConfirmationCode(GpuqueueError):
    """One answer for a wrong, expired or spent code, and for an unknown or confirmed user."""

    code = "INVALID_CODE"


class Unauthenticated(GpuqueueError):
    code = "UNAUTHENTICATED"


class Forbidden(GpuqueueError):
    """Authenticated, but not allowed (e.g. not in the Cognito group a route needs)."""

    code = "FORBIDDEN"


class QueueFull(GpuqueueError):
    code = "QUEUE_FULL"

    def __init__(self, message: str, *, retry_after_seconds: int) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class ServiceUnavailable(GpuqueueError):
    code = "SERVICE_UNAVAILABLE"

    def __init__(self, message: str, *, retry_after_seconds: int = 5) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class StoreError(Exception):
    """A call to a table, queue or bucket failed: unreachable, throttled, or refused. The
    data-access layer raises it in place of the SDK's error (its cause), so the logic above
    never handles botocore; `sdk_error` names the SDK's error, `code` its AWS error code."""

    def __init__(self, store: str, error: Exception) -> None:
        self.sdk_error = type(error).__name__
        self.code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
        super().__init__(f"{store}: {self.sdk_error} {self.code}".rstrip())


class GpuError(Exception):
    """A GPU endpoint call that did not produce a usable result."""

    retryable = False


class RetryableGpuError(GpuError):
    """Connect error, timeout, 5xx, 429: another try (maybe elsewhere) may succeed."""

    retryable = True


class PermanentGpuError(GpuError):
    """4xx from the endpoint or an unusable answer: retrying will not help."""


class GpuCanceled(GpuError):
    """The call stopped because the task's owner canceled it: the server was told to stop
    (interrupt, cancel) and whatever it produced is dropped. Not the endpoint's fault."""


class EndpointAuthRefused(RetryableGpuError):
    """The endpoint answered 401 or 403: it refused our credentials (or wants some).

    The endpoint's configuration is wrong, not the task: like a 5xx it counts against the
    endpoint's circuit and the task may move to another endpoint, so one misconfigured
    server never fails work a correctly configured one could do. With no other endpoint,
    the task ends FAILED with this message once its attempts are spent."""


class CredentialUnavailable(RetryableGpuError):
    """An endpoint's credential could not be read (no such secret or parameter, no
    permission, an empty value): the endpoint cannot be called, so it counts as failing."""


class RetryLater(Exception):
    """Raised by the dispatcher to have a message come back after a delay.

    `requeue=False`: the same message returns (its SQS receive count grows); used after a
    failed attempt, which `MaxAttempts` bounds well below the queue's maxReceiveCount.
    `requeue=True`: a fresh copy is sent with a delay and the original deleted, so waiting
    out a GPU outage or another worker's lease never walks a valid task into the DLQ.
    """

    def __init__(self, reason: str, *, delay_seconds: int, requeue: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_seconds = delay_seconds
        self.requeue = requeue


class UnsupportedMediaType(GpuqueueError):
    """The upload is not one of the audio formats we accept (HTTP 415); `field` names it."""

    code = "UNSUPPORTED_MEDIA_TYPE"


class GpuTimeout(RetryableGpuError):
    """The endpoint accepted the call but did not answer in time (a synchronous route: 504).
    The GPU may still be busy with it: servers rarely stop work when the client goes away."""


class PayloadTooLarge(GpuqueueError):
    """The request body is over a documented size limit (HTTP 413)."""

    code = "PAYLOAD_TOO_LARGE"


class UpstreamTimeout(GpuqueueError):
    """A synchronous call's endpoint did not answer in time (HTTP 504)."""

    code = "UPSTREAM_TIMEOUT"


class UpstreamFailed(GpuqueueError):
    """Every endpoint tried for a synchronous call failed (HTTP 502)."""

    code = "UPSTREAM_FAILED"


class UnprocessableAudio(GpuqueueError):
    """The speech endpoint refused the audio itself (HTTP 422)."""

    code = "UNPROCESSABLE_AUDIO"


class RateLimited(GpuqueueError):
    """The caller is over their submit rate (HTTP 429 + Retry-After + X-RateLimit-*)."""

    code = "RATE_LIMITED"

    def __init__(self, message: str, *, retry_after_seconds: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds
        self.headers = headers


class ActiveTaskLimit(RateLimited):
    """The caller already has their share of active tasks (HTTP 429, field active_tasks)."""

    code = "ACTIVE_TASK_LIMIT"

    def __init__(self, message: str, *, limit: int, retry_after_seconds: int = 10) -> None:
        super().__init__(
            message,
            retry_after_seconds=retry_after_seconds,
            headers={"X-ActiveTasks-Limit": str(limit)},
        )
        self.field = "active_tasks"
        self.limit = limit


class NewAccountLimit(ActiveTaskLimit):
    """A new account already has its (lower) share of active tasks (HTTP 429, field
    active_tasks): a few fresh accounts cannot fill the queue."""

    code = "NEW_ACCOUNT_LIMIT"


class IdempotencyConflict(GpuqueueError):
    """An Idempotency-Key reused with another body (HTTP 422)."""

    code = "IDEMPOTENCY_KEY_REUSED"
