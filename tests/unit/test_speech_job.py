"""SpeechJob: one invocation holds one task's audio in memory at a time, however many calls
its workers run, and every audio it took is given back."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from gpuqueue.jobs import InvalidTaskInput, SpeechJob
from gpuqueue.models import SpeechInput, Task, TaskKind, TaskStatus

DEADLINE = 10.0


class Audio:
    def __init__(self, *, gone: bool = False, broken: bool = False) -> None:
        self.gone = gone
        self.broken = broken
        self.reads = 0

    def get(self, key: str) -> bytes | None:
        self.reads += 1
        if self.broken:
            raise OSError("S3 read failed")
        return None if self.gone else b"RIFF" + key.encode()


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


def job(audio: Audio, permits: threading.Semaphore | None = None) -> SpeechJob:
    return SpeechJob(transcriber=None, audio=audio, audio_in_memory=permits)  # type: ignore[arg-type]


def free(permits: threading.Semaphore) -> bool:
    """Whether the invocation's one place for audio is free (taken and given back to see)."""
    if not permits.acquire(blocking=False):
        return False
    permits.release()
    return True


def test_a_second_audio_waits_until_the_first_is_released():
    speech = job(Audio())
    first = speech.prepare(speech_task("t-1"))
    second: list[Any] = []
    waiting = threading.Thread(target=lambda: second.append(speech.prepare(speech_task("t-2"))))
    waiting.start()

    waiting.join(0.2)
    assert waiting.is_alive()  # held back while the first is in memory
    assert second == []

    speech.release(first)
    waiting.join(DEADLINE)
    assert second == [b"RIFFaudio/t-2"]
    speech.release(second[0])


@pytest.mark.parametrize("audio", [Audio(gone=True), Audio(broken=True)])
def test_an_audio_that_cannot_be_read_gives_its_place_back(audio):
    permits = threading.BoundedSemaphore(1)
    speech = job(audio, permits)

    with pytest.raises((InvalidTaskInput, OSError)):
        speech.prepare(speech_task("t-1"))

    assert free(permits)


def test_a_prepared_audio_holds_the_place_until_released():
    permits = threading.BoundedSemaphore(1)
    speech = job(Audio(), permits)

    audio = speech.prepare(speech_task("t-1"))
    assert not free(permits)
    speech.release(audio)
    assert free(permits)


def test_a_speech_task_without_audio_fails_without_taking_a_place():
    permits = threading.BoundedSemaphore(1)
    speech = job(Audio(), permits)
    task = speech_task("t-1").model_copy(update={"speech": None})

    with pytest.raises(InvalidTaskInput, match="without audio"):
        speech.prepare(task)
    assert free(permits)
