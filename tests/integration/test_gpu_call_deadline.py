"""A GPU call ends at its deadline, however the server sends its answer.

`requests`' read timeout bounds each read, so a server that drips its answer (each piece well
within the timeout) used to keep a call going past its budget and past its slot's lease, and
the slot went to another call while the GPU was still busy with this one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpuqueue.errors import GpuTimeout
from gpuqueue.gpu.image_client import image_generators
from gpuqueue.gpu.speech_client import OpenAITranscriptionClient
from gpuqueue.models import Endpoint, EndpointProtocol, ImageParams, Task, TaskKind, TaskStatus
from gpuqueue_local.standins.fault_knobs import DRIP_PIECES
from gpuqueue_local.standins.image_server import ImageServer, ImageServerKnobs
from gpuqueue_local.standins.speech_server import SpeechServer, SpeechServerKnobs

BUDGET_SECONDS = 1.5
DRIP_SECONDS = 0.4  # each piece 0.4 s apart: every read well within the budget, the whole not
# The protocols the dripping stand-in speaks (ComfyUI's deadline: test_comfyui_adapter.py).
DRIPPING_PROTOCOLS = [EndpointProtocol.OPENAI, EndpointProtocol.A1111]


@pytest.fixture
def dripping() -> Iterator[ImageServer]:
    server = ImageServer(knobs=ImageServerKnobs(drip_s=DRIP_SECONDS))
    server.start()
    yield server
    server.stop()


def _endpoint(server: ImageServer, protocol: EndpointProtocol) -> Endpoint:
    return Endpoint(endpoint_id="drip", url=server.url, kind=TaskKind.IMAGE, protocol=protocol)


def _task() -> Task:
    return Task(
        task_id="t-1",
        user_id="u-1",
        status=TaskStatus.RUNNING,
        prompt="a lighthouse at dusk",
        params=ImageParams(width=64, height=64, steps=4),
        created_at="2026-12-06T00:00:00.000000Z",
        updated_at="2026-12-06T00:00:00.000000Z",
    )


@pytest.mark.parametrize("protocol", DRIPPING_PROTOCOLS)
def test_a_dripping_answer_is_a_timeout_at_the_calls_budget(
    dripping: ImageServer, protocol: EndpointProtocol
) -> None:
    assert (DRIP_PIECES - 1) * DRIP_SECONDS > 2 * BUDGET_SECONDS  # the drip outlasts the budget
    endpoint = _endpoint(dripping, protocol)

    with pytest.raises(GpuTimeout, match="timed out"):
        image_generators()[protocol].generate(endpoint, _task(), timeout_seconds=BUDGET_SECONDS)


@pytest.mark.parametrize("protocol", DRIPPING_PROTOCOLS)
def test_an_answer_within_the_budget_is_read_whole(
    dripping: ImageServer, protocol: EndpointProtocol
) -> None:
    dripping.set_knobs({"drip_s": 0.01})
    endpoint = _endpoint(dripping, protocol)

    png = image_generators()[protocol].generate(endpoint, _task(), timeout_seconds=10)

    assert png.startswith(b"\x89PNG")


def test_a_dripping_speech_answer_is_a_timeout_at_the_calls_budget() -> None:
    server = SpeechServer(knobs=SpeechServerKnobs(drip_s=DRIP_SECONDS))
    server.start()
    try:
        endpoint = Endpoint(endpoint_id="drip", url=server.url, kind=TaskKind.SPEECH)
        with pytest.raises(GpuTimeout, match="timed out"):
            OpenAITranscriptionClient().transcribe(
                endpoint,
                b"not audio: answered with a 400, dripped like any answer",
                filename="a.wav",
                content_type="audio/wav",
                language=None,
                prompt=None,
                timeout_seconds=BUDGET_SECONDS,
            )
    finally:
        server.stop()
