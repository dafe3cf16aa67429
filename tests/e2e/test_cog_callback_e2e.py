"""Cog callback mode on the local stack over HTTP, against the real Cog server (coglet 0.23.1
from .venv-cog) as the only image endpoint, `callback: true`: the dispatcher starts the
prediction and returns; Cog's webhooks to the gateway's callback route carry the progress
and the PNG. No dispatcher invocation is alive while the GPU works (the stack logs every
invocation's start and end), and a cancel ends the task within 5 s with Cog idle again."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from gpuqueue_testing import wait_for

from .conftest import ApiUser, LocalStackProcess, PushedProgress, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

STEP_SECONDS = 0.1  # the Cog model's time per step
DISPATCHERS = {"DispatcherFunction", "PriorityDispatcherFunction"}
# The dispatcher invocation that starts a prediction returns right after Cog's 202; Cog
# sends its `start` webhook as it accepts, so that invocation may still be ending then.
START_SLACK_SECONDS = 1.0


@pytest.fixture(scope="module")
def invocation_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("invocations") / "invocations.jsonl"


@pytest.fixture(scope="module")
def cog_stack(
    tmp_path_factory: pytest.TempPathFactory, invocation_log: Path
) -> Iterator[LocalStackProcess]:
    with running_stack(
        tmp_path_factory.mktemp("cog-callback-stack"),
        "--image-servers",
        "0",
        "--speech-servers",
        "0",
        "--cog-server",
        "--cog-callback",
        "--cog-step-delay",
        str(STEP_SECONDS),
        "--no-s3-events",
        "--invocation-log",
        str(invocation_log),
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


def invocations(path: Path, since: float) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [row for row in map(json.loads, lines) if row["end"] >= since]


def cog_status(stack: LocalStackProcess) -> str:
    health = requests.get(f"{stack.state['cog_server']}/health-check", timeout=5).json()
    return str(health["status"])


def cog_in_flight(stack: LocalStackProcess) -> int:
    token = stack.state["admin_user"]["token"]
    rows = requests.get(
        f"{stack.api}/api/v1/admin/endpoints",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    ).json()
    (row,) = [e for e in rows if e["url"] == stack.state["cog_server"]]
    return int(row["in_flight"])


def test_a_callback_task_completes_with_no_dispatcher_alive_during_the_generation(
    cog_stack, user, invocation_log
):
    steps = 120  # a 12 s generation
    began = time.time()
    with PushedProgress(cog_stack, user) as pushed:
        task_id, view, seen_steps = _follow(user, steps)
        ended = time.time()
        wait_for(lambda: pushed.ended(task_id), timeout=10, what="the end pushed")
    pushed_steps = pushed.steps(task_id)

    assert view["status"] == "DONE", view
    redirect = user.get(view["result_url"], allow_redirects=False)
    image = Image.open(io.BytesIO(requests.get(redirect.headers["location"], timeout=30).content))
    assert (image.format, image.size) == ("PNG", (192, 128))
    # Progress seen rising on the task view (written at most every 2 s), and pushed.
    assert len(seen_steps) >= 3, seen_steps
    assert seen_steps == sorted(seen_steps), seen_steps
    assert len(pushed_steps) >= 3, pushed.about(task_id)
    assert pushed_steps == sorted(pushed_steps)
    assert pushed_steps[0] < pushed_steps[-1]
    _assert_no_dispatcher_alive_during_the_generation(invocation_log, began, ended, steps)


def _follow(user: ApiUser, steps: int) -> tuple[str, dict[str, Any], list[int]]:
    """Submit a generation of `steps` and follow its view to its end."""
    task_id = user.submit("a lighthouse at dusk", width=192, height=128, steps=steps, seed=9)
    seen_steps: list[int] = []
    deadline = time.monotonic() + 60
    while True:
        view = user.get(f"/api/v1/tasks?task_id={task_id}").json()
        if view.get("progress"):
            step = int(view["progress"]["step"])
            if not seen_steps or step != seen_steps[-1]:
                seen_steps.append(step)
        if view["status"] in ("DONE", "FAILED", "CANCELED", "EXPIRED"):
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.25)
    return task_id, view, seen_steps


def _assert_no_dispatcher_alive_during_the_generation(
    invocation_log: Path, began: float, ended: float, steps: int
) -> None:
    # The generation: from Cog's first webhook to its last (`completed`).
    calls = invocations(invocation_log, began)
    callbacks = sorted(
        (c for c in calls if c["function"] == "GpuCallbackFunction" and c["end"] <= ended + 1),
        key=lambda c: c["start"],
    )
    generation = (callbacks[0]["start"] + START_SLACK_SECONDS, callbacks[-1]["start"])
    assert generation[1] - generation[0] > steps * STEP_SECONDS * 0.8
    dispatchers = [c for c in calls if c["function"] in DISPATCHERS]
    alive = [c for c in dispatchers if c["start"] < generation[1] and c["end"] > generation[0]]
    assert dispatchers, "no dispatcher ran"
    assert alive == [], (alive, generation)
    # For docs/cost.md: how many webhooks one generation costs, and how long each took.
    durations = [c["end"] - c["start"] for c in callbacks]
    print(  # noqa: T201 - the measurement docs/cost.md quotes
        f"\ncallback invocations: {len(callbacks)} for {steps * STEP_SECONDS:.0f} s; "
        f"mean {sum(durations) / len(durations) * 1000:.0f} ms; dispatcher invocations: "
        f"{[round(c['end'] - c['start'], 2) for c in dispatchers]} s"
    )


def test_canceling_a_running_callback_task_ends_it_within_5_s_with_cog_idle(cog_stack, user):
    task_id = user.submit("a very long render", width=64, height=64, steps=150)
    wait_for(
        lambda: (
            user.get(f"/api/v1/tasks?task_id={task_id}").json()["status"] == "RUNNING"
            and cog_status(cog_stack) == "BUSY"
        ),
        timeout=30,
        what="the task RUNNING on a busy Cog server",
    )

    asked = time.monotonic()
    answer = user.delete(f"/api/v1/tasks/{task_id}")
    assert answer.status_code == 202, answer.text
    assert answer.json()["cancel_requested"] is True
    final = user.wait(task_id, timeout=5)
    took = time.monotonic() - asked

    assert final["status"] == "CANCELED", final
    assert took < 5
    assert final.get("result_url") is None
    wait_for(lambda: cog_status(cog_stack) == "READY", timeout=5, what="the Cog server idle")
    wait_for(lambda: cog_in_flight(cog_stack) == 0, timeout=5, what="the Cog slot free")


def test_the_callback_route_needs_no_sign_in_but_answers_404_without_the_token(cog_stack, user):
    task_id = user.submit("a quick one", width=64, height=64, steps=2)
    user.wait(task_id, timeout=60)
    hook = {"id": f"{task_id}-a1", "status": "succeeded", "logs": ""}
    url = f"{cog_stack.api}/api/v1/callbacks/cog/{task_id}"

    wrong = requests.post(url, params={"token": "guess"}, json=hook, timeout=10)
    missing = requests.post(url, json=hook, timeout=10)
    unknown = requests.post(
        f"{cog_stack.api}/api/v1/callbacks/cog/no-such-task",
        params={"token": "x"},
        json=hook,
        timeout=10,
    )
    malformed = requests.post(url, params={"token": "guess"}, json={"status": 3}, timeout=10)

    assert (wrong.status_code, missing.status_code, unknown.status_code) == (404, 404, 404)
    assert wrong.json()["code"] == missing.json()["code"] == unknown.json()["code"] == "NOT_FOUND"
    assert malformed.status_code == 400
    assert user.get(f"/api/v1/tasks?task_id={task_id}").json()["status"] == "DONE"
