"""Long audio as a task, one call per route: announced (a presigned PUT URL for the audio;
the task is queued when the upload lands, gpuqueue.intake.submission.queue_uploaded), and
its transcript once it is DONE. Someone else's task is answered as a missing one (404)."""

from __future__ import annotations

from dataclasses import dataclass

from gpuqueue.errors import InvalidInput, PayloadTooLarge, TaskStateConflict
from gpuqueue.gpu.speech_client import Transcript
from gpuqueue.intake.submission import SubmissionService
from gpuqueue.models import (
    SpeechAsyncRequest,
    SpeechInput,
    SpeechUploadResponse,
    TaskKind,
    TaskStatus,
)
from gpuqueue.speech.audio import ASYNC_AUDIO_MAX_BYTES, audio_format
from gpuqueue.speech.audio_store import AudioStore, audio_key
from gpuqueue.store.task_ids import new_task_id


@dataclass(frozen=True)
class UploadStarted:
    answer: SpeechUploadResponse  # the 202's body: where and how to PUT the audio
    rate_headers: dict[str, str]  # X-RateLimit-*


class SpeechTasks:
    def __init__(
        self,
        submissions: SubmissionService,
        audio: AudioStore,
        *,
        upload_url_ttl_seconds: int,
    ) -> None:
        self._submissions = submissions
        self._audio = audio
        self._upload_url_ttl = upload_url_ttl_seconds

    def start_upload(
        self, owner: str, request: SpeechAsyncRequest, *, groups: frozenset[str]
    ) -> UploadStarted:
        """An AWAITING_UPLOAD task under the owner's limits (RateLimited, ActiveTaskLimit,
        QueueFull...), and a PUT URL signed for exactly the announced size and type."""
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
        ttl = self._upload_url_ttl
        task = self._submissions.submit_speech_upload(
            owner,
            speech,
            prompt=request.prompt,
            task_id=task_id,
            upload_url_ttl_seconds=ttl,
            queue_ttl_seconds=request.queue_ttl_seconds,
            priority=request.priority,
            groups=groups,
            webhook_url=request.webhook_url,
            webhook_events=request.webhook_events,
        )
        rate_headers = self._submissions.rate_headers(owner)
        url = self._audio.presigned_put(
            key,
            size_bytes=request.size_bytes,
            content_type=fmt.content_type,
            expires_in_seconds=ttl,
        )
        answer = SpeechUploadResponse(
            task_id=task.task_id,
            status=task.status,
            upload_url=url,
            upload_method="PUT",
            upload_headers={"Content-Type": fmt.content_type},
            expires_in=ttl,
            message="upload the audio to upload_url; the task is queued when it lands",
        )
        return UploadStarted(answer, rate_headers)

    def transcript(self, task_id: str, owner: str) -> Transcript:
        """A DONE speech task's transcript; TaskStateConflict before, or once it expired."""
        task = self._submissions.tasks.get_for_owner(task_id, owner)
        if task.kind is not TaskKind.SPEECH:
            raise InvalidInput(f"task {task_id} is not a speech task", field="task_id")
        if task.status is not TaskStatus.DONE:
            raise TaskStateConflict(
                f"task {task_id} is {task.status.value}; its transcript comes once it is DONE",
                field="task_id",
            )
        transcript = self._audio.get_transcript(task_id)
        if transcript is None:
            raise TaskStateConflict(f"task {task_id}'s transcript has expired", field="task_id")
        return transcript
