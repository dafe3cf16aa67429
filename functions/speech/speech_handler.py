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
from functools import cache
from http import HTTPStatus
from typing import Annotated, Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.openapi.params import Body, Path, Query
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue import aws_clients
from gpuqueue.api.multipart_form import parse_form
from gpuqueue.api.resolver import build_resolver, current_caller, documented
from gpuqueue.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from gpuqueue.fleet.balancer import Balancer
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.slot_broker import SlotBroker
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.gpu.speech_client import OpenAITranscriptionClient, Transcript, TranscriptResponse
from gpuqueue.intake.intake_metrics import IntakeMetrics
from gpuqueue.intake.submission import SubmissionService
from gpuqueue.models import SpeechAsyncRequest, SpeechUploadResponse
from gpuqueue.observability import Observability, correlate_task
from gpuqueue.settings import SpeechSettings
from gpuqueue.speech.audio import HEAD_BYTES, SYNC_AUDIO_MAX_BYTES, audio_format, pcm_to_wav
from gpuqueue.speech.audio_store import AudioStore
from gpuqueue.speech.speech_service import AudioClip, SpeechService
from gpuqueue.speech.speech_tasks import SpeechTasks

observed = Observability(
    correlation_id_path=correlation_paths.API_GATEWAY_HTTP, publishes_metrics=True
)
logger, metrics = observed.logger, observed.metrics
app = build_resolver()

TaskId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9-]+$")]
Language = Annotated[str | None, Query(min_length=2, max_length=16, pattern=r"^[A-Za-z-]+$")]
PCM_TYPES = ("application/octet-stream", "audio/l16", "audio/pcm")


@dataclass(frozen=True)
class Deps:
    speech: SpeechService
    speech_tasks: SpeechTasks


@cache
def deps() -> Deps:
    settings = SpeechSettings()
    dynamodb = aws_clients.dynamodb()
    registry = EndpointRegistry(dynamodb.Table(settings.endpoints_table))
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
        speech_tasks=SpeechTasks(
            SubmissionService.from_settings(settings, metrics=IntakeMetrics(metrics)),
            AudioStore(aws_clients.s3(), settings.task_files_bucket),
            upload_url_ttl_seconds=settings.upload_url_ttl_seconds,
        ),
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
    started = deps().speech_tasks.start_upload(caller.sub, request, groups=caller.groups)
    correlate_task(logger, started.answer.task_id)
    return Response(
        status_code=HTTPStatus.ACCEPTED.value,
        content_type=content_types.APPLICATION_JSON,
        body=started.answer.model_dump_json(),
        headers={"Location": f"/api/v1/tasks/{started.answer.task_id}", **started.rate_headers},
    )


@app.get("/api/v1/speech/transcripts/<task_id>")
def get_transcript(task_id: TaskId) -> Response[str]:
    transcript = deps().speech_tasks.transcript(task_id, current_caller(app).sub)
    body = TranscriptResponse(code=0, **transcript.model_dump())
    return Response(HTTPStatus.OK.value, content_types.APPLICATION_JSON, body.model_dump_json())


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
