"""Synchronous speech-to-text: one call through a healthy speech endpoint's free slot.

Speech is the fast path (~100 ms on a GPU), so it is answered in the request, but it
still goes through the endpoints table: a dead speech server is never called, and an
endpoint never gets more concurrent calls than its capacity. A connect error or 5xx is
retried once on another healthy endpoint; a timeout is not (the caller's 30 s are gone).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from aws_lambda_powertools import Logger

from gpuqueue.errors import (
    GpuTimeout,
    PermanentGpuError,
    RetryableGpuError,
    ServiceUnavailable,
    UnprocessableAudio,
    UpstreamFailed,
    UpstreamTimeout,
)
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.slot_broker import NoFreeSlot, NoRoutableEndpoint, SlotBroker, SlotRequest
from gpuqueue.gpu.speech_client import SpeechTranscriber, Transcript
from gpuqueue.models import TaskKind

logger = Logger(child=True)

ATTEMPTS = 2  # the call, and one retry on another endpoint
# Kept back from the invocation's remaining time for the answer itself.
MARGIN_SECONDS = 2.0
# Below this much time a call (or the retry) is not worth starting.
MIN_CALL_SECONDS = 1.0


@dataclass(frozen=True)
class AudioClip:
    data: bytes
    filename: str
    content_type: str
    language: str | None = None
    prompt: str | None = None


class SpeechService:
    def __init__(
        self,
        *,
        registry: EndpointRegistry,
        slots: SlotBroker,
        transcriber: SpeechTranscriber,
        timeout_seconds: float,
        slot_wait_seconds: float,
        circuit_failure_threshold: int,
        retry_after_seconds: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._slots = slots
        self._transcriber = transcriber
        self._timeout = timeout_seconds
        self._slot_wait = slot_wait_seconds
        self._threshold = circuit_failure_threshold
        self._retry_after = retry_after_seconds
        self._clock = clock

    def transcribe(
        self,
        clip: AudioClip,
        *,
        user_id: str,
        remaining_seconds: Callable[[], float] = lambda: float("inf"),
    ) -> Transcript:
        """One transcription; each call's timeout also fits what is left of the invocation,
        so a slow failure followed by the retry never outlives the Lambda (or API Gateway)."""
        tried: list[str] = []
        failures: list[str] = []
        for _ in range(ATTEMPTS):
            timeout = min(self._timeout, remaining_seconds() - MARGIN_SECONDS)
            if timeout < MIN_CALL_SECONDS:
                if failures:
                    break
                raise UpstreamTimeout("no time left for a transcription call")
            request = SlotRequest(
                kind=TaskKind.SPEECH,
                task_id=f"sync-{uuid.uuid4()}",
                user_id=user_id,
                lease_seconds=timeout + 5,
                wait_seconds=self._slot_wait,
                tried=tried,
                untried_only=bool(tried),
            )
            try:
                slot = self._slots.acquire(request)
            except NoRoutableEndpoint as error:
                if failures:
                    break  # nobody else to ask: report what the tried endpoints did
                raise ServiceUnavailable(
                    str(error), retry_after_seconds=self._retry_after
                ) from error
            except NoFreeSlot as error:
                raise ServiceUnavailable(str(error), retry_after_seconds=1) from error
            endpoint = slot.endpoint
            # The wait for the slot came out of the same budget, and the call must end inside
            # the slot's lease (set before the wait).
            timeout = min(
                timeout,
                remaining_seconds() - MARGIN_SECONDS,
                slot.seconds_for_a_call(self._clock()),
            )
            if timeout < MIN_CALL_SECONDS:
                slot.release()
                raise UpstreamTimeout("no time left for a transcription call")
            started = self._clock()
            try:
                transcript = self._transcriber.transcribe(
                    endpoint,
                    clip.data,
                    filename=clip.filename,
                    content_type=clip.content_type,
                    language=clip.language,
                    prompt=clip.prompt,
                    timeout_seconds=timeout,
                )
            except GpuTimeout as error:
                slot.keep_until_lease_ends()  # the endpoint may still be transcribing
                self._count_failure(endpoint.endpoint_id)
                raise UpstreamTimeout(
                    f"the speech endpoint did not answer within {timeout:g} s"
                ) from error
            except RetryableGpuError as error:
                slot.release()
                self._count_failure(endpoint.endpoint_id)
                tried.append(endpoint.endpoint_id)
                failures.append(f"{endpoint.endpoint_id}: {error}")
                logger.warning(
                    "speech endpoint failed", extra={"endpoint_id": endpoint.endpoint_id}
                )
                continue
            except PermanentGpuError as error:
                slot.release()
                raise UnprocessableAudio(
                    f"the speech endpoint could not transcribe the audio: {error}", field="file"
                ) from error
            slot.release(call_seconds=self._clock() - started)
            self._registry.record_dispatch_success(endpoint)
            return transcript
        raise UpstreamFailed("speech endpoints failed: " + "; ".join(failures))

    def _count_failure(self, endpoint_id: str) -> None:
        if self._registry.record_dispatch_failure(
            endpoint_id, threshold=self._threshold, now=self._clock()
        ):
            logger.warning("circuit opened", extra={"endpoint_id": endpoint_id})
