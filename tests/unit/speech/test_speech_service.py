"""SpeechService's time budget: the retry after a slow failure still fits the invocation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from fakes import FakeClock
from gpuqueue.errors import RetryableGpuError, UpstreamFailed
from gpuqueue.fleet.slot_broker import LEASE_TAIL_SECONDS, HeldSlot, NoRoutableEndpoint, SlotRequest
from gpuqueue.gpu.speech_client import Transcript
from gpuqueue.models import Endpoint, SlotLease, TaskKind
from gpuqueue.speech.speech_service import AudioClip, SpeechService

LAMBDA_SECONDS = 29.0


def speech_endpoint(endpoint_id: str) -> Endpoint:
    return Endpoint(endpoint_id=endpoint_id, url=f"http://{endpoint_id}", kind=TaskKind.SPEECH)


@dataclass
class Slots:
    """Lends the first untried endpoint's slot, the real `HeldSlot` with its lease; taking it
    costs `take_seconds` of the clock after the lease's start (a slow control plane)."""

    endpoints: list[str]
    clock: FakeClock
    take_seconds: float = 0.0
    lease_seconds: list[float] = field(default_factory=list)

    def acquire(self, request: SlotRequest) -> HeldSlot:
        untried = [e for e in self.endpoints if e not in request.tried]
        if not untried:
            raise NoRoutableEndpoint("no other healthy speech endpoint")
        self.lease_seconds.append(request.lease_seconds)
        lease = SlotLease(
            endpoint_id=untried[0],
            slot=0,
            lease_id=f"lease-{len(self.lease_seconds)}",
            task_id=request.task_id,
            lease_until=self.clock.now + request.lease_seconds,
        )
        self.clock.now += self.take_seconds
        return HeldSlot(Registry(), lease, speech_endpoint(untried[0]))  # type: ignore[arg-type]


class Registry:
    def record_dispatch_failure(self, *_: Any, **__: Any) -> bool:
        return False

    def record_dispatch_success(self, *_: Any) -> None:
        return None

    def release_slot(self, *_: Any, **__: Any) -> None:
        return None


@dataclass
class SlowThenOk:
    """The first endpoint fails after 18 s; the next one answers."""

    clock: FakeClock
    timeouts: list[float] = field(default_factory=list)

    def transcribe(self, endpoint: Endpoint, audio: bytes, **kwargs: Any) -> Transcript:
        self.timeouts.append(kwargs["timeout_seconds"])
        if len(self.timeouts) == 1:
            self.clock.now += 18.0
            raise RetryableGpuError("HTTP 502")
        return Transcript(text="hello world")


def service(
    clock: FakeClock, transcriber: Any, endpoints: list[str], *, take_seconds: float = 0.0
) -> SpeechService:
    return SpeechService(
        registry=Registry(),  # type: ignore[arg-type]
        slots=Slots(endpoints, clock, take_seconds),  # type: ignore[arg-type]
        transcriber=transcriber,
        timeout_seconds=20,
        slot_wait_seconds=2,
        circuit_failure_threshold=3,
        retry_after_seconds=30,
        clock=clock,
    )


CLIP = AudioClip(data=b"RIFF", filename="a.wav", content_type="audio/wav")


def test_the_retry_after_a_slow_failure_gets_only_the_time_that_is_left() -> None:
    clock = FakeClock(0.0)  # seconds into the invocation
    transcriber = SlowThenOk(clock)

    transcript = service(clock, transcriber, ["a", "b"]).transcribe(
        CLIP, user_id="u", remaining_seconds=lambda: LAMBDA_SECONDS - clock.now
    )

    assert transcript.text == "hello world"
    # 29 s of Lambda, 18 s spent, 2 s kept for the answer: the retry may take 9 s, not 20.
    assert transcriber.timeouts == [20, pytest.approx(9.0)]


def test_with_no_other_endpoint_the_failure_is_reported_not_retried() -> None:
    clock = FakeClock(0.0)  # seconds into the invocation
    transcriber = SlowThenOk(clock)

    with pytest.raises(UpstreamFailed):
        service(clock, transcriber, ["a"]).transcribe(
            CLIP, user_id="u", remaining_seconds=lambda: LAMBDA_SECONDS - clock.now
        )

    assert len(transcriber.timeouts) == 1


def test_a_slow_take_shortens_the_call_to_what_is_left_of_the_slots_lease() -> None:
    """The lease starts before the writes that take the slot; when they are slow, the call
    still ends inside it (a call outliving its lease shares the GPU with the next one)."""
    clock = FakeClock(0.0)  # seconds into the invocation
    transcriber = SlowThenOk(clock)

    service(clock, transcriber, ["a", "b"], take_seconds=7.0).transcribe(
        CLIP, user_id="u", remaining_seconds=lambda: 100.0 - clock.now
    )

    # Lease 20 + 5 s from the request; 7 s gone taking it; the tail kept back.
    first_lease = 25.0
    assert transcriber.timeouts[0] == pytest.approx(first_lease - 7.0 - LEASE_TAIL_SECONDS)
