"""The `cog` adapter against the real Cog server (coglet 0.23.1 from .venv-cog), with the fake
diffusion model of local/gpuqueue_local/cog_model: one server for the module."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from gpuqueue.errors import GpuCanceled, GpuTimeout, PermanentGpuError, RetryableGpuError
from gpuqueue.fleet.health_check import probe
from gpuqueue.gpu.cog_client import CogImageClient, CogInputNames, parse_progress
from gpuqueue.models import Endpoint, EndpointProtocol, ImageParams, Task, TaskKind, TaskStatus
from gpuqueue_local.standins.cog_runner import CogServer, CogServerError

STEP_SECONDS = 0.1  # the model's time per step: 100 steps is a 10 s prediction


@pytest.fixture(scope="module")
def cog() -> Iterator[CogServer]:
    with CogServer(step_delay_s=STEP_SECONDS) as server:
        yield server


@pytest.fixture
def endpoint(cog: CogServer) -> Iterator[Endpoint]:
    yield Endpoint(
        endpoint_id="cog-real", url=cog.url, kind=TaskKind.IMAGE, protocol=EndpointProtocol.COG
    )
    # Whatever a test left running, the next one finds the server idle.
    cog.wait_status({"READY"}, timeout=15)


def task(*, steps: int = 3, width: int = 96, height: int = 64, seed: int | None = 5) -> Task:
    return Task(
        task_id=f"t{time.monotonic_ns()}",
        user_id="user-1",
        status=TaskStatus.RUNNING,
        prompt="a lighthouse at dusk",
        params=ImageParams(width=width, height=height, steps=steps, seed=seed),
        created_at="2026-12-07T10:00:00.000000Z",
        updated_at="2026-12-07T10:00:00.000000Z",
        attempt=1,
    )


class Watch:
    """Cancels when told; records the job id the adapter reports."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.jobs: list[str] = []

    def progress(self, step: int, steps: int, *, eta_seconds: float | None = None) -> None:
        return None

    def job_started(self, job_id: str) -> None:
        self.jobs.append(job_id)

    def wait_cancel(self, seconds: float) -> bool:
        return self.cancel.wait(seconds)


def run_in_thread(call: Any) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_prediction_gives_a_real_png_of_the_requested_size(endpoint: Endpoint) -> None:
    png = CogImageClient().generate(endpoint, task(width=96, height=64), timeout_seconds=30)

    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    assert image.size == (96, 64)


def test_the_same_seed_gives_the_same_image(endpoint: Endpoint) -> None:
    client = CogImageClient()

    first = client.generate(endpoint, task(seed=11), timeout_seconds=30)
    second = client.generate(endpoint, task(seed=11), timeout_seconds=30)

    assert first == second


def test_a_model_error_is_permanent_with_the_models_exception(endpoint: Endpoint) -> None:
    # The model's test input `fail_at_step` takes the seed's value here: it raises at step 2.
    client = CogImageClient(input_names=CogInputNames(seed="fail_at_step"))

    with pytest.raises(PermanentGpuError, match="model error at step 2"):
        client.generate(endpoint, task(steps=4, seed=2), timeout_seconds=30)


def test_a_busy_server_answers_retryable_and_stays_healthy(
    cog: CogServer, endpoint: Endpoint
) -> None:
    client = CogImageClient()
    watch = Watch()
    thread, outcome = run_in_thread(
        lambda: client.generate(endpoint, task(steps=100), timeout_seconds=30, watch=watch)
    )
    cog.wait_status({"BUSY"}, timeout=10)

    with pytest.raises(RetryableGpuError, match="409"):
        client.generate(endpoint, task(steps=2), timeout_seconds=30)
    health = probe(requests.Session(), endpoint, timeout_seconds=2)

    watch.cancel.set()
    thread.join(timeout=10)
    assert health.healthy, health.error
    assert isinstance(outcome.get("error"), GpuCanceled)


def test_a_cancel_stops_the_running_prediction_within_two_seconds(
    cog: CogServer, endpoint: Endpoint
) -> None:
    client = CogImageClient()
    watch = Watch()
    thread, outcome = run_in_thread(
        lambda: client.generate(endpoint, task(steps=100), timeout_seconds=60, watch=watch)
    )
    cog.wait_status({"BUSY"}, timeout=10)

    asked = time.monotonic()
    watch.cancel.set()
    thread.join(timeout=10)
    took = time.monotonic() - asked

    assert isinstance(outcome.get("error"), GpuCanceled)
    assert took < 2.0
    assert cog.wait_status({"READY"}, timeout=2) == "READY"
    assert len(watch.jobs) == 1
    cancel_lines = [line for line in cog.recent_logs() if "Cancelling prediction" in line]
    assert any(watch.jobs[0] in line for line in cancel_lines)


def test_a_call_past_its_deadline_times_out_and_cog_frees_the_slot(
    cog: CogServer, endpoint: Endpoint
) -> None:
    with pytest.raises(GpuTimeout):
        CogImageClient().generate(endpoint, task(steps=100), timeout_seconds=1)

    # Hanging up cancels a sync prediction: the server is free again at once.
    assert cog.wait_status({"READY"}, timeout=3) == "READY"


def test_an_idle_server_is_healthy(endpoint: Endpoint) -> None:
    result = probe(requests.Session(), endpoint, timeout_seconds=2)

    assert result.healthy, result.error


def test_the_real_logs_carry_progress_parse_progress_reads(cog: CogServer) -> None:
    # The sync answer carries the prediction's logs: the tqdm bar the model draws on stderr.
    answer = requests.put(
        f"{cog.url}/predictions/logs-check",
        json={"input": {"num_inference_steps": 4, "width": 64, "height": 64}},
        timeout=30,
    ).json()

    assert answer["status"] == "succeeded"
    assert parse_progress(answer["logs"]) == (4, 4)


def test_the_runner_says_how_to_build_a_missing_venv(tmp_path: Any) -> None:
    with pytest.raises(CogServerError, match="make venv"):
        CogServer(venv=tmp_path / "no-venv").start()


def test_a_model_whose_setup_fails_is_reported_not_waited_for(tmp_path: Any) -> None:
    (tmp_path / "predict.py").write_text(
        "import cog\n"
        "class Predictor(cog.BasePredictor):\n"
        "    def setup(self):\n"
        "        raise RuntimeError('no weights here')\n"
        "    def predict(self, prompt: str = '') -> str:\n"
        "        return prompt\n"
    )
    server = CogServer(model_dir=tmp_path)

    with pytest.raises(CogServerError, match=r"SETUP_FAILED.*no weights here"):
        server.start(timeout=30)
    assert server.stopped
