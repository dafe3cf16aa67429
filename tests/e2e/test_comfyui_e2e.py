"""ComfyUI behind the queue, over HTTP on the local stack: one stand-in ComfyUI registered
as a comfyui image endpoint (ComfyUI's default txt2img graph; no other image endpoints, so
every task lands there). A task runs to DONE with a real PNG; its progress rises on the task
view while it runs; a DELETE of the running task interrupts the prompt on the GPU, ends the
task CANCELED within 5 s and frees the slot for the next task."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from gpuqueue_testing import wait_for

from .conftest import ApiUser, LocalStackProcess, PushedProgress, register_user, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

# Long enough to watch a prompt's steps go by; the module stays well under a minute.
SAMPLING_SECONDS = 6.0


@pytest.fixture(scope="module")
def comfy_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStackProcess]:
    with running_stack(
        tmp_path_factory.mktemp("comfyui-stack"),
        "--image-servers",
        "0",
        "--comfyui-servers",
        "1",
        "--image-latency",
        str(SAMPLING_SECONDS),
        "--speech-servers",
        "0",
    ) as stack:
        yield stack


@pytest.fixture
def user(comfy_stack: LocalStackProcess) -> ApiUser:
    return register_user(comfy_stack)


def comfy(stack: LocalStackProcess, route: str) -> Any:
    url = stack.state["comfyui_servers"][0]
    return requests.get(f"{url}{route}", timeout=5).json()


def task_view(user: ApiUser, task_id: str) -> dict[str, Any]:
    view: dict[str, Any] = user.get(f"/api/v1/tasks/{task_id}").json()
    return view


def slots_in_use(stack: LocalStackProcess) -> int:
    table = stack.aws_resource("dynamodb").Table(stack.state["resources"]["EndpointsTable"])
    now = time.time()
    rows = table.scan()["Items"]
    return sum(
        1
        for row in rows
        if row.get("row_type") == "slot" and float(row.get("lease_until", 0)) > now
    )


def test_a_task_runs_on_comfyui_to_a_png_with_its_progress_rising(
    comfy_stack: LocalStackProcess, user: ApiUser
) -> None:
    with PushedProgress(comfy_stack, user) as pushed:
        task_id = user.submit("a lighthouse at dusk", width=320, height=256, steps=30)
        seen, totals, done = _follow(user, task_id)
        wait_for(lambda: pushed.ended(task_id), timeout=10, what="the end pushed")
    pushed_steps = pushed.steps(task_id)

    assert len(seen) >= 2, seen
    assert seen == sorted(seen), seen
    assert seen[0] < seen[-1], seen
    assert totals == {30}
    # The owner's WebSocket heard it rise too.
    assert len(pushed_steps) >= 2, pushed.about(task_id)
    assert pushed_steps == sorted(pushed_steps)
    assert pushed_steps[0] < pushed_steps[-1]
    assert done["status"] == "DONE", done
    image = user.get(done["result_url"], allow_redirects=False)
    png = requests.get(image.headers["location"], timeout=30)
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    assert Image.open(io.BytesIO(png.content)).size == (320, 256)
    assert "a lighthouse at dusk" in comfy(comfy_stack, "/stats")["prompts"]


def _follow(user: ApiUser, task_id: str) -> tuple[list[int], set[int], dict[str, Any]]:
    """The steps the task view showed while it ran, their totals, and its end."""
    seen: list[int] = []
    totals: set[int] = set()

    def progressed_twice() -> bool:
        view = task_view(user, task_id)
        if view["status"] == "RUNNING" and view.get("progress"):
            step = view["progress"]["step"]
            totals.add(view["progress"]["steps"])
            if not seen or step != seen[-1]:
                seen.append(step)
        return len(seen) >= 2 or view["status"] in ("DONE", "FAILED")

    wait_for(progressed_twice, timeout=20, interval=0.2, what="progress to move")
    return seen, totals, user.wait(task_id, timeout=30)


def test_deleting_a_running_task_interrupts_comfyui_and_frees_the_slot(
    comfy_stack: LocalStackProcess, user: ApiUser
) -> None:
    before = comfy(comfy_stack, "/stats")
    task_id = user.submit("a storm over the sea", width=256, height=256, steps=40)
    wait_for(
        lambda: (
            comfy(comfy_stack, "/stats")["in_flight"] == 1
            and task_view(user, task_id)["status"] == "RUNNING"
        ),
        timeout=20,
        interval=0.1,
        what="the prompt to run",
    )

    asked = time.monotonic()
    answer = user.delete(f"/api/v1/tasks/{task_id}")
    assert answer.status_code in (200, 202), answer.text
    ended = wait_for(
        lambda: (view := task_view(user, task_id))["status"] != "RUNNING" and view,
        timeout=5,
        interval=0.1,
        what="the running task to end",
    )
    took = time.monotonic() - asked

    assert ended["status"] == "CANCELED", ended
    assert took < 5.0
    stats = comfy(comfy_stack, "/stats")
    assert stats["interrupted"] == before["interrupted"] + 1
    assert (stats["in_flight"], stats["queued"]) == (0, 0)
    assert slots_in_use(comfy_stack) == 0

    # The slot is free: the next task starts at once.
    next_id = user.submit("after the storm", width=256, height=256, steps=10)
    wait_for(
        lambda: task_view(user, next_id)["status"] in ("RUNNING", "DONE"),
        timeout=5,
        interval=0.1,
        what="the next task to start",
    )
    assert user.wait(next_id, timeout=30)["status"] == "DONE"
