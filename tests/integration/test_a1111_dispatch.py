"""An A1111 task through the dispatcher on moto: its progress on the task row at a bounded
rate, and its owner's cancel stopping the GPU, freeing the slot, storing nothing."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import boto3
import pytest

from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.models import EndpointProtocol, TaskKind, TaskProgress
from gpuqueue.store.task_store import Claim, ProgressAck, TaskStore
from gpuqueue_local.standins.image_server import ImageServerKnobs
from gpuqueue_testing import wait_for

STEPS = 30


def _registry(h: Any) -> EndpointRegistry:
    return EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))


def _a1111_stack(make_stack: Any, latency_s: float) -> tuple[Any, Any]:
    h = make_stack(endpoints=[ImageServerKnobs(latency_s=latency_s)])
    h.run_checker()
    registry = _registry(h)
    [endpoint] = registry.endpoints(TaskKind.IMAGE)
    registry.put(endpoint.model_copy(update={"protocol": EndpointProtocol.A1111}))
    return h, h.image_servers[0]


@pytest.fixture
def progress_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int]]:
    """(when, step) of every progress write the dispatcher makes."""
    writes: list[tuple[float, int]] = []
    report = TaskStore.report_progress

    def recorded(self: TaskStore, claim: Claim, progress: TaskProgress) -> ProgressAck:
        writes.append((time.monotonic(), progress.step))
        return report(self, claim, progress)

    monkeypatch.setattr(TaskStore, "report_progress", recorded)
    return writes


class Dispatching:
    """The dispatcher invoked with the queue's message, in a thread (a Lambda invocation)."""

    def __init__(self, h: Any) -> None:
        [message] = wait_for(h.receive, what="the task's message")
        self._thread = threading.Thread(target=h.deliver, args=([message],), daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the dispatcher invocation did not end"


def _view(h: Any, user: Any, task_id: str) -> dict[str, Any]:
    view: dict[str, Any] = h.get_task(user, task_id).json()
    return view


def test_progress_reaches_the_task_at_most_every_two_seconds(
    make_stack: Any, alice: Any, progress_writes: list[tuple[float, int]]
) -> None:
    h, server = _a1111_stack(make_stack, latency_s=6.0)
    task_id = h.submit(alice, {"prompt": "a slow fox", "steps": STEPS}).json()["task_id"]
    dispatching = Dispatching(h)

    seen: list[int] = []

    def progress_rose() -> bool:
        view = _view(h, alice, task_id)
        if view["status"] == "RUNNING" and view.get("progress"):
            assert view["progress"]["steps"] == STEPS
            if not seen or view["progress"]["step"] != seen[-1]:
                seen.append(view["progress"]["step"])
        return len(seen) >= 2

    wait_for(progress_rose, timeout=8, interval=0.2, what="two progress steps on the view")
    dispatching.join(30)

    assert seen == sorted(seen)
    view = _view(h, alice, task_id)
    assert view["status"] == "DONE"
    assert view.get("progress") is None  # shown while RUNNING only
    gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(progress_writes)]
    assert len(progress_writes) >= 2
    assert min(gaps) >= 1.9, gaps  # one write per task per 2 s at most
    assert server.stats()["a1111"]["interrupted"] == 0


def test_a_cancel_of_the_running_task_stops_the_gpu_and_frees_its_slot(
    make_stack: Any, alice: Any
) -> None:
    h, server = _a1111_stack(make_stack, latency_s=10.0)
    task_id = h.submit(alice, {"prompt": "a fox to cancel", "steps": STEPS}).json()["task_id"]
    dispatching = Dispatching(h)
    wait_for(
        lambda: _view(h, alice, task_id).get("progress"), timeout=8, what="progress on the view"
    )

    asked = time.monotonic()
    answer = h.cancel(alice, task_id)
    assert answer.status == 202, answer.body
    assert answer.json()["status"] == "RUNNING"
    assert answer.json()["cancel_requested"] is True
    wait_for(lambda: _view(h, alice, task_id)["status"] == "CANCELED", timeout=5, what="CANCELED")
    canceled_after = time.monotonic() - asked
    dispatching.join(10)

    stats = server.stats()
    assert stats["a1111"]["interrupted"] == 1
    assert stats["in_flight"] == 0
    assert canceled_after < 5.0
    [endpoint] = _registry(h).endpoints(TaskKind.IMAGE)
    fleet = _registry(h).fleet(TaskKind.IMAGE, consistent=True)
    assert fleet.live_leases(endpoint.endpoint_id, time.time()) == []
    bucket = h.stack.ref("ImagesBucket")
    assert boto3.client("s3").list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0

    # The slot is free: the next task runs on it at once.
    server.set_knobs({"latency_s": 0.2})
    following = h.submit(alice, {"prompt": "the next fox"}).json()["task_id"]
    h.drain()
    assert _view(h, alice, following)["status"] == "DONE"
