"""The `cog` protocol on the local stack over HTTP, against the real Cog server (coglet 0.23.1
from .venv-cog) as the only image endpoint: a task ends DONE with the model's PNG; a RUNNING
task canceled through the API stops the prediction and frees the endpoint's slot."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from PIL import Image

from gpuqueue_testing import wait_for

from .conftest import ApiUser, LocalStackProcess, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

STEP_SECONDS = 0.1  # the Cog model's time per step: 150 steps is a 15 s prediction


@pytest.fixture(scope="module")
def cog_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStackProcess]:
    with running_stack(
        tmp_path_factory.mktemp("cog-stack"),
        "--image-servers",
        "0",  # the Cog server is the only image endpoint: every task lands on it
        "--speech-servers",
        "0",
        "--cog-server",
        "--cog-step-delay",
        str(STEP_SECONDS),
        "--no-s3-events",
    ) as stack:
        yield stack


@pytest.fixture
def user(cog_stack: LocalStackProcess) -> ApiUser:
    username, password = f"c{uuid.uuid4().hex[:10]}", "pass1234word"
    response = requests.post(
        f"{cog_stack.api}/register", json={"username": username, "password": password}, timeout=30
    )
    assert response.status_code == 201, response.text
    return ApiUser(cog_stack.api, username, password, response.json()["token"])


def cog_status(stack: LocalStackProcess) -> str:
    health = requests.get(f"{stack.state['cog_server']}/health-check", timeout=5).json()
    return str(health["status"])


def cog_endpoint(stack: LocalStackProcess) -> dict[str, Any]:
    token = stack.state["admin_user"]["token"]
    response = requests.get(
        f"{stack.api}/api/v1/admin/endpoints",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    response.raise_for_status()
    (row,) = [e for e in response.json() if e["url"] == stack.state["cog_server"]]
    return dict(row)


def task_view(user: ApiUser, task_id: str) -> dict[str, Any]:
    view: dict[str, Any] = user.get(f"/api/v1/tasks?task_id={task_id}").json()
    return view


def download_png(user: ApiUser, task: dict[str, Any]) -> Image.Image:
    redirect = user.get(task["result_url"], allow_redirects=False)
    assert redirect.status_code == 302, redirect.text
    png = requests.get(redirect.headers["location"], timeout=30)
    assert png.status_code == 200, png.text
    return Image.open(io.BytesIO(png.content))


def test_the_cog_server_is_registered_as_a_cog_endpoint_of_one_slot(cog_stack):
    endpoint = cog_endpoint(cog_stack)

    assert endpoint["protocol"] == "cog"
    assert endpoint["capacity"] == 1
    assert endpoint["healthy"] is True


def test_a_task_on_cog_ends_done_with_the_models_png(cog_stack, user):
    task_id = user.submit("a lighthouse at dusk", width=192, height=128, steps=4, seed=9)

    task = user.wait(task_id, timeout=60)

    assert task["status"] == "DONE", task
    image = download_png(user, task)
    assert image.format == "PNG"
    assert image.size == (192, 128)


def test_canceling_a_running_task_stops_the_prediction_and_frees_the_slot(cog_stack, user):
    task_id = user.submit("a very long render", width=64, height=64, steps=150)
    wait_for(
        lambda: task_view(user, task_id)["status"] == "RUNNING" and cog_status(cog_stack) == "BUSY",
        timeout=30,
        what="the task RUNNING on a busy Cog server",
    )

    asked = time.monotonic()
    answer = user.delete(f"/api/v1/tasks/{task_id}")
    assert answer.status_code == 202, answer.text  # RUNNING: the cancel is requested
    assert answer.json()["cancel_requested"] is True
    final = user.wait(task_id, timeout=5)
    took = time.monotonic() - asked

    assert final["status"] == "CANCELED", final
    assert took < 5
    assert "result_url" not in final or final["result_url"] is None
    wait_for(lambda: cog_status(cog_stack) == "READY", timeout=5, what="the Cog server idle")
    wait_for(lambda: cog_endpoint(cog_stack)["in_flight"] == 0, timeout=5, what="the Cog slot free")
    # The slot serves the next task.
    following = user.wait(user.submit("the next one", width=64, height=64, steps=2), timeout=60)
    assert following["status"] == "DONE", following
