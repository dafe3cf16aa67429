"""Which stack the smoke suite proves: a deployed one, or the local one.

`GPUQUEUE_SMOKE_API_URL` set (`make smoke` sets it): that API, over HTTP only, with users
the suite signs up itself. Unset (`make test`): the e2e tests' own local stack (their
session fixture `local_stack`, on free ports; the tests sharing it leave it healthy), so
`make test` starts no extra stack for this suite. The tests are the same either way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest

from .smoke_api import FinishedTask, SmokeUser, sign_up, submit_and_wait

API_URL_ENV = "GPUQUEUE_SMOKE_API_URL"
TASK_TIMEOUT_ENV = "GPUQUEUE_SMOKE_TASK_TIMEOUT"
# A deployed stack's GPU takes 10-15 s a task and may have a queue and cold starts ahead of
# it; the local stand-ins answer in 0.2 s, so anything near 30 s there is a fault.
DEPLOYED_TASK_TIMEOUT_SECONDS = 300.0
LOCAL_TASK_TIMEOUT_SECONDS = 30.0
PROMPT = "smoke test: a lighthouse on a cliff at dusk"
IMAGE_SIZE = (256, 256)  # square and a multiple of 64: every image protocol's GPU takes it


@dataclass(frozen=True)
class SmokeTarget:
    api: str
    local: bool
    task_timeout: float
    poll_interval: float

    @property
    def name(self) -> str:
        return f"the local stack at {self.api}" if self.local else f"the stack at {self.api}"


def _task_timeout(default: float) -> float:
    value = os.environ.get(TASK_TIMEOUT_ENV)
    return float(value) if value else default


@pytest.fixture(scope="module")
def target(request: pytest.FixtureRequest) -> SmokeTarget:
    api_url = os.environ.get(API_URL_ENV)
    if api_url:
        return SmokeTarget(
            api=api_url.strip().rstrip("/"),
            local=False,
            task_timeout=_task_timeout(DEPLOYED_TASK_TIMEOUT_SECONDS),
            # Polling a deployed API costs requests (and counts against the caller's rate).
            poll_interval=1.0,
        )
    # Asked for only here: a run against a deployed stack never starts a local one.
    stack = request.getfixturevalue("local_stack")
    return SmokeTarget(
        api=stack.api,
        local=True,
        task_timeout=_task_timeout(LOCAL_TASK_TIMEOUT_SECONDS),
        poll_interval=0.1,
    )


@pytest.fixture(scope="module")
def user(target: SmokeTarget) -> SmokeUser:
    return sign_up(target.api)


@pytest.fixture(scope="module")
def stranger(target: SmokeTarget) -> SmokeUser:
    """A second fresh user, who must see nothing of `user`'s."""
    return sign_up(target.api)


@pytest.fixture(scope="module")
def image_task(target: SmokeTarget, user: SmokeUser) -> FinishedTask:
    """One image task, submitted and waited for once per run: on a deployed stack each is
    a real GPU call, so every check of the flow reads this one."""
    width, height = IMAGE_SIZE
    return submit_and_wait(
        user,
        {
            "prompt": PROMPT,
            "negative_prompt": "blurry",
            "width": width,
            "height": height,
        },
        timeout=target.task_timeout,
        interval=target.poll_interval,
    )


@pytest.fixture(scope="module")
def speech_endpoints(target: SmokeTarget, user: SmokeUser) -> dict[str, Any]:
    """The stats' speech fleet, when it has a healthy endpoint. A deployed stack may have
    none (SpeechEndpointUrls is optional): then the speech checks skip, saying so for that
    stack. The local stack always registers a speech stand-in, so there it is a failure."""
    stats = user.get("/api/v1/system/stats")
    assert stats.status_code == 200, f"GET /api/v1/system/stats: {stats.status_code} {stats.text}"
    speech: dict[str, Any] = stats.json().get("endpoints", {}).get("speech", {})
    if speech.get("healthy", 0) > 0:
        return speech
    reason = f"{target.name} has no healthy speech endpoint (stats endpoints.speech: {speech})"
    if target.local:
        pytest.fail(f"{reason}, yet the local stack always starts a speech stand-in")
    pytest.skip(reason)
