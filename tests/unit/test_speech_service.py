"""SpeechService's time budget: the retry after a slow failure still fits the invocation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from gpuqueue.errors import RetryableGpuError, UpstreamFailed
from gpuqueue.models import Endpoint, TaskKind
from gpuqueue.slot_broker import NoRoutableEndpoint, SlotRequest
from gpuqueue.speech_client import Transcript
from gpuqueue.speech_service import AudioClip, SpeechService

LAMBDA_SECONDS = 29.0


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def speech_endpoint(endpoint_id: str) -> Endpoint:
    return Endpoint(endpoint_id=endpoint_id, url=f"http://{endpoint_id}", kind=TaskKind.SPEECH)


@dataclass
class Slot:
    endpoint: Endpoint

    def release(self, **_: Any) -> None:
        return None


@dataclass
class Slots:
    endpoints: list[str]

    def acquire(self, request: SlotRequest) -> Slot:
        untried = [e for e in self.endpoints if e not in request.tried]
        if not untried:
            raise NoRoutableEndpoint("no other healthy speech endpoint")
        return Slot(speech_endpoint(untried[0]))


class Registry:
    def record_dispatch_failure(self, *_: Any, **__: Any) -> bool:
        return False

    def record_dispatch_success(self, *_: Any) -> None:
        return None


@dataclass
class SlowThenOk:
    """The first endpoint fails after 18 s; the next one answers."""

    clock: Clock
    timeouts: list[float] = field(default_factory=list)

    def transcribe(self, endpoint: Endpoint, audio: bytes, **kwargs: Any) -> Transcript:
        self.timeouts.append(kwargs["timeout_seconds"])
        if len(self.timeouts) == 1:
            self.clock.now += 18.0
            raise RetryableGpuError("HTTP 502")
        return Transcript(text="hello world")


def service(clock: Clock, transcriber: Any, endpoints: list[str]) -> SpeechService:
    return SpeechService(
        registry=Registry(),  # type: ignore[arg-type]
        slots=Slots(endpoints),  # type: ignore[arg-type]
        transcriber=transcriber,
        timeout_seconds=20,
        slot_wait_seconds=2,
        circuit_failure_threshold=3,
        retry_after_seconds=30,
        clock=clock,
    )


CLIP = AudioClip(data=b"RIFF", filename="a.wav", content_type="audio/wav")


def test_the_retry_after_a_slow_failure_gets_only_the_time_that_is_left() -> None:
    clock = Clock()
    transcriber = SlowThenOk(clock)

    transcript = service(clock, transcriber, ["a", "b"]).transcribe(
        CLIP, user_id="u", remaining_seconds=lambda: LAMBDA_SECONDS - clock.now
    )

    assert transcript.text == "hello world"
    # 29 s of Lambda, 18 s spent, 2 s kept for the answer: the retry may take 9 s, not 20.
    assert transcriber.timeouts == [20, pytest.approx(9.0)]


def test_with_no_other_endpoint_the_failure_is_reported_not_retried() -> None:
    clock = Clock()
    transcriber = SlowThenOk(clock)

    with pytest.raises(UpstreamFailed):
        service(clock, transcriber, ["a"]).transcribe(
            CLIP, user_id="u", remaining_seconds=lambda: LAMBDA_SECONDS - clock.now
        )

    assert len(transcriber.timeouts) == 1
