"""What a task kind does with a GPU slot: the dispatcher is generic over these.

A job prepares its input before a slot is taken (so a bad input fails the task without
blaming an endpoint), runs one call on the endpoint while the slot is held, and stores
the output after the slot is handed on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpuqueue.errors import PermanentGpuError
from gpuqueue.gpu.call_watch import NO_WATCH, CallWatch
from gpuqueue.gpu.image_client import ImageGenerator
from gpuqueue.gpu.memory_budget import MemoryBudget, MemoryHold
from gpuqueue.gpu.speech_client import SpeechTranscriber, Transcript
from gpuqueue.models import Endpoint, EndpointProtocol, Task
from gpuqueue.speech.audio_store import AudioStore
from gpuqueue.store.image_store import ImageStore

# A DONE speech task carries this much of its text on the row; the whole transcript is in S3.
TEXT_PREVIEW_CHARS = 4000


class InvalidTaskInput(Exception):
    """The task cannot run whatever the endpoint (its upload is missing, say): fail it."""


@dataclass(frozen=True)
class Completion:
    result_key: str
    fields: dict[str, Any] = field(default_factory=dict)  # extra attributes for the task row


class Job(Protocol):
    # Whether `prepare` reads something that may be missing (a speech task's upload): such
    # a task is prepared before a slot is taken or the task claimed, so a missing input
    # fails it with no slot held, never straight onto a slot its worker kept.
    checks_input_first: bool

    def prepare(self, task: Task) -> Any:
        """The call's input; raises InvalidTaskInput. Once it returns, `release` follows."""
        ...

    def release(self, job_input: Any) -> None:
        """The input is no longer needed (the call ended, or never happened)."""
        ...

    def run(
        self,
        endpoint: Endpoint,
        task: Task,
        job_input: Any,
        *,
        timeout_seconds: float,
        watch: CallWatch = NO_WATCH,
    ) -> Any:
        """One GPU call, reporting to `watch`; raises GpuError (GpuCanceled: its owner
        canceled it and the server stopped)."""
        ...

    def store(self, task: Task, output: Any) -> Completion: ...


@dataclass(frozen=True)
class HeldPng:
    """A call's image and its share of the memory budget, given back once stored."""

    png: bytes
    hold: MemoryHold


class ImageJob:
    """An image: its answer's memory is reserved as it arrives (memory_budget.py), the PNG
    stays counted until stored."""

    checks_input_first = False

    def __init__(
        self,
        generators: Mapping[EndpointProtocol, ImageGenerator],
        images: ImageStore,
        *,
        memory: MemoryBudget | None = None,
    ) -> None:
        self._generators = generators
        self._images = images
        self._memory = memory or MemoryBudget(None)

    def prepare(self, task: Task) -> None:
        return None

    def release(self, job_input: None) -> None:
        return None

    def run(
        self,
        endpoint: Endpoint,
        task: Task,
        job_input: None,
        *,
        timeout_seconds: float,
        watch: CallWatch = NO_WATCH,
    ) -> HeldPng:
        hold = self._memory.hold()
        try:
            png = self._generators[endpoint.protocol].generate(
                endpoint, task, timeout_seconds=timeout_seconds, hold=hold, watch=watch
            )
        except BaseException:
            hold.release()
            raise
        return HeldPng(png, hold)

    def store(self, task: Task, output: HeldPng) -> Completion:
        try:
            return Completion(result_key=self._images.put_png(task.task_id, output.png))
        finally:
            output.hold.release()


class SpeechJob:
    """A transcription. Its audio (up to the upload limit) is streamed from S3 into the
    request as it is sent, never held whole, so calls side by side cost the answers only."""

    checks_input_first = True

    def __init__(
        self,
        transcriber: SpeechTranscriber,
        audio: AudioStore,
        *,
        memory: MemoryBudget | None = None,
    ) -> None:
        self._transcriber = transcriber
        self._audio = audio
        self._memory = memory or MemoryBudget(None)

    def prepare(self, task: Task) -> None:
        if task.speech is None:
            raise InvalidTaskInput("speech task without audio")
        if self._audio.size(task.speech.audio_key) is None:
            raise InvalidTaskInput("the uploaded audio is gone")

    def release(self, job_input: None) -> None:
        return None

    def run(
        self,
        endpoint: Endpoint,
        task: Task,
        job_input: None,
        *,
        timeout_seconds: float,
        watch: CallWatch = NO_WATCH,
    ) -> Transcript:
        assert task.speech is not None  # prepare() checked
        audio = self._audio.stream(task.speech.audio_key)
        if audio is None:  # deleted since prepare() saw it
            raise PermanentGpuError("the uploaded audio is gone")
        try:
            return self._transcriber.transcribe(
                endpoint,
                audio,
                filename=task.speech.filename,
                content_type=task.speech.content_type,
                language=task.speech.language,
                prompt=task.prompt or None,
                timeout_seconds=timeout_seconds,
                hold=self._memory.hold(),
            )
        finally:
            audio.close()

    def store(self, task: Task, output: Transcript) -> Completion:
        return Completion(
            result_key=self._audio.put_transcript(task.task_id, output),
            fields={"transcript_text": output.text[:TEXT_PREVIEW_CHARS]},
        )
