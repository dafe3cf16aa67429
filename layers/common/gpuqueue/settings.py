"""Typed configuration, one model per function, read from the env vars template.yaml sets.

Each handler reads its model once per container through a cached getter, never at import.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gpuqueue.admin_settings import AdminSettings
from gpuqueue.auth.account_policy import (
    DEFAULT_PASSWORD_MINIMUM_LENGTH,
    PasswordPolicy,
    SignUpVerification,
)
from gpuqueue.fleet.balancer import Strategy
from gpuqueue.gpu.credentials import DEFAULT_TTL_SECONDS, CredentialScope


class _Settings(BaseSettings):
    # Built when a function first reads its own settings, not every function's at import.
    model_config = SettingsConfigDict(
        case_sensitive=False, extra="ignore", frozen=True, defer_build=True
    )


class GpuCredentialSettings(_Settings):
    """What the functions that call GPUs (and the admin API, which checks references) know
    about endpoint credentials: the prefixes template.yaml grants them (`<stack>/gpu/` for
    secrets, `/<stack>/gpu/` for SSM parameters; None: none may be named)."""

    gpu_secret_prefix: str | None = None
    gpu_parameter_prefix: str | None = None
    # How long a credential value is kept per container (a 401/403 drops it at once).
    gpu_credential_ttl_seconds: float = Field(default=DEFAULT_TTL_SECONDS, ge=0, le=3600)

    @property
    def credential_scope(self) -> CredentialScope:
        return CredentialScope(
            secret_prefix=self.gpu_secret_prefix, parameter_prefix=self.gpu_parameter_prefix
        )


class AuthSettings(_Settings):
    user_pool_id: str
    user_pool_client_id: str
    # The PasswordMinimumLength parameter (the pool enforces it too; Cognito allows 6-99).
    password_minimum_length: int = Field(default=DEFAULT_PASSWORD_MINIMUM_LENGTH, ge=6, le=99)
    sign_up_verification: SignUpVerification = SignUpVerification.NONE
    # Limits on failed logins (per username, per source) and registrations (per source): a
    # burst, then one more every refill period (gpuqueue.auth.sign_in_throttle).
    limits_table: str
    login_username_failure_burst: int = Field(default=5, ge=1, le=1000)
    login_username_failure_refill_seconds: float = Field(default=300, ge=1, le=86_400)
    login_source_failure_burst: int = Field(default=30, ge=1, le=100_000)
    login_source_failure_refill_seconds: float = Field(default=60, ge=1, le=86_400)
    register_source_burst: int = Field(default=5, ge=1, le=100_000)
    register_source_refill_seconds: float = Field(default=720, ge=1, le=86_400)
    # Behind CloudFront (WafRateLimit > 0): the secret its origin header carries.
    origin_verify_secret: SecretStr | None = None

    @property
    def password_policy(self) -> PasswordPolicy:
        return PasswordPolicy(minimum_length=self.password_minimum_length)


class SubmitLimitsSettings(_Settings):
    """What every path that creates tasks shares: the lanes, capacity, deadlines and the
    per-user limits."""

    tasks_table: str
    task_queue_url: str
    priority_queue_url: str | None = None  # the high-priority lane; None: no such lane
    queue_capacity: int = Field(default=100, ge=1)
    task_retention_days: int = Field(default=7, ge=1)
    queue_full_retry_after_seconds: int = Field(default=10, ge=1)
    queue_ttl_seconds: int = Field(default=3600, ge=1, le=345_600)
    # Per-user token buckets, active-task shares, the lanes' counters that bound the queue
    # (and Idempotency-Key records).
    limits_table: str
    submit_rate_per_second: float = Field(default=1.0, gt=0)
    submit_burst: int = Field(default=20, ge=1)
    max_active_tasks_per_user: int = Field(default=20, ge=1, le=1000)
    # Fair admission: one user holds at most this percentage of a lane's capacity, and a
    # new account (first submit less than new_account_hours ago) at most
    # new_account_active_tasks; 0 hours: no probation.
    user_queue_share_percent: int = Field(default=10, ge=1, le=100)
    new_account_active_tasks: int = Field(default=5, ge=1, le=1000)
    new_account_hours: float = Field(default=24, ge=0, le=720)
    # The local stack only: webhooks may go to http and loopback addresses.
    webhook_allow_loopback: bool = False

    @property
    def active_task_limit(self) -> int:
        """A user's active tasks: MaxActiveTasksPerUser within their share of the capacity
        (so no few accounts can fill a lane), at least 1. 100 %: no share (the lane's own
        bound, 503 QUEUE_FULL, is the one that applies)."""
        if self.user_queue_share_percent >= 100:
            return self.max_active_tasks_per_user
        share = self.queue_capacity * self.user_queue_share_percent // 100
        return min(self.max_active_tasks_per_user, max(1, share))


class SubmitSettings(SubmitLimitsSettings):
    idempotency_ttl_seconds: int = Field(default=86_400, ge=60)
    # `Prefer: wait` requests held at once across the stack (seats in the limits table).
    prefer_wait_seats: int = Field(default=40, ge=0, le=1000)
    websocket_url: str | None = None  # sent as X-Push-Url


class DeadLetterSettings(_Settings):
    tasks_table: str
    # The lanes' dead-letter queue ARNs, to name the lane in the task's error.
    dead_letter_queue_arn: str | None = None
    priority_dead_letter_queue_arn: str | None = None

    def lane_dead_letter_arns(self) -> dict[str, str]:
        arns = {
            "normal": self.dead_letter_queue_arn,
            "high-priority": self.priority_dead_letter_queue_arn,
        }
        return {lane: arn for lane, arn in arns.items() if arn}


class WebhookSettings(_Settings):
    tasks_table: str
    webhook_secret_arn: str
    webhook_queue_url: str
    webhook_dead_letter_queue_url: str
    webhook_allow_loopback: bool = False  # the local stack only
    webhook_max_attempts: int = Field(default=13, ge=1, le=50)
    webhook_retry_base_seconds: float = Field(default=30.0, ge=0)
    webhook_retry_cap_seconds: float = Field(default=900.0, ge=0, le=43_200)


class TaskEventsSettings(_Settings):
    limits_table: str
    outcome_counter_shards: int = Field(default=4, ge=1, le=7)
    webhook_queue_url: str | None = None
    max_active_tasks_per_user: int = Field(default=20, ge=1, le=1000)
    # Push over WebSocket: the connections table and the stage's management API URL
    # (https://{api}.execute-api.{region}.amazonaws.com/{stage}); None: no push.
    connections_table: str | None = None
    websocket_management_url: str | None = None


class ConnectSettings(_Settings):
    """WebSocket $connect: the access token is checked as the HTTP API's JWT authorizer
    checks it (RS256 against the pool's JWKS, issuer, expiry, app client)."""

    connections_table: str
    token_issuer: str  # https://cognito-idp.{region}.amazonaws.com/{user pool id}
    user_pool_client_id: str
    jwks_url: str | None = None  # None: {token_issuer}/.well-known/jwks.json
    # API Gateway closes a WebSocket connection after 2 hours: its row expires then.
    connection_ttl_seconds: int = Field(default=7200, ge=60, le=7200)


class DisconnectSettings(_Settings):
    connections_table: str


class TasksSettings(_Settings):
    tasks_table: str
    # The tasks' files: results/ (images), audio/ (speech uploads), transcripts/.
    task_files_bucket: str
    webhook_queue_url: str | None = None  # redelivery; None: no webhooks on this stack
    websocket_url: str | None = None  # sent as X-Push-Url
    # Queue positions (the lanes' counters) and ETAs (the fleet's measured call times).
    limits_table: str | None = None
    endpoints_table: str | None = None
    health_check_period_seconds: float = Field(default=30, gt=0)
    image_url_ttl_seconds: int = Field(default=300, ge=1, le=900)
    image_retention_days: int = Field(default=1, ge=1)  # the results/ lifecycle rule
    # Webhook redeliveries a user may ask for in any hour (the per-task limit is fixed:
    # gpuqueue.notify.redelivery).
    redeliveries_per_user_per_hour: int = Field(default=20, ge=1, le=1000)
    # `Prefer: wait` requests held at once across the stack (seats in the limits table).
    prefer_wait_seats: int = Field(default=40, ge=0, le=1000)


class StatsSettings(_Settings):
    task_queue_url: str
    dead_letter_queue_url: str
    priority_queue_url: str | None = None
    priority_dead_letter_queue_url: str | None = None
    priority_lane_workers: int = Field(default=1, ge=1)
    endpoints_table: str
    # The last hour's outcomes (rolling counters); None: stats without them.
    limits_table: str | None = None
    outcome_counter_shards: int = Field(default=4, ge=1, le=7)
    queue_capacity: int = Field(default=100, ge=1)
    worker_pool_size: int = Field(default=2, ge=1)
    health_check_period_seconds: float = Field(default=30, gt=0)

    @property
    def health_max_age_seconds(self) -> float:
        return 3.0 * self.health_check_period_seconds


class CheckerSettings(GpuCredentialSettings):
    endpoints_table: str
    image_endpoint_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    speech_endpoint_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # JSON lists of endpoint objects, read (and each entry validated) by
    # endpoint_declarations: a bad entry is reported, never a reason not to start.
    image_endpoints: str = ""
    speech_endpoints: str = ""
    probe_timeout_seconds: float = Field(default=2.0, gt=0, le=10)
    health_check_period_seconds: float = Field(default=30, gt=0)
    schedule_period_seconds: float = Field(default=60, gt=0)

    @property
    def rounds_per_run(self) -> int:
        """EventBridge fires at most once a minute; probe every period within one run."""
        return max(1, int(self.schedule_period_seconds // self.health_check_period_seconds))

    @field_validator("image_endpoint_urls", "speech_endpoint_urls", mode="before")
    @classmethod
    def _split_urls(cls, value: object) -> list[str]:
        if isinstance(value, str):
            return [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
        if isinstance(value, list):
            return [str(u).strip().rstrip("/") for u in value if str(u).strip()]
        raise TypeError("endpoint URLs must be a comma-separated string")


class ReaperSettings(_Settings):
    tasks_table: str
    task_queue_url: str
    priority_queue_url: str | None = None
    max_attempts: int = Field(default=3, ge=1, le=10)
    reaper_requeue_after_seconds: float = Field(default=900, ge=0)
    reaper_lease_grace_seconds: float = Field(default=60, ge=0)


class DispatcherSettings(GpuCredentialSettings):
    tasks_table: str
    endpoints_table: str
    task_files_bucket: str
    task_queue_url: str
    task_timeout_seconds: int = Field(default=120, ge=1, le=900)
    max_attempts: int = Field(default=3, ge=1, le=10)
    health_check_period_seconds: float = Field(default=30, gt=0)
    dispatch_strategy: Strategy = Strategy.LEAST_LOADED
    circuit_failure_threshold: int = Field(default=3, ge=1)
    slot_wait_seconds: float = Field(default=5.0, ge=0, le=60)
    slot_poll_seconds: float = Field(default=0.1, gt=0, le=5)
    no_slot_delay_seconds: int = Field(default=2, ge=0, le=900)
    retry_base_delay_seconds: float = Field(default=2.0, ge=0)
    retry_max_delay_seconds: float = Field(default=60.0, ge=0)
    no_endpoint_delay_seconds: int = Field(default=10, ge=0, le=900)
    # Slots of a kind the high-priority lane may hold at once (PriorityLaneWorkers); None:
    # no cap. Its dispatcher may run more workers than this (SQS needs 2 at least).
    priority_lane_slots: int | None = Field(default=None, ge=1)
    # GPU calls one invocation runs at once (CallsPerWorker): its wait is billed once.
    calls_per_worker: int = Field(default=1, ge=1, le=10)
    # A read of the fleet this recent (by a worker of the same invocation) stands at a
    # hand-off: a high-priority waiter or a circuit that opened is seen this much later.
    fleet_view_max_age_seconds: float = Field(default=1.0, ge=0, le=30)
    # Set by Lambda (the function's MemorySize): what bounds the GPU answers held at once
    # (memory_budget.py). Unset (in-process tests): no bound.
    aws_lambda_function_memory_size: int | None = Field(default=None, ge=128, le=10240)
    # The HTTP API's base URL, where Cog endpoints in callback mode send their webhooks
    # (`/api/v1/callbacks/cog/...`); None: every Cog call is a synchronous one.
    gpu_callback_base_url: str | None = None

    @property
    def health_max_age_seconds(self) -> float:
        """A row not checked for 3 periods counts as unhealthy."""
        return 3.0 * self.health_check_period_seconds


class GpuCallbackSettings(GpuCredentialSettings):
    """The Cog callback route: finishes callback-mode tasks (and cancels their predictions
    through the endpoint's credentials)."""

    tasks_table: str
    endpoints_table: str
    task_files_bucket: str
    circuit_failure_threshold: int = Field(default=3, ge=1)


class SpeechSettings(SubmitLimitsSettings, GpuCredentialSettings):
    endpoints_table: str
    task_files_bucket: str
    speech_timeout_seconds: float = Field(default=20, gt=0, le=25)
    health_check_period_seconds: float = Field(default=30, gt=0)
    dispatch_strategy: Strategy = Strategy.LEAST_LOADED
    circuit_failure_threshold: int = Field(default=3, ge=1)
    slot_wait_seconds: float = Field(default=2.0, ge=0, le=10)
    upload_url_ttl_seconds: int = Field(default=900, ge=60, le=3600)
    image_url_ttl_seconds: int = Field(default=300, ge=1, le=900)

    @property
    def health_max_age_seconds(self) -> float:
        return 3.0 * self.health_check_period_seconds


class UploadSettings(_Settings):
    tasks_table: str
    task_files_bucket: str
    task_queue_url: str
    priority_queue_url: str | None = None
    limits_table: str | None = None  # the lanes' ticket counters (queue positions)


# Each function's settings model, by its handler module (template.yaml's Handler before the
# dot; both dispatchers share one). Tests check that the template gives every function one
# here, sets every env var its model requires and none it does not read. None: the function
# reads no settings.
SETTINGS_BY_HANDLER: dict[str, type[BaseSettings] | None] = {
    "admin_handler": AdminSettings,
    "auth_handler": AuthSettings,
    "checker_handler": CheckerSettings,
    "connect_handler": ConnectSettings,
    "deadletter_handler": DeadLetterSettings,
    "disconnect_handler": DisconnectSettings,
    "dispatcher_handler": DispatcherSettings,
    "docs_handler": None,
    "gpu_callback_handler": GpuCallbackSettings,
    "reaper_handler": ReaperSettings,
    "speech_handler": SpeechSettings,
    "stats_handler": StatsSettings,
    "submit_handler": SubmitSettings,
    "task_events_handler": TaskEventsSettings,
    "tasks_handler": TasksSettings,
    "upload_handler": UploadSettings,
    "webhook_handler": WebhookSettings,
}
