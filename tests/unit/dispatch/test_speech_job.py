"""SpeechJob: the upload is checked before a slot is taken (nothing read), then streamed into
the call, never held whole, so calls run side by side; the answer's memory is reserved from
the invocation's budget and given back."""

from __future__ import annotations

import io
import threading
from typing import Any

import pytest

from gpuqueue.dispatch.jobs import InvalidTaskInput, SpeechJob
from gpuqueue.errors import PermanentGpuError
from gpuqueue.gpu.memory_budget import MemoryBudget, MemoryHold
from gpuqueue.gpu.speech_client import AudioStream, Transcript
from gpuqueue.models import SpeechInput, Task, TaskKind, TaskStatus

DEADLINE = 10.0


class Reader(io.BytesIO):
    pass


class Audio:
    """The bucket: sizes by HEAD, bodies by GET (counted)."""

    def __init__(self, *, gone: bool = False, gone_later: bool = False) -> None:
        self.gone = gone
        self.gone_later = gone_later
        self.heads = 0
        self.opened: list[Reader] = []

    def size(self, key: str) -> int | None:
        self.heads += 1
        return None if self.gone else len(b"RIFF" + key.encode())

    def stream(self, key: str) -> AudioStream | None:
        if self.gone or self.gone_later:
            return None
        reader = Reader(b"RIFF" + key.encode())
        self.opened.append(reader)
        return AudioStream(size=len(reader.getvalue()), reader=reader)


class Transcriber:
    """Reads the audio as a request would; waits at a barrier so two calls must overlap."""

    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self.barrier = barrier
        self.heard: list[bytes] = []
        self.holds: list[MemoryHold | None] = []

    def transcribe(self, endpoint: Any, audio: bytes | AudioStream, **kwargs: Any) -> Transcript:
        assert isinstance(audio, AudioStream)
        self.holds.append(kwargs["hold"])
        kwargs["hold"].reserve(1000, within=DEADLINE)
        if self.barrier is not None:
            self.barrier.wait(DEADLINE)
        self.heard.append(audio.reader.read(audio.size))
        return Transcript(text="hello")


def speech_task(task_id: str) -> Task:
    return Task(
        task_id=task_id,
        user_id="u-1",
        kind=TaskKind.SPEECH,
        status=TaskStatus.QUEUED,
        prompt="",
        created_at="2026-12-06T10:00:00Z",
        updated_at="2026-12-06T10:00:00Z",
        speech=SpeechInput(
            audio_key=f"audio/{task_id}", filename="a.wav", content_type="audio/wav", size_bytes=8
        ),
    )


def job(audio: Audio, transcriber: Transcriber, memory: MemoryBudget | None = None) -> SpeechJob:
    return SpeechJob(transcriber, audio, memory=memory)  # type: ignore[arg-type]


def test_two_calls_stream_their_audio_side_by_side_and_close_it() -> None:
    audio = Audio()
    transcriber = Transcriber(threading.Barrier(2))
    speech = job(audio, transcriber, MemoryBudget(10_000))
    results: list[Transcript] = []

    def call(task_id: str) -> None:
        task = speech_task(task_id)
        speech.prepare(task)
        results.append(speech.run(None, task, None, timeout_seconds=5))  # type: ignore[arg-type]

    threads = [threading.Thread(target=call, args=(t,)) for t in ("t-1", "t-2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(DEADLINE)

    # Neither waited for the other (the barrier needs both at once); each read its own.
    assert [r.text for r in results] == ["hello", "hello"]
    assert sorted(transcriber.heard) == [b"RIFFaudio/t-1", b"RIFFaudio/t-2"]
    assert audio.heads == 2
    assert all(reader.closed for reader in audio.opened)


def test_prepare_checks_the_upload_without_reading_it() -> None:
    audio = Audio()

    job(audio, Transcriber()).prepare(speech_task("t-1"))

    assert (audio.heads, audio.opened) == (1, [])


def test_a_missing_upload_fails_the_task_before_any_slot() -> None:
    with pytest.raises(InvalidTaskInput, match="gone"):
        job(Audio(gone=True), Transcriber()).prepare(speech_task("t-1"))


def test_a_speech_task_without_audio_fails_without_a_read() -> None:
    audio = Audio()
    task = speech_task("t-1").model_copy(update={"speech": None})

    with pytest.raises(InvalidTaskInput, match="without audio"):
        job(audio, Transcriber()).prepare(task)
    assert audio.heads == 0


def test_an_upload_deleted_between_check_and_call_fails_the_call() -> None:
    speech = job(Audio(gone_later=True), Transcriber())
    task = speech_task("t-1")
    speech.prepare(task)

    with pytest.raises(PermanentGpuError, match="gone"):
        speech.run(None, task, None, timeout_seconds=5)  # type: ignore[arg-type]


def test_the_transcriber_gets_a_hold_on_the_invocations_budget() -> None:
    budget = MemoryBudget(10_000)
    transcriber = Transcriber()
    speech = job(Audio(), transcriber, budget)

    speech.run(None, speech_task("t-1"), None, timeout_seconds=5)  # type: ignore[arg-type]

    [hold] = transcriber.holds
    assert hold is not None
    # The fake reserved 1,000 bytes and does not give them back: the real client does.
    assert budget.used == 1000
    hold.release()
    assert budget.used == 0
