"""A1111 progress and running cancel, adapter against the stand-in over real HTTP.

The stand-in's A1111 half runs one job at a time behind a queue lock with server-wide
progress and interrupt, like A1111 1.10; its `/internal/progress` (per-task) route can be
switched off, as an API-only (`--nowebui`) server has none.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests
from PIL import Image

from gpuqueue.errors import GpuCanceled
from gpuqueue.gpu.a1111_progress import a1111_task_id
from gpuqueue.gpu.image_client import PNG_MAGIC, A1111ImageClient
from gpuqueue.models import Endpoint, EndpointProtocol, ImageParams, Task, TaskKind, TaskStatus
from gpuqueue_local.standins.image_server import ImageServer, ImageServerKnobs
from gpuqueue_testing import wait_for

TIMEOUT = 30.0


@dataclass
class RecordingWatch:
    """A CallWatch that keeps what it is told and cancels when the test says so."""

    reports: list[tuple[int, int, float | None]] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    cancel: threading.Event = field(default_factory=threading.Event)

    def progress(self, step: int, steps: int, *, eta_seconds: float | None = None) -> None:
        self.reports.append((step, steps, eta_seconds))

    def job_started(self, job_id: str) -> None:
        self.job_ids.append(job_id)

    def wait_cancel(self, seconds: float) -> bool:
        return self.cancel.wait(seconds)


@pytest.fixture
def server() -> Iterator[ImageServer]:
    with ImageServer(knobs=ImageServerKnobs(latency_s=4.0)) as srv:
        yield srv


def endpoint(server: ImageServer, capacity: int = 1) -> Endpoint:
    return Endpoint(
        endpoint_id="sd-a",
        url=server.url,
        kind=TaskKind.IMAGE,
        protocol=EndpointProtocol.A1111,
        capacity=capacity,
    )


def task(prompt: str = "a fox in the snow", *, steps: int = 30, attempt: int = 0) -> Task:
    return Task(
        task_id=f"t-{prompt.replace(' ', '-')}",
        user_id="user-1",
        status=TaskStatus.RUNNING,
        prompt=prompt,
        params=ImageParams(width=128, height=96, steps=steps),
        attempt=attempt,
        created_at="2026-01-27T10:00:00.000000Z",
        updated_at="2026-01-27T10:00:00.000000Z",
    )


class Generation:
    """`generate` in a thread: its PNG or its error."""

    def __init__(self, server: ImageServer, run: Task, watch: RecordingWatch, capacity: int = 1):
        self.png: bytes | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(endpoint(server, capacity), run, watch), daemon=True
        )
        self._thread.start()

    def _run(self, target: Endpoint, run: Task, watch: RecordingWatch) -> None:
        try:
            self.png = A1111ImageClient().generate(
                target, run, timeout_seconds=TIMEOUT, watch=watch
            )
        except BaseException as error:
            self.error = error

    def join(self) -> None:
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "generate did not return"


def a1111_stats(server: ImageServer) -> dict[str, Any]:
    stats: dict[str, Any] = server.stats()["a1111"]
    return stats


def test_rising_progress_of_our_task_is_reported_and_the_png_returned(
    server: ImageServer,
) -> None:
    watch = RecordingWatch()
    call = Generation(server, task(), watch)
    call.join()

    assert call.error is None
    assert call.png is not None
    assert call.png.startswith(PNG_MAGIC)
    assert Image.open(io.BytesIO(call.png)).size == (128, 96)
    steps_seen = [step for step, _, _ in watch.reports]
    assert len(steps_seen) >= 2, watch.reports
    assert steps_seen == sorted(steps_seen)
    assert steps_seen[-1] > steps_seen[0]
    assert all(steps == 30 for _, steps, _ in watch.reports)
    # The ETA is A1111's own (from its start time), shrinking as the job goes.
    etas = [eta for _, _, eta in watch.reports if eta is not None]
    assert etas
    assert etas[-1] <= etas[0] < 4.0
    assert watch.job_ids == [a1111_task_id(task().task_id, 0)]
    assert a1111_stats(server)["interrupted"] == 0


def test_a_cancel_interrupts_the_job_and_the_partial_image_is_not_returned(
    server: ImageServer,
) -> None:
    watch = RecordingWatch()
    started = time.monotonic()
    call = Generation(server, task(), watch)
    wait_for(lambda: watch.reports, timeout=5, what="first progress")
    watch.cancel.set()
    call.join()

    assert isinstance(call.error, GpuCanceled)
    assert call.png is None
    assert time.monotonic() - started < 4.0  # stopped before its 4 s ran out
    stats = server.stats()
    assert stats["a1111"]["interrupts"] == 1
    assert stats["a1111"]["interrupted"] == 1
    assert stats["in_flight"] == 0


def test_an_interrupted_txt2img_still_answers_200_with_a_partial_image(
    server: ImageServer,
) -> None:
    """What the adapter guards against: A1111's answer to an interrupted job is a success."""
    answer: dict[str, requests.Response] = {}
    thread = threading.Thread(
        target=lambda: answer.setdefault(
            "r",
            requests.post(
                server.url + "/sdapi/v1/txt2img",
                json={"prompt": "p", "steps": 20, "width": 64, "height": 64},
                timeout=TIMEOUT,
            ),
        )
    )
    thread.start()
    wait_for(
        lambda: (
            requests.get(server.url + "/sdapi/v1/progress", timeout=5).json()["state"][
                "sampling_step"
            ]
            > 0
        ),
        what="sampling started",
    )
    assert requests.post(server.url + "/sdapi/v1/interrupt", timeout=5).json() == {}
    thread.join(TIMEOUT)

    assert answer["r"].status_code == 200
    [image] = answer["r"].json()["images"]
    assert base64.b64decode(image).startswith(PNG_MAGIC)
    progress = requests.get(server.url + "/sdapi/v1/progress", timeout=5).json()
    assert progress["state"]["interrupted"] is True
    assert 0 < progress["state"]["sampling_step"] < 20
    assert progress["state"]["job_count"] == 0
    assert progress["progress"] == 0


def test_without_the_per_task_route_a_one_slot_endpoint_follows_the_server_wide_job(
    server: ImageServer,
) -> None:
    server.set_knobs({"task_progress_route": False})
    watch = RecordingWatch()
    call = Generation(server, task(), watch, capacity=1)
    wait_for(lambda: len(watch.reports) >= 2, timeout=5, what="two progress reports")
    watch.cancel.set()
    call.join()

    assert [steps for _, steps, _ in watch.reports] == [30] * len(watch.reports)
    assert isinstance(call.error, GpuCanceled)
    assert a1111_stats(server)["interrupted"] == 1


def test_without_the_per_task_route_a_shared_endpoint_reports_nothing_and_interrupts_nothing(
    server: ImageServer,
) -> None:
    """Capacity 2: the server-wide job may be another task's, so it is left alone. The
    canceled task still gives no image (its GPU time is spent all the same)."""
    server.set_knobs({"task_progress_route": False, "latency_s": 2.0})
    watch = RecordingWatch()
    call = Generation(server, task(), watch, capacity=2)
    wait_for(
        lambda: (
            requests.get(server.url + "/sdapi/v1/progress", timeout=5).json()["state"][
                "sampling_step"
            ]
            > 0
        ),
        what="sampling started",
    )
    watch.cancel.set()
    call.join()

    assert watch.reports == []
    assert isinstance(call.error, GpuCanceled)
    assert a1111_stats(server)["interrupts"] == 0
    assert a1111_stats(server)["interrupted"] == 0


def test_a_task_queued_behind_another_is_interrupted_only_once_it_runs(
    server: ImageServer,
) -> None:
    """Two slots on one A1111: ours queues behind another task's job. Canceling ours must
    not stop theirs; ours is stopped as soon as it starts."""
    server.set_knobs({"latency_s": 2.0})
    theirs, ours = RecordingWatch(), RecordingWatch()
    first = Generation(server, task("their fox"), theirs, capacity=2)
    wait_for(lambda: theirs.reports, timeout=5, what="their job running")
    second = Generation(server, task("our fox"), ours, capacity=2)
    wait_for(lambda: a1111_stats(server)["queued_tasks"] == 1, timeout=5, what="ours queued")
    ours.cancel.set()
    first.join()
    second.join()

    assert first.error is None
    assert first.png is not None
    assert isinstance(second.error, GpuCanceled)
    stats = a1111_stats(server)
    assert stats["interrupts"] == 1
    assert stats["interrupted"] == 1
    assert ours.reports == []  # never ours to report while it queued


def test_a_failing_progress_route_costs_only_the_progress(server: ImageServer) -> None:
    # No per-task route, and the server-wide one answers 503 (the `healthy` knob).
    server.set_knobs({"task_progress_route": False, "healthy": False, "latency_s": 2.5})
    watch = RecordingWatch()
    call = Generation(server, task(), watch, capacity=1)
    call.join()

    assert call.error is None
    assert call.png is not None
    assert call.png.startswith(PNG_MAGIC)
    assert watch.reports == []


def test_the_per_task_route_tells_queued_active_and_completed_apart(server: ImageServer) -> None:
    server.set_knobs({"latency_s": 1.0})

    def progress_of(id_task: str) -> dict[str, Any]:
        answer: dict[str, Any] = requests.post(
            server.url + "/internal/progress", json={"id_task": id_task}, timeout=5
        ).json()
        return answer

    def txt2img(id_task: str) -> None:
        requests.post(
            server.url + "/sdapi/v1/txt2img",
            json={"prompt": id_task, "steps": 10, "force_task_id": id_task},
            timeout=TIMEOUT,
        )

    threads = [threading.Thread(target=txt2img, args=(name,)) for name in ("task(a)", "task(b)")]
    threads[0].start()
    wait_for(lambda: progress_of("task(a)")["active"], what="a active")
    threads[1].start()
    wait_for(lambda: progress_of("task(b)")["queued"], what="b queued")
    assert progress_of("task(b)")["textinfo"] == "In queue: 1/1"
    assert progress_of("task(b)")["progress"] is None
    for thread in threads:
        thread.join(TIMEOUT)
    assert progress_of("task(a)")["completed"] is True
    assert progress_of("task(a)")["active"] is False

    server.set_knobs({"task_progress_route": False})
    assert requests.post(server.url + "/internal/progress", json={}, timeout=5).status_code == 404
