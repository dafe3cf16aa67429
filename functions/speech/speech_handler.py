"""Speech-to-text routes: synchronous upload and raw PCM, and long audio as a task.

POST /api/v1/speech/transcribe        multipart `file` (+ `language`, `prompt`) -> transcript
POST /api/v1/speech/pcm               raw 16-bit LE PCM (?sample_rate, ?channels) -> transcript
POST /api/v1/speech/async             -> 202 task id + presigned PUT URL for the audio
GET  /api/v1/speech/transcripts/{id}  a DONE speech task's transcript (owner only, else 404)
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Body, Path, Query
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.api.multipart_form import parse_form
from gpuqueue.api.resolver import build_resolver, current_caller, documented
from gpuqueue.errors import (
    ActiveTaskLimit,
    InvalidInput,
    PayloadTooLarge,
    RateLimited,
    TaskStateConflict,
    UnsupportedMediaType,
)
from gpuqueue.fleet.balancer import Balancer
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.slot_broker import SlotBroker
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.gpu.speech_client import OpenAITranscriptionClient, Transcript, TranscriptResponse
from gpuqueue.intake.submission import SubmissionService
from gpuqueue.log_context import correlate_task
from gpuqueue.models import (
    SpeechAsyncRequest,
    SpeechInput,
    SpeechUploadResponse,
    TaskKind,
    TaskStatus,
)
from gpuqueue.settings import SpeechSettings
from gpuqueue.speech.audio import (
    ASYNC_AUDIO_MAX_BYTES,
    HEAD_BYTES,
    SYNC_AUDIO_MAX_BYTES,
    audio_format,
    pcm_to_wav,
)
from gpuqueue.speech.audio_store import AudioStore, audio_key
from gpuqueue.speech.speech_service import AudioClip, SpeechService
from gpuqueue.store.task_ids import new_task_id
from gpuqueue.store.task_store import TaskStore

logger = Logger()
tracer = Tracer()
metrics = Metrics()
app = build_resolver()

TaskId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
Language = Annotated[str | None, Query(min_length=2, max_length=16, pattern=r"^[A-Za-z-]+$")]
PCM_TYPES = ("application/octet-stream", "audio/l16", "audio/pcm")


@dataclass(frozen=True)
class Deps:
    speech: SpeechService
    submissions: SubmissionService
    tasks: TaskStore
    audio: AudioStore
    upload_url_ttl_seconds: int


@cache
def deps() -> Deps:
    settings = SpeechSettings()
    dynamodb = aws_clients.dynamodb()
    registry = EndpointRegistry(dynamodb.Table(settings.endpoints_table))
    tasks = TaskStore(
        dynamodb.Table(settings.tasks_table),
        retention=timedelta(days=settings.task_retention_days),
    )
    return Deps(
        speech=SpeechService(
            registry=registry,
            slots=SlotBroker(
                registry,
                health_max_age_seconds=settings.health_max_age_seconds,
                balancer=Balancer(settings.dispatch_strategy),
            ),
            transcriber=OpenAITranscriptionClient(
                credentials=GpuCredentials(
                    settings.credential_scope,
                    secrets=aws_clients.secretsmanager,
                    parameters=aws_clients.ssm,
                    ttl_seconds=settings.gpu_credential_ttl_seconds,
                )
            ),
            timeout_seconds=settings.speech_timeout_seconds,
            slot_wait_seconds=settings.slot_wait_seconds,
            circuit_failure_threshold=settings.circuit_failure_threshold,
            retry_after_seconds=max(1, int(settings.health_check_period_seconds)),
        ),
        submissions=SubmissionService.from_settings(settings),
        tasks=tasks,
        audio=AudioStore(aws_clients.s3(), settings.task_files_bucket),
        upload_url_ttl_seconds=settings.upload_url_ttl_seconds,
    )


def _raw_body() -> bytes:
    """The request body as bytes: API Gateway base64-encodes binary payloads."""
    event = app.current_event
    body = event.body or ""
    if event.is_base64_encoded:
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as error:
            raise InvalidInput("the body is not valid base64", field="body") from error
    else:
        data = body.encode("utf-8")
    if len(data) > SYNC_AUDIO_MAX_BYTES:
        raise PayloadTooLarge(
            f"the body is {len(data)} bytes; synchronous transcription takes at most "
            f"{SYNC_AUDIO_MAX_BYTES} (use POST /api/v1/speech/async for longer audio)",
            field="body",
        )
    return data


def _remaining() -> float:
    return app.lambda_context.get_remaining_time_in_millis() / 1000


def _answer(transcript: Transcript) -> Response[str]:
    metrics.add_metric(name="SpeechTranscribed", unit=MetricUnit.Count, value=1)
    body = TranscriptResponse(code=0, **transcript.model_dump())
    return Response(HTTPStatus.OK.value, content_types.APPLICATION_JSON, body.model_dump_json())


@app.post("/api/v1/speech/transcribe")
def transcribe() -> Response[str]:
    caller = current_caller(app)
    form = parse_form(_raw_body(), app.current_event.headers.get("content-type"))
    upload = form.get("file")
    if upload is None:
        raise InvalidInput("the field 'file' (the audio) is required", field="file")
    if not upload.data:
        raise InvalidInput("the uploaded file is empty", field="file")
    fmt = audio_format(upload.filename, upload.content_type, upload.data[:HEAD_BYTES])
    language = form["language"].text if "language" in form else None
    if language is not None and not (2 <= len(language) <= 16 and language.isascii()):
        raise InvalidInput("language: expected a language code such as 'en'", field="language")
    clip = AudioClip(
        data=upload.data,
        filename=upload.filename or f"audio{fmt.extension}",
        content_type=fmt.content_type,
        language=language or None,
        prompt=form["prompt"].text[:1000] if "prompt" in form else None,
    )
    return _answer(deps().speech.transcribe(clip, user_id=caller.sub, remaining_seconds=_remaining))


@app.post("/api/v1/speech/pcm")
def transcribe_pcm(
    sample_rate: Annotated[int, Query()] = 16000,
    channels: Annotated[int, Query()] = 1,
    language: Language = None,
) -> Response[str]:
    caller = current_caller(app)
    content_type = (app.current_event.headers.get("content-type") or "").split(";")[0].strip()
    if content_type.lower() not in PCM_TYPES:
        raise UnsupportedMediaType(
            "send raw 16-bit little-endian PCM as application/octet-stream",
            field="Content-Type",
        )
    # Validates: empty body, odd byte counts, absurd rates and channel counts (400 each).
    wav = pcm_to_wav(_raw_body(), sample_rate=sample_rate, channels=channels)
    clip = AudioClip(data=wav, filename="audio.wav", content_type="audio/wav", language=language)
    return _answer(deps().speech.transcribe(clip, user_id=caller.sub, remaining_seconds=_remaining))


@app.post(
    "/api/v1/speech/async",
    responses=documented(
        HTTPStatus.ACCEPTED,
        "Awaiting the upload: PUT the audio to `upload_url` with `upload_headers`.",
        SpeechUploadResponse,
    ),
)
def start_async(request: Annotated[SpeechAsyncRequest, Body()]) -> Response[str]:
    caller = current_caller(app)
    if request.size_bytes > ASYNC_AUDIO_MAX_BYTES:
        raise PayloadTooLarge(
            f"size_bytes: at most {ASYNC_AUDIO_MAX_BYTES} bytes of audio", field="size_bytes"
        )
    fmt = audio_format(request.filename, request.content_type, b"")
    task_id = new_task_id()
    key = audio_key(task_id)
    speech = SpeechInput(
        audio_key=key,
        filename=request.filename,
        content_type=fmt.content_type,
        size_bytes=request.size_bytes,
        language=request.language,
    )
    try:
        task = deps().submissions.submit_speech_upload(
            caller.sub,
            speech,
            prompt=request.prompt,
            task_id=task_id,
            upload_url_ttl_seconds=deps().upload_url_ttl_seconds,
            queue_ttl_seconds=request.queue_ttl_seconds,
            priority=request.priority,
            groups=caller.groups,
            webhook_url=request.webhook_url,
            webhook_events=request.webhook_events,
        )
    except ActiveTaskLimit:
        metrics.add_metric(name="ActiveTaskLimitHits", unit=MetricUnit.Count, value=1)
        raise
    except RateLimited:
        metrics.add_metric(name="RateLimitHits", unit=MetricUnit.Count, value=1)
        raise
    rate_headers = deps().submissions.rate_headers(caller.sub)
    correlate_task(logger, task.task_id)
    ttl = deps().upload_url_ttl_seconds
    url = deps().audio.presigned_put(
        key, size_bytes=request.size_bytes, content_type=fmt.content_type, expires_in_seconds=ttl
    )
    body = SpeechUploadResponse(
        task_id=task.task_id,
        status=task.status,
        upload_url=url,
        upload_method="PUT",
        upload_headers={"Content-Type": fmt.content_type},
        expires_in=ttl,
        message="upload the audio to upload_url; the task is queued when it lands",
    )
    return Response(
        status_code=HTTPStatus.ACCEPTED.value,
        content_type=content_types.APPLICATION_JSON,
        body=body.model_dump_json(),
        headers={"Location": f"/api/v1/tasks/{task.task_id}", **rate_headers},
    )


@app.get("/api/v1/speech/transcripts/<task_id>")
def get_transcript(task_id: TaskId) -> Response[str]:
    owner = current_caller(app).sub
    task = deps().tasks.get_for_owner(task_id, owner)  # someone else's: 404
    if task.kind is not TaskKind.SPEECH:
        raise InvalidInput(f"task {task_id} is not a speech task", field="task_id")
    if task.status is not TaskStatus.DONE:
        raise TaskStateConflict(
            f"task {task_id} is {task.status.value}; its transcript comes once it is DONE",
            field="task_id",
        )
    transcript = deps().audio.get_transcript(task_id)
    if transcript is None:
        raise TaskStateConflict(f"task {task_id}'s transcript has expired", field="task_id")
    body = TranscriptResponse(code=0, **transcript.model_dump())
    return Response(HTTPStatus.OK.value, content_types.APPLICATION_JSON, body.model_dump_json())


@logger.inject_lambda_context(
    correlation_id_path=correlation_paths.API_GATEWAY_HTTP, clear_state=True
)
@tracer.capture_lambda_handler
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
