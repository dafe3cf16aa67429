"""Pydantic models at every boundary: API bodies, the task item, the queue message, endpoints."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from gpuqueue.auth.account_policy import (
    USERNAME_MAX_LENGTH,
    USERNAME_MIN_LENGTH,
    check_new_username,
    normalize_username,
)


class DeferredModel(BaseModel):
    """A model whose validator and serializer are built on its first use, not at import: each
    function uses a few of these models, and building them all was most of its cold import."""

    model_config = ConfigDict(defer_build=True)


class TaskStatus(StrEnum):
    # A long-audio task waits for its upload (presigned PUT) before it is queued.
    AWAITING_UPLOAD = "AWAITING_UPLOAD"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    # Not started before its queue deadline: it never reached a GPU (a run that took too long
    # is FAILED with a timeout error instead).
    EXPIRED = "EXPIRED"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


class Priority(StrEnum):
    """Which lane a task waits in: `high` has its own queue and share of the workers."""

    NORMAL = "normal"
    HIGH = "high"


# The states, beside their enum; the transitions between them: gpuqueue.task_states.
TERMINAL_STATUSES = frozenset(
    {TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELED, TaskStatus.EXPIRED}
)
OPEN_STATUSES = frozenset(set(TaskStatus) - TERMINAL_STATUSES)
# TaskView's fields that only some states show (None in every other state).
VIEW_FIELDS_BY_STATUS = {
    "result_url": frozenset({TaskStatus.DONE}),
    "text": frozenset({TaskStatus.DONE}),
    "error": frozenset({TaskStatus.FAILED, TaskStatus.EXPIRED}),
    # How far its GPU has got, as the server last reported it (the dispatcher writes it at
    # a bounded rate; protocols that report no steps leave it empty).
    "progress": frozenset({TaskStatus.RUNNING}),
}
# The longest a task may wait to start: the task queue's retention (4 days).
MAX_QUEUE_TTL_SECONDS = 345_600


class TaskKind(StrEnum):
    IMAGE = "image"
    SPEECH = "speech"


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime) -> str:
    """ISO-8601 UTC with microseconds: sorts lexicographically, so it works as a GSI sort key."""
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- API bodies -----------------------------------------------------------------------------

# Any username, folded (NFKC, case-folded) so `Alice` and its fullwidth form are `alice`.
# Login keeps today's wider alphabet: accounts registered before names were restricted.
Username = Annotated[
    str,
    BeforeValidator(normalize_username),
    StringConstraints(
        min_length=USERNAME_MIN_LENGTH, max_length=USERNAME_MAX_LENGTH, pattern=r"^[\w.@+-]+$"
    ),
]
# A name registered now: folded, then plain ASCII (no look-alikes from other scripts).
NewUsername = Annotated[
    str,
    BeforeValidator(normalize_username),
    StringConstraints(min_length=USERNAME_MIN_LENGTH, max_length=USERNAME_MAX_LENGTH),
    AfterValidator(check_new_username),
]
Password = Annotated[str, StringConstraints(min_length=1, max_length=256)]
# Cognito's limits on an e-mail attribute (2048) are wider than any mailbox (RFC 5321: 254).
Email = Annotated[
    str,
    StringConstraints(strip_whitespace=True, max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
]


class Credentials(DeferredModel):
    model_config = ConfigDict(extra="ignore")

    username: Username
    password: Password


class Registration(DeferredModel):
    """POST /register. `email` is needed where the stack verifies sign-ups by e-mail."""

    model_config = ConfigDict(extra="ignore")

    username: NewUsername
    password: Password
    email: Email | None = None

    def credentials(self) -> Credentials:
        return Credentials(username=self.username, password=self.password)


class SignUpConfirmation(DeferredModel):
    """POST /register/confirm: the code Cognito e-mailed, and the password to sign in with."""

    model_config = ConfigDict(extra="ignore")

    username: Username
    password: Password
    code: Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^\S{1,2048}$")]

    def credentials(self) -> Credentials:
        return Credentials(username=self.username, password=self.password)


class SignUpPending(DeferredModel):
    """/register's answer where sign-ups are verified by e-mail: the same whether the name was
    free or taken, so it tells no one which names exist."""

    status: str = "CONFIRMATION_PENDING"
    message: str = (
        "if the username was free, a confirmation code was sent to the e-mail address: "
        "POST /register/confirm with the username, password and code"
    )


class TokenResponse(DeferredModel):
    token: str
    token_type: str = "Bearer"  # noqa: S105 - the scheme name, not a secret
    expires_in: int


class WebhookEvent(StrEnum):
    """What a webhook delivery announces: a task reaching a final state."""

    DONE = "task.done"
    FAILED = "task.failed"
    CANCELED = "task.canceled"
    EXPIRED = "task.expired"

    @classmethod
    def for_status(cls, status: TaskStatus) -> WebhookEvent:
        return cls(f"task.{status.value.lower()}")


WebhookUrl = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2048)]


class ImageParams(DeferredModel):
    """Generation knobs; bounds keep one request within what a single GPU call can serve."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    height: int = Field(default=512, ge=64, le=2048, multiple_of=8)
    steps: int = Field(default=30, ge=1, le=150)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)


class ImageRequest(ImageParams):
    prompt: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=2000)]
    negative_prompt: Annotated[str, StringConstraints(max_length=2000)] | None = None
    # Not started within this many seconds: EXPIRED (default: the QueueTtlSeconds parameter).
    queue_ttl_seconds: int | None = Field(default=None, ge=1, le=MAX_QUEUE_TTL_SECONDS)
    # "high": the priority lane (Cognito groups vip and admin only).
    priority: Priority = Priority.NORMAL
    # POSTed (signed) when the task reaches a final state; `webhook_events` narrows which.
    webhook_url: WebhookUrl | None = None
    webhook_events: list[WebhookEvent] | None = Field(default=None, min_length=1, max_length=4)

    def params(self) -> ImageParams:
        return ImageParams(width=self.width, height=self.height, steps=self.steps, seed=self.seed)


class SpeechAsyncRequest(DeferredModel):
    """Long audio: announce the file, get a presigned PUT URL for it."""

    model_config = ConfigDict(extra="forbid")

    filename: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
    size_bytes: int = Field(ge=1)
    content_type: Annotated[str, StringConstraints(max_length=100)] | None = None
    language: Annotated[str, StringConstraints(pattern=r"^[A-Za-z-]{2,16}$")] | None = None
    prompt: Annotated[str, StringConstraints(max_length=1000)] | None = None
    # Counted from when the upload lands and the task is queued.
    queue_ttl_seconds: int | None = Field(default=None, ge=1, le=MAX_QUEUE_TTL_SECONDS)
    priority: Priority = Priority.NORMAL
    webhook_url: WebhookUrl | None = None
    webhook_events: list[WebhookEvent] | None = Field(default=None, min_length=1, max_length=4)


class SpeechUploadResponse(DeferredModel):
    task_id: str
    status: TaskStatus
    upload_url: str
    upload_method: str
    upload_headers: dict[str, str]
    expires_in: int
    message: str


class SubmitResponse(DeferredModel):
    task_id: str
    status: TaskStatus
    message: str


class ErrorBody(DeferredModel):
    error: str
    code: str
    field: str | None = None


# --- The task as stored ---------------------------------------------------------------------


class SpeechInput(DeferredModel):
    """A speech task's audio (uploaded to S3) and how to transcribe it."""

    model_config = ConfigDict(extra="ignore")

    audio_key: str
    filename: str
    content_type: str
    size_bytes: int
    language: str | None = None

    @field_validator("size_bytes", mode="before")
    @classmethod
    def _int_from_decimal(cls, value: Any) -> int:
        return int(value)


class WebhookAttempt(DeferredModel):
    """One try at delivering a webhook, as the delivery log shows it."""

    model_config = ConfigDict(extra="ignore")

    delivery_id: str
    event: WebhookEvent
    attempt: int
    at: str  # ISO time the attempt started
    ok: bool
    status_code: int | None = None
    error: str | None = None
    duration_ms: int | None = None
    gave_up: bool = False  # the last attempt of a delivery that never succeeded

    @field_validator("attempt", "status_code", "duration_ms", mode="before")
    @classmethod
    def _int_from_decimal(cls, value: Any) -> int | None:
        return None if value is None else int(value)


class TaskProgress(DeferredModel):
    """How far a running task's GPU has got: step `step` of `steps`."""

    model_config = ConfigDict(extra="ignore")

    step: int = Field(ge=0)
    steps: int = Field(ge=1)
    fraction: float = Field(ge=0.0, le=1.0)
    # Seconds until the GPU should be done, from its pace so far (None: too early to say).
    eta_seconds: float | None = Field(default=None, ge=0.0)

    @field_validator("step", "steps", mode="before")
    @classmethod
    def _int_from_decimal(cls, value: Any) -> int:
        return int(value)

    @field_validator("fraction", "eta_seconds", mode="before")
    @classmethod
    def _float_from_decimal(cls, value: Any) -> float | None:
        return None if value is None else float(value)

    @classmethod
    def of(cls, step: int, steps: int, *, eta_seconds: float | None = None) -> TaskProgress:
        steps = max(1, steps)
        step = min(max(0, step), steps)
        eta = None if eta_seconds is None else round(max(0.0, eta_seconds), 1)
        return cls(step=step, steps=steps, fraction=round(step / steps, 4), eta_seconds=eta)


class CallbackLease(DeferredModel):
    """A slot (or a lane seat) a callback-mode task holds while its GPU works: what frees
    it (endpoint_registry.release_slot) and what its EWMA was when it was leased."""

    model_config = ConfigDict(extra="ignore")

    endpoint_id: str  # the endpoint's id, or the priority lane's for a seat
    slot: int
    lease_id: str
    call_seconds_ewma: float | None = None

    @field_validator("slot", mode="before")
    @classmethod
    def _int_from_decimal(cls, value: Any) -> int:
        return int(value)

    @field_validator("call_seconds_ewma", mode="before")
    @classmethod
    def _float_from_decimal(cls, value: Any) -> float | None:
        return None if value is None else float(value)


class CallbackWait(DeferredModel):
    """A RUNNING task whose GPU server (Cog, `callback: true`) reports by webhook: no Lambda
    waits on the call. What the callback route needs to finish it (dispatch/cog_callbacks)."""

    model_config = ConfigDict(extra="ignore")

    prediction_id: str
    # SHA-256 of the attempt's callback token (the token itself is only in the webhook URL).
    token_hash: str
    lease_id: str  # the task lease of the attempt that started it: the callback writes with it
    endpoint_id: str
    leases: list[CallbackLease]
    started_at: float  # epoch seconds, when the server accepted the prediction

    @field_validator("started_at", mode="before")
    @classmethod
    def _float_from_decimal(cls, value: Any) -> float:
        return float(value)


class Task(DeferredModel):
    """One row of the tasks table."""

    model_config = ConfigDict(extra="ignore")

    task_id: str
    user_id: str
    kind: TaskKind = TaskKind.IMAGE
    status: TaskStatus
    priority: Priority = Priority.NORMAL
    prompt: str = ""  # the image prompt, or a speech task's transcription prompt
    speech: SpeechInput | None = None
    transcript_text: str | None = None  # a DONE speech task's text (preview; full JSON in S3)
    negative_prompt: str | None = None
    params: ImageParams = Field(default_factory=ImageParams)
    created_at: str
    updated_at: str
    started_at: str | None = None  # the latest claim: queue wait = started_at - created_at
    attempt: int = 0
    lease_id: str | None = None
    lease_until: float | None = None
    endpoint_id: str | None = None
    result_key: str | None = None
    error: str | None = None
    expires_at: int | None = None
    queue_ttl_seconds: int | None = None
    queue_deadline: float | None = None  # epoch seconds; set when the task is queued
    # AWAITING_UPLOAD only: epoch seconds after which the upload can no longer arrive.
    upload_deadline: float | None = None
    ticket: int | None = None  # its number in its lane's waiting line (queue_position.py)
    webhook_url: str | None = None
    webhook_events: list[WebhookEvent] | None = None  # None: every final state
    deliveries: list[WebhookAttempt] = Field(default_factory=list)  # webhook attempts, oldest first
    reap_at: float | None = None  # open tasks: when the reaper looks at it (task_store.py)
    resends: int = 0  # messages the reaper re-sent for it
    # RUNNING: the protocol of the endpoint its current attempt runs on (the claim writes it),
    # which tells whether a cancel can stop the GPU.
    endpoint_protocol: EndpointProtocol | None = None
    progress: TaskProgress | None = None  # RUNNING: the GPU's latest step count
    # Its owner asked to cancel it while it ran: the GPU is told to stop (ISO time).
    cancel_requested_at: str | None = None
    # RUNNING in callback mode: its server finishes it by webhook (the latest attempt's).
    callback: CallbackWait | None = None

    def is_expired(self, now: float) -> bool:
        """Past its retention (`expires_at`, the table's TTL attribute)."""
        return self.expires_at is not None and self.expires_at <= now

    def wants_webhook(self, event: WebhookEvent) -> bool:
        return self.webhook_url is not None and (
            self.webhook_events is None or event in self.webhook_events
        )

    @field_validator("attempt", "resends", mode="before")
    @classmethod
    def _int_from_decimal(cls, value: Any) -> int:
        return int(value)

    @field_validator("lease_until", "queue_deadline", "upload_deadline", "reap_at", mode="before")
    @classmethod
    def _float_from_decimal(cls, value: Any) -> float | None:
        return None if value is None else float(value)

    @field_validator("expires_at", "queue_ttl_seconds", "ticket", mode="before")
    @classmethod
    def _opt_int_from_decimal(cls, value: Any) -> int | None:
        return None if value is None else int(value)

    @field_validator("params", mode="before")
    @classmethod
    def _params_from_item(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: (None if v is None else int(v)) for k, v in value.items()}
        return value


class TaskView(DeferredModel):
    """The task as the seed's clients see it."""

    task_id: str
    user_id: str
    kind: TaskKind
    prompt: str
    negative_prompt: str | None = None
    status: TaskStatus
    priority: Priority = Priority.NORMAL
    created_at: str
    updated_at: str
    started_at: str | None = None
    attempt: int
    params: ImageParams
    result_url: str | None = None
    error: str | None = None
    text: str | None = None  # speech tasks: the transcript's text once DONE
    webhook_url: str | None = None
    # QUEUED only, estimates: tasks ahead in its lane, and seconds until it should be done.
    queue_position: int | None = None
    eta_seconds: float | None = None
    progress: TaskProgress | None = None  # RUNNING: step n of N on the GPU, when it says
    cancel_requested: bool = False  # RUNNING: its owner asked to cancel; the GPU is stopping

    @classmethod
    def of(cls, task: Task) -> TaskView:
        def shows(field: str) -> bool:
            return task.status in VIEW_FIELDS_BY_STATUS[field]

        if task.kind is TaskKind.SPEECH:
            result_url = f"/api/v1/speech/transcripts/{task.task_id}"
        else:
            result_url = f"/api/images/{task.task_id}"
        return cls(
            task_id=task.task_id,
            user_id=task.user_id,
            kind=task.kind,
            prompt=task.prompt,
            negative_prompt=task.negative_prompt,
            status=task.status,
            priority=task.priority,
            created_at=task.created_at,
            updated_at=task.updated_at,
            started_at=task.started_at,
            attempt=task.attempt,
            params=task.params,
            result_url=result_url if shows("result_url") else None,
            error=task.error if shows("error") else None,
            text=task.transcript_text if shows("text") else None,
            webhook_url=task.webhook_url,
            progress=task.progress if shows("progress") else None,
            cancel_requested=task.status is TaskStatus.RUNNING
            and task.cancel_requested_at is not None,
        )


class QueueMessage(DeferredModel):
    """What travels on SQS: only the id. The task row is the truth."""

    model_config = ConfigDict(extra="ignore")

    task_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    kind: TaskKind = TaskKind.IMAGE
    # The task's priority, so a worker may pick its slot before reading the task (None: a
    # message sent before it was carried; the task is read first).
    priority: Priority | None = None


# --- Endpoints (the health table) -----------------------------------------------------------


class EndpointProtocol(StrEnum):
    OPENAI = "openai"  # POST /v1/images/generations, b64_json
    A1111 = "a1111"  # POST /sdapi/v1/txt2img (AUTOMATIC1111 / Forge / SD.Next)
    COMFYUI = "comfyui"  # POST /prompt with a workflow graph, then /history and /view
    COG = "cog"  # POST /predictions (a Cog container, as Replicate packages models)

    @property
    def can_stop_a_running_job(self) -> bool:
        """Whether its servers can stop a job they started (A1111's interrupt, ComfyUI's
        interrupt, Cog's cancel); the OpenAI images API has no such call."""
        return self is not EndpointProtocol.OPENAI


class EndpointState(StrEnum):
    ACTIVE = "ACTIVE"  # receives work
    DRAINING = "DRAINING"  # in-flight calls finish, nothing new is sent
    DISABLED = "DISABLED"  # kept in the table, never used


class CircuitState(StrEnum):
    CLOSED = "CLOSED"  # normal
    OPEN = "OPEN"  # failing: no work until a health check passes
    HALF_OPEN = "HALF_OPEN"  # a check passed: one trial call at a time until one succeeds


class CredentialScheme(StrEnum):
    """How an endpoint's credential travels on each call (and each health probe)."""

    BEARER = "bearer"  # Authorization: Bearer <value> (vLLM --api-key, OpenAI-style servers)
    HEADER = "header"  # <header>: <value>, e.g. X-Api-Key (gateways, proxies, custom servers)


# Secrets Manager names: letters, digits and /_+=.@- (1-512); SSM parameter names are
# fully qualified here ("/..."), of letters, digits and _.-/ (at most 1011 characters).
SECRET_NAME_PATTERN = r"^[A-Za-z0-9/_+=.@-]{1,512}$"  # noqa: S105 - a name pattern
PARAMETER_NAME_PATTERN = r"^/[A-Za-z0-9_./-]{1,1010}$"
# An HTTP header name (RFC 9110 token), short enough for any server.
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$"
# Headers the HTTP client sets itself: a credential must never replace them.
RESERVED_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection"}
)


class CredentialRef(DeferredModel):
    """Where an endpoint's API key or bearer token is kept, never the value itself: a
    Secrets Manager secret (`secret`, its name) or an SSM Parameter Store SecureString
    (`parameter`, its full name), and how to send it (`type`, `header`)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: CredentialScheme
    secret: Annotated[str, StringConstraints(pattern=SECRET_NAME_PATTERN)] | None = None
    parameter: Annotated[str, StringConstraints(pattern=PARAMETER_NAME_PATTERN)] | None = None
    header: Annotated[str, StringConstraints(pattern=HEADER_NAME_PATTERN)] | None = None

    @model_validator(mode="after")
    def _one_store_and_a_header_when_needed(self) -> CredentialRef:
        if (self.secret is None) == (self.parameter is None):
            raise ValueError("name exactly one of 'secret' (Secrets Manager) or 'parameter' (SSM)")
        if self.type is CredentialScheme.HEADER:
            if self.header is None:
                raise ValueError("type 'header' needs 'header', the header's name")
            if self.header.lower() in RESERVED_HEADERS:
                raise ValueError(f"'header' cannot be {self.header}: the HTTP client sets it")
        elif self.header is not None:
            raise ValueError("'header' goes with type 'header' (bearer uses Authorization)")
        return self

    @property
    def store(self) -> str:
        """Where the value lives, as logs and errors name it (never the value)."""
        return f"secret {self.secret}" if self.secret is not None else f"parameter {self.parameter}"


class ComfyWorkflow(DeferredModel):
    """A ComfyUI endpoint's workflow: an API-format graph (as ComfyUI's "Save (API)" exports
    it: node id -> {"class_type", "inputs"}) and the node ids where a task's fields go. Each
    task patches a copy: `prompt_node`/`negative_node` at `inputs.text`, `seed_node` at
    `inputs.<seed_input>`, `size_node` at `inputs.width`/`height`, `steps_node` at
    `inputs.steps` (its progress events are the task's steps); the image is read from
    `output_node` (a SaveImage). What a valid one is: fleet/endpoint_specs.py."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    graph: dict[str, dict[str, Any]]
    prompt_node: str
    negative_node: str | None = None
    seed_node: str | None = None
    seed_input: str = "seed"  # KSampler's; SamplerCustom/RandomNoise call it "noise_seed"
    size_node: str | None = None
    steps_node: str | None = None
    output_node: str


class Endpoint(DeferredModel):
    """One GPU endpoint: configuration (declared or admin-managed) plus its health."""

    model_config = ConfigDict(extra="ignore")

    endpoint_id: str
    url: str
    kind: TaskKind
    protocol: EndpointProtocol = EndpointProtocol.OPENAI
    capacity: int = Field(default=1, ge=1)
    weight: int = Field(default=1, ge=1)
    state: EndpointState = EndpointState.ACTIVE
    source: str = "parameter"
    credentials: CredentialRef | None = None  # sent on every call and probe
    # Cog only: predictions are started with a webhook and the dispatcher returns at once
    # (callback mode: the callback route stores the result and frees the slot).
    callback: bool = False
    # Callback mode: whether Cog also sends its `logs` webhooks (about 2 a second) for the
    # progress and to pass on a cancel; False: `completed` only, the cheapest, with no
    # progress and a cancel that takes effect only at the end (docs/cost.md).
    callback_progress: bool = True
    # What the stack parameter last declared (declared rows): a change there is applied,
    # an operator's change through the admin API holds until then.
    declared_capacity: int | None = None
    declared_weight: int | None = None
    healthy: bool = False
    last_checked_at: float | None = None
    latency_ms: float | None = None
    latency_ewma_ms: float | None = None
    consecutive_failures: int = 0
    circuit: CircuitState = CircuitState.CLOSED
    opened_at: float | None = None
    last_error: str | None = None
    # protocol comfyui: the workflow each task patches (stored in the row as JSON text:
    # DynamoDB numbers would refuse the graph's floats).
    workflow: ComfyWorkflow | None = None

    @field_validator("workflow", mode="before")
    @classmethod
    def _workflow_from_text(cls, value: Any) -> Any:
        return json.loads(value) if isinstance(value, str) else value

    @field_validator("capacity", "weight", "consecutive_failures", mode="before")
    @classmethod
    def _int_from_decimal(cls, value: Any) -> int:
        return int(value)

    @field_validator("declared_capacity", "declared_weight", mode="before")
    @classmethod
    def _opt_int_from_decimal(cls, value: Any) -> int | None:
        return None if value is None else int(value)

    @field_validator("last_checked_at", "latency_ms", "latency_ewma_ms", "opened_at", mode="before")
    @classmethod
    def _float_from_decimal(cls, value: Any) -> float | None:
        return None if value is None else float(value)

    def is_fresh(self, now: float, max_age_seconds: float) -> bool:
        """Checked recently: a stale 'healthy' means the checker stopped."""
        return self.last_checked_at is not None and now - self.last_checked_at <= max_age_seconds

    def is_routable(self, now: float, max_age_seconds: float) -> bool:
        """May receive new work: active, healthy, fresh, circuit not open."""
        return (
            self.state is EndpointState.ACTIVE
            and self.healthy
            and self.circuit is not CircuitState.OPEN
            and self.is_fresh(now, max_age_seconds)
        )

    @property
    def usable_capacity(self) -> int:
        """A half-open circuit admits one trial call at a time."""
        return 1 if self.circuit is CircuitState.HALF_OPEN else self.capacity


class SlotLease(DeferredModel):
    """One of an endpoint's concurrent-call slots, leased to one GPU call until it expires."""

    model_config = ConfigDict(extra="ignore")

    endpoint_id: str
    slot: int
    lease_id: str
    task_id: str
    lease_until: float
    leased_at: float | None = None
    # The slot's call-duration EWMA as it stood when the lease was taken (None: no call yet).
    call_seconds_ewma: float | None = None
    # Kept across calls: its holder runs calls back to back and writes the row only now and
    # then (a renewal), so `leased_at` is the start of the first of them (Fleet.busy_until).
    kept: bool = False

    @field_validator("slot", mode="before")
    @classmethod
    def _int_from_decimal(cls, value: Any) -> int:
        return int(value)

    @field_validator("lease_until", "leased_at", "call_seconds_ewma", mode="before")
    @classmethod
    def _float_from_decimal(cls, value: Any) -> float | None:
        return None if value is None else float(value)

    def is_live(self, now: float) -> bool:
        return self.lease_until > now


class HealthResult(DeferredModel):
    endpoint_id: str
    healthy: bool
    latency_ms: float
    checked_at: float
    error: str | None = None


class FleetStats(DeferredModel):
    """One kind's endpoints: how many can take work, and the GPU slots they offer."""

    healthy: int
    total: int
    slots_total: int
    slots_free: int


class LaneStats(DeferredModel):
    """One lane's queue (normal, or the high-priority lane) and the workers it has."""

    queue_length: int  # waiting for a worker (visible + delayed)
    queue_capacity: int
    queue_usage: float
    in_flight: int
    delayed: int
    dead_letter: int
    workers: int


class OutcomeStats(DeferredModel):
    """How tasks ended over the last hour (rolling counters in 5-minute buckets, so the
    window is the last 60 to 65 minutes)."""

    window_seconds: int
    succeeded: int
    failed: int
    canceled: int
    expired: int
    failure_rate: float  # % of the tasks that ran to an end (DONE or FAILED) that failed
    avg_processing_seconds: float | None  # DONE tasks: from the start of the run to the end


class QueueStats(DeferredModel):
    """The seed's figures (queue_length ... workers: the normal lane) plus every lane's and
    the endpoints'."""

    queue_length: int
    queue_capacity: int
    queue_usage: float
    in_flight: int
    delayed: int
    dead_letter: int
    workers: int
    lanes: dict[str, LaneStats] = Field(default_factory=dict)
    endpoints: dict[str, FleetStats] = Field(default_factory=dict)
    last_hour: OutcomeStats | None = None
