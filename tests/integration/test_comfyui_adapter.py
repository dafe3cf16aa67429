"""The ComfyUI adapter against the stand-in ComfyUI (its HTTP and ws API on one port): a
prompt followed to its PNG with rising progress, a cancel that deletes a waiting prompt or
interrupts the running one, ComfyUI's failures mapped to retryable or permanent, the
/history fallback without a socket, /system_stats health, and the workflow kept in the
endpoints table."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from gpuqueue.errors import GpuCanceled, GpuTimeout, PermanentGpuError, RetryableGpuError
from gpuqueue.fleet.endpoint_declarations import DeclaredEndpoint
from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.fleet.endpoint_specs import default_workflow
from gpuqueue.fleet.health_check import probe
from gpuqueue.gpu.comfyui_client import ComfyUIImageClient, patched_graph
from gpuqueue.gpu.image_client import PNG_MAGIC, image_generators
from gpuqueue.models import (
    ComfyWorkflow,
    Endpoint,
    EndpointProtocol,
    ImageParams,
    Task,
    TaskKind,
    TaskStatus,
)
from gpuqueue_local.standins.comfyui_server import DEFAULT_CHECKPOINT, ComfyUIServer
from gpuqueue_local.standins.image_server import ImageServer

WORKFLOW = ComfyWorkflow.model_validate(default_workflow(DEFAULT_CHECKPOINT))


class RecordingWatch:
    """A CallWatch whose cancel a test sets; records progress and the job id."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int]] = []
        self.job_id: str | None = None
        self.cancel = threading.Event()

    def progress(self, step: int, steps: int, *, eta_seconds: float | None = None) -> None:
        self.steps.append((step, steps))

    def job_started(self, job_id: str) -> None:
        self.job_id = job_id

    def wait_cancel(self, seconds: float) -> bool:
        return self.cancel.wait(seconds)


@pytest.fixture
def comfy() -> Iterator[ComfyUIServer]:
    with ComfyUIServer() as server:
        yield server


def endpoint_of(server: ComfyUIServer, workflow: ComfyWorkflow = WORKFLOW) -> Endpoint:
    return Endpoint(
        endpoint_id="comfy-1",
        url=server.url,
        kind=TaskKind.IMAGE,
        protocol=EndpointProtocol.COMFYUI,
        workflow=workflow,
    )


def task(prompt: str = "a lighthouse at dusk", steps: int = 10) -> Task:
    return Task(
        task_id=f"task-{prompt[:8]}",
        user_id="u-1",
        status=TaskStatus.RUNNING,
        prompt=prompt,
        params=ImageParams(width=320, height=256, steps=steps, seed=5),
        created_at="2026-01-27T10:00:00.000000Z",
        updated_at="2026-01-27T10:00:00.000000Z",
    )


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class Running:
    """A generate call on a thread: its result or error once it ends."""

    def __init__(self, call: Callable[[], bytes]) -> None:
        self.result: bytes | None = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], bytes]) -> None:
        try:
            self.result = call()
        except BaseException as error:
            self.error = error
        self.ended_at = time.monotonic()

    def join(self, seconds: float = 15.0) -> None:
        self._thread.join(seconds)
        assert not self._thread.is_alive(), "the call did not end"


def generate(server: ComfyUIServer, watch: RecordingWatch, t: Task | None = None) -> bytes:
    return ComfyUIImageClient(poll_seconds=0.2).generate(
        endpoint_of(server), t or task(), timeout_seconds=20, watch=watch
    )


def test_a_prompt_is_followed_to_its_png_with_progress_rising(comfy: ComfyUIServer) -> None:
    comfy.set_knobs({"latency_s": 0.5})
    watch = RecordingWatch()

    png = image_generators()[EndpointProtocol.COMFYUI].generate(
        endpoint_of(comfy), task(), timeout_seconds=20, watch=watch
    )

    assert png.startswith(PNG_MAGIC)
    assert watch.steps == [(step, 10) for step in range(1, 11)]
    assert watch.job_id is not None
    assert comfy.history(watch.job_id)[watch.job_id]["status"]["status_str"] == "success"
    assert comfy.stats()["prompts"] == ["a lighthouse at dusk"]
    assert comfy.stats()["in_flight"] == 0


def test_cancel_of_the_running_prompt_interrupts_it_and_frees_the_gpu(
    comfy: ComfyUIServer,
) -> None:
    comfy.set_knobs({"latency_s": 6.0})
    watch = RecordingWatch()
    call = Running(lambda: generate(comfy, watch, task(steps=30)))
    wait_for(lambda: len(watch.steps) >= 2)

    asked = time.monotonic()
    watch.cancel.set()
    call.join()

    assert isinstance(call.error, GpuCanceled)
    assert call.ended_at is not None
    assert call.ended_at - asked < 2.0
    stats = comfy.stats()
    assert (stats["interrupted"], stats["in_flight"], stats["completed"]) == (1, 0, 0)
    assert watch.job_id is not None
    status = comfy.history(watch.job_id)[watch.job_id]["status"]
    assert status["status_str"] == "error"
    assert status["messages"][-1][0] == "execution_interrupted"


def test_cancel_of_a_waiting_prompt_deletes_it_from_the_queue_and_spares_the_running_one(
    comfy: ComfyUIServer,
) -> None:
    comfy.set_knobs({"hang": True})
    blocker = requests.post(
        f"{comfy.url}/prompt",
        json={"prompt": patched_graph(WORKFLOW, task("someone else's"))},
        timeout=5,
    ).json()["prompt_id"]
    wait_for(lambda: comfy.stats()["running"] == blocker)
    watch = RecordingWatch()
    call = Running(lambda: generate(comfy, watch))
    wait_for(lambda: watch.job_id is not None and comfy.stats()["queued"] == 1)

    watch.cancel.set()
    call.join()

    assert isinstance(call.error, GpuCanceled)
    stats = comfy.stats()
    assert (stats["deleted"], stats["interrupted"], stats["queued"]) == (1, 0, 0)
    assert stats["running"] == blocker  # the other prompt runs on
    comfy.set_knobs({"hang": False})
    wait_for(lambda: comfy.stats()["completed"] == 1)


def test_a_failed_prompt_is_permanent_with_comfyuis_message(comfy: ComfyUIServer) -> None:
    comfy.set_knobs({"failure_rate": 1.0})

    with pytest.raises(PermanentGpuError, match=r"KSampler.*ran out of memory on your GPU"):
        generate(comfy, RecordingWatch())


def test_a_workflow_comfyui_refuses_is_permanent_naming_the_node(comfy: ComfyUIServer) -> None:
    workflow = ComfyWorkflow.model_validate(default_workflow("missing.safetensors"))

    with pytest.raises(PermanentGpuError, match=r"node 4 \(CheckpointLoaderSimple\)"):
        ComfyUIImageClient().generate(
            endpoint_of(comfy, workflow), task(), timeout_seconds=10, watch=RecordingWatch()
        )
    assert comfy.stats()["queued"] == 0


def test_an_interrupt_nobody_here_asked_for_is_retryable_not_a_cancel(
    comfy: ComfyUIServer,
) -> None:
    comfy.set_knobs({"latency_s": 6.0})
    watch = RecordingWatch()
    call = Running(lambda: generate(comfy, watch, task(steps=30)))
    wait_for(lambda: len(watch.steps) >= 1)

    requests.post(f"{comfy.url}/interrupt", timeout=5)  # the server's UI: global, no body
    call.join()

    assert isinstance(call.error, RetryableGpuError)
    assert not isinstance(call.error, GpuCanceled)
    assert "not a cancel of ours" in str(call.error)


def test_without_a_socket_the_prompt_is_followed_by_its_history(
    comfy: ComfyUIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError("ws refused")

    monkeypatch.setattr("websockets.sync.client.connect", refuse)
    comfy.set_knobs({"latency_s": 0.3})
    watch = RecordingWatch()

    png = generate(comfy, watch)

    assert png.startswith(PNG_MAGIC)
    assert watch.steps == []  # no socket, no steps
    assert comfy.stats()["ws_clients"] == 0


def test_a_prompt_past_its_deadline_times_out_and_is_stopped(comfy: ComfyUIServer) -> None:
    comfy.set_knobs({"hang": True})

    with pytest.raises(GpuTimeout):
        ComfyUIImageClient().generate(
            endpoint_of(comfy), task(), timeout_seconds=1.5, watch=RecordingWatch()
        )

    stats = comfy.stats()
    assert (stats["interrupted"], stats["in_flight"]) == (1, 0)


def test_an_unreachable_server_is_retryable() -> None:
    with ComfyUIServer() as gone:
        endpoint = endpoint_of(gone)
    with pytest.raises(RetryableGpuError, match="unreachable"):
        ComfyUIImageClient().generate(endpoint, task(), timeout_seconds=5, watch=RecordingWatch())


def test_health_is_system_stats_with_its_system_object(comfy: ComfyUIServer) -> None:
    session = requests.Session()
    assert probe(session, endpoint_of(comfy), timeout_seconds=2).healthy

    comfy.set_knobs({"healthy": False})
    sick = probe(session, endpoint_of(comfy), timeout_seconds=2)
    assert not sick.healthy
    assert sick.error == "/system_stats answered HTTP 503"

    with ImageServer() as other:  # an A1111/OpenAI stand-in on the URL: no /system_stats
        wrong = endpoint_of(comfy).model_copy(update={"url": other.url})
        result = probe(session, wrong, timeout_seconds=2)
    assert not result.healthy
    assert result.error == "/system_stats answered HTTP 404"


def test_the_endpoints_table_keeps_the_workflow(template_table: Callable[[str], Any]) -> None:
    registry = EndpointRegistry(template_table("EndpointsTable"))
    registry.put(
        Endpoint(
            endpoint_id="comfy-admin",
            url="http://comfy-a:8188",
            kind=TaskKind.IMAGE,
            protocol=EndpointProtocol.COMFYUI,
            source="admin",
            workflow=WORKFLOW,
        )
    )
    registry.sync_declared(
        TaskKind.IMAGE,
        [
            DeclaredEndpoint(
                endpoint_id="comfy-declared",
                url="http://comfy-b:8188",
                protocol=EndpointProtocol.COMFYUI,
                workflow=WORKFLOW,
            )
        ],
    )

    for endpoint_id in ("comfy-admin", "comfy-declared"):
        stored = registry.get(endpoint_id)
        assert stored is not None
        assert stored.workflow == WORKFLOW
    fleet = registry.fleet(TaskKind.IMAGE, consistent=True)
    assert {e.endpoint_id: e.workflow for e in fleet.endpoints} == {
        "comfy-admin": WORKFLOW,
        "comfy-declared": WORKFLOW,
    }

    admin_row = registry.get("comfy-admin")
    assert admin_row is not None
    registry.put(admin_row.model_copy(update={"workflow": None}))
    assert (registry.get("comfy-admin") or admin_row).workflow is None
