"""What a task kind does with a GPU slot: the dispatcher is generic over these.

A job prepares its input before a slot is taken (so a bad input fails the task without
blaming an endpoint), runs one call on the endpoint while the slot is held, and stores
the output after the slot is handed on.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpuqueue.audio_store import AudioStore
from gpuqueue.gpu_client import ImageGenerator
from gpuqueue.image_store import ImageStore
from gpuqueue.models import Endpoint, EndpointProtocol, Task
from gpuqueue.speech_client import SpeechTranscriber, Transcript

# A DONE speech task carries this much of its text on the row; the whole transcript is in S3.
TEXT_PREVIEW_CHARS = 4000


class InvalidTaskInput(Exception):
    """The task cannot run whatever the endpoint (its upload is missing, say): fail it."""


@dataclass(frozen=True)
class Completion:
    result_key: str
    fields: dict[str, Any] = field(default_factory=dict)  # extra attributes for the task row


class Job(Protocol):
    # Whether `prepare` may wait for the invocation's memory (a speech task's audio, one at
    # a time): such a task is prepared before a slot is taken or the task claimed, never
    # straight onto a slot its worker kept.
    waits_for_memory: bool

    def prepare(self, task: Task) -> Any:
        """The call's input; raises InvalidTaskInput. Once it returns, `release` follows."""
        ...

    def release(self, job_input: Any) -> None:
        """The input is no longer needed (the call ended, or never happened)."""
        ...

    def run(self, endpoint: Endpoint, task: Task, job_input: Any, *, timeout_seconds: float) -> Any:
        """One GPU call; raises GpuError."""
        ...

    def store(self, task: Task, output: Any) -> Completion: ...


class ImageJob:
    def __init__(
        self, generators: Mapping[EndpointProtocol, ImageGenerator], images: ImageStore
    ) -> None:
        self._generators = generators
        self._images = images

    waits_for_memory = False

    def prepare(self, task: Task) -> None:
        return None

    def release(self, job_input: None) -> None:
        return None

    def run(
        self, endpoint: Endpoint, task: Task, job_input: None, *, timeout_seconds: float
    ) -> bytes:
        return self._generators[endpoint.protocol].generate(
            endpoint, task, timeout_seconds=timeout_seconds
        )

    def store(self, task: Task, output: bytes) -> Completion:
        return Completion(result_key=self._images.put_png(task.task_id, output))


class SpeechJob:
    """A transcription. Its audio (up to the upload limit) is held in memory twice during
    the call (the bytes and the multipart body), so an invocation running several calls at
    once holds one audio at a time: the dispatcher's memory is sized for one."""

    waits_for_memory = True

    def __init__(
        self,
        transcriber: SpeechTranscriber,
        audio: AudioStore,
        *,
        audio_in_memory: threading.Semaphore | None = None,
    ) -> None:
        self._transcriber = transcriber
        self._audio = audio
        self._permits = audio_in_memory or threading.BoundedSemaphore(1)

    def prepare(self, task: Task) -> bytes:
        if task.speech is None:
            raise InvalidTaskInput("speech task without audio")
        self._permits.acquire()
        try:
            audio = self._audio.get(task.speech.audio_key)
        except BaseException:
            self._permits.release()
            raise
        if audio is None:
            self._permits.release()
            raise InvalidTaskInput("the uploaded audio is gone")
        return audio

    def release(self, job_input: bytes) -> None:
        self._permits.release()

    def run(
        self, endpoint: Endpoint, task: Task, job_input: bytes, *, timeout_seconds: float
    ) -> Transcript:
        assert task.speech is not None  # prepare() checked
        return self._transcriber.transcribe(
            endpoint,
            job_input,
            filename=task.speech.filename,
            content_type=task.speech.content_type,
            language=task.speech.language,
            prompt=task.prompt or None,
            timeout_seconds=timeout_seconds,
        )

    def store(self, task: Task, output: Transcript) -> Completion:
        return Completion(
            result_key=self._audio.put_transcript(task.task_id, output),
            fields={"transcript_text": output.text[:TEXT_PREVIEW_CHARS]},
        )
