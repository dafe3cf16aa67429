"""A1111 on the local stack, over HTTP: a task's progress rising on its view, and a cancel
of a RUNNING task stopping the GPU within 5 s with its slot free.

Its own stack: one image stand-in registered as `a1111` (one slot), so a following task
can only start if the canceled one's slot was given back.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from .conftest import ApiUser, LocalStackProcess, PushedProgress, register_user, running_stack

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 30


@pytest.fixture(scope="module")
def a1111_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStackProcess]:
    workdir: Path = tmp_path_factory.mktemp("a1111-stack")
    with running_stack(
        workdir, "--image-protocol", "a1111", "--image-servers", "1", "--speech-servers", "0"
    ) as stack:
        yield stack


@pytest.fixture
def user(a1111_stack: LocalStackProcess) -> ApiUser:
    return register_user(a1111_stack, "a1111")


def _task(user: ApiUser, task_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = user.get(f"/api/v1/tasks/{task_id}").json()
    return answer


def _wait(what: str, condition: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def test_generate_reports_rising_progress_then_a_real_png(
    a1111_stack: LocalStackProcess, user: ApiUser
) -> None:
    a1111_stack.knobs(0, latency_s=7.0)
    with PushedProgress(a1111_stack, user) as pushed:
        task_id, steps_seen, done = _run_watching(user, pushed)
    pushed_steps = pushed.steps(task_id)

    assert steps_seen == sorted(steps_seen)
    assert 0 < steps_seen[-1] < STEPS
    # The owner's WebSocket heard it rise too (a write at most every 2 s of a 7 s run).
    assert len(pushed_steps) >= 2, pushed.about(task_id)
    assert pushed_steps == sorted(pushed_steps)
    assert pushed_steps[0] < pushed_steps[-1]
    assert done["status"] == "DONE", done
    # result_url is relative to the API: a redirect to the stored object.
    image = user.get(done["result_url"], allow_redirects=False)
    assert image.status_code == 302
    png = requests.get(image.headers["location"], timeout=30).content
    assert png.startswith(PNG_MAGIC)
    assert Image.open(io.BytesIO(png)).size == (192, 128)


def _run_watching(user: ApiUser, pushed: PushedProgress) -> tuple[str, list[int], dict[str, Any]]:
    """Submit, follow the progress on the task view, wait for the end and its push."""
    task_id = user.submit("a fox in the snow, slowly", width=192, height=128, steps=STEPS)
    steps_seen: list[int] = []

    def rising() -> bool:
        task = _task(user, task_id)
        progress = task.get("progress")
        if task["status"] == "RUNNING" and progress:
            assert progress["steps"] == STEPS
            if not steps_seen or progress["step"] != steps_seen[-1]:
                steps_seen.append(progress["step"])
        return len(steps_seen) >= 2

    _wait("progress to rise", rising, timeout=15)
    done = user.wait(task_id, timeout=20)
    _wait("the end pushed", lambda: pushed.ended(task_id), timeout=10)
    return task_id, steps_seen, done


def test_cancel_of_a_running_task_interrupts_the_gpu_and_frees_the_slot(
    a1111_stack: LocalStackProcess, user: ApiUser
) -> None:
    a1111_stack.knobs(0, latency_s=20.0)
    before = a1111_stack.endpoint_stats(0)["a1111"]
    task_id = user.submit("a fox to cancel", width=128, height=128, steps=STEPS)
    _wait("the task running on the GPU", lambda: _task(user, task_id).get("progress"), 15)

    asked = time.monotonic()
    answer = user.delete(f"/api/v1/tasks/{task_id}")
    assert answer.status_code == 202, answer.text
    assert answer.json()["cancel_requested"] is True
    _wait("CANCELED", lambda: _task(user, task_id)["status"] == "CANCELED", timeout=5)
    assert time.monotonic() - asked < 5.0

    stats = _wait(
        "the stand-in idle",
        lambda: (s := a1111_stack.endpoint_stats(0))["in_flight"] == 0 and s,
        timeout=5,
    )
    assert stats["a1111"]["interrupted"] == before["interrupted"] + 1
    assert _task(user, task_id).get("result_url") is None

    # The one slot is free: a following task starts on it at once.
    a1111_stack.knobs(0, latency_s=0.5)
    following = user.submit("the next fox", width=128, height=128, steps=10)
    submitted = time.monotonic()
    _wait(
        "the following task to start",
        lambda: _task(user, following)["status"] in ("RUNNING", "DONE"),
        timeout=5,
    )
    assert time.monotonic() - submitted < 5.0
    assert user.wait(following, timeout=20)["status"] == "DONE"
