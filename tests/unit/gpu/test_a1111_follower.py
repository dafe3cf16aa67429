"""Following an A1111 job when its progress and interrupt routes misbehave (a scripted fake
session): a poll that fails or reads nonsense costs that poll only, an interrupt that does
not go through is sent again, and a job that ended is never interrupted (the running job
may be another task's by then)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit

import pytest
import requests

from gpuqueue.gpu.a1111_progress import A1111Follower, Following
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.models import Endpoint, EndpointProtocol, TaskKind

ID_TASK = "task(gpuqueue-t-1-0)"


def answer(status: int, body: bytes | dict[str, Any]) -> requests.Response:
    result = requests.Response()
    result.status_code = status
    result._content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return result


ACTIVE = answer(200, {"active": True, "progress": 0.5, "eta": 3.0})
NO_ROUTE = answer(404, {"detail": "Not Found"})
BUSY = answer(200, {"state": {"job_count": 1, "sampling_step": 7, "sampling_steps": 20}})

Script = requests.Response | Exception | Callable[[], requests.Response]


class FakeA1111:
    """`requests.Session`'s get/post; each route answers from its script in turn, its last
    answer from then on."""

    def __init__(self, **routes: list[Script]) -> None:
        self.routes = {
            "/internal/progress": routes.get("task_progress", [ACTIVE]),
            "/sdapi/v1/progress": routes.get("progress", [BUSY]),
            "/sdapi/v1/interrupt": routes.get("interrupt", [answer(200, {})]),
        }
        self.paths: list[str] = []

    def post(self, url: str, **kwargs: Any) -> requests.Response:
        return self._serve(url)

    def get(self, url: str, **kwargs: Any) -> requests.Response:
        return self._serve(url)

    def _serve(self, url: str) -> requests.Response:
        path = urlsplit(url).path
        self.paths.append(path)
        script = self.routes[path]
        reply = script.pop(0) if len(script) > 1 else script[0]
        if isinstance(reply, Exception):
            raise reply
        return reply() if callable(reply) else reply


@dataclass
class Watch:
    reports: list[tuple[int, int, float | None]] = field(default_factory=list)

    def progress(self, step: int, steps: int, *, eta_seconds: float | None = None) -> None:
        self.reports.append((step, steps, eta_seconds))

    def job_started(self, job_id: str) -> None:
        return None

    def wait_cancel(self, seconds: float) -> bool:
        return False


def follower(server: FakeA1111, watch: Watch, capacity: int = 1) -> A1111Follower:
    endpoint = Endpoint(
        endpoint_id="sd-a",
        url="http://sd-a:7860/",
        kind=TaskKind.IMAGE,
        protocol=EndpointProtocol.A1111,
        capacity=capacity,
    )
    return A1111Follower(
        cast(requests.Session, server),
        GpuCredentials(),
        endpoint,
        id_task=ID_TASK,
        steps=20,
        watch=watch,
        poll_seconds=0.01,
    )


# --- progress --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        requests.ConnectionError("reset"),
        answer(200, b"<html>proxy error</html>"),
        answer(500, {"active": True, "progress": 0.9}),
    ],
    ids=["unreachable", "not-json", "server-error"],
)
def test_a_failed_task_progress_poll_reports_nothing_and_the_next_poll_asks_again(
    failure: Script,
) -> None:
    """Not a sign the route is missing: the server-wide route (whose job may not be ours)
    is not tried, and the next poll reports our task's progress."""
    server = FakeA1111(task_progress=[failure, ACTIVE])
    watch = Watch()
    follow = follower(server, watch, capacity=2)

    follow.poll()
    assert watch.reports == []
    assert follow.following is Following.UNKNOWN
    assert "/sdapi/v1/progress" not in server.paths

    follow.poll()
    assert watch.reports == [(10, 20, 3.0)]
    assert follow.following is Following.PER_TASK


@pytest.mark.parametrize(
    "not_running",
    [
        answer(200, {"active": False, "queued": True, "progress": None}),
        answer(200, {"active": True, "progress": None}),  # started, no step yet
    ],
    ids=["queued", "no-step-yet"],
)
def test_our_task_not_sampling_yet_reports_nothing_and_the_server_wide_job_is_not_asked(
    not_running: requests.Response,
) -> None:
    """The job sampling now is another task's: its steps are not ours to report."""
    server = FakeA1111(task_progress=[not_running])
    watch = Watch()
    follow = follower(server, watch, capacity=1)

    follow.poll()

    assert follow.following is Following.PER_TASK
    assert watch.reports == []
    assert server.paths == ["/internal/progress"]


def test_a_shared_endpoint_without_the_task_route_is_not_asked_again() -> None:
    server = FakeA1111(task_progress=[NO_ROUTE])
    watch = Watch()
    follow = follower(server, watch, capacity=2)

    for _ in range(3):
        follow.poll()

    assert follow.following is Following.NOT_OURS
    assert server.paths == ["/internal/progress"]  # one try; its job may be another's
    assert watch.reports == []


@pytest.mark.parametrize(
    "failure",
    [requests.ReadTimeout("slow"), answer(200, {"state": "busy"}), answer(200, b"")],
    ids=["timeout", "odd-shape", "empty"],
)
def test_a_failed_server_wide_poll_reports_nothing_and_the_next_one_does(
    failure: Script,
) -> None:
    server = FakeA1111(task_progress=[NO_ROUTE], progress=[failure, BUSY])
    watch = Watch()
    follow = follower(server, watch, capacity=1)

    follow.poll()
    assert follow.following is Following.SERVER_WIDE
    assert watch.reports == []

    follow.poll()
    assert watch.reports == [(7, 20, None)]


# --- interrupt -------------------------------------------------------------------------------


def test_an_interrupt_that_does_not_go_through_is_sent_again() -> None:
    server = FakeA1111(interrupt=[requests.ConnectionError("reset"), answer(200, {})])
    follow = follower(server, Watch())

    follow.interrupt()

    assert follow.interrupted
    assert server.paths.count("/sdapi/v1/interrupt") == 2


def test_a_call_that_already_ended_sends_no_interrupt() -> None:
    server = FakeA1111()
    follow = follower(server, Watch())
    follow.ended.set()

    follow.interrupt()

    assert not follow.interrupted
    assert server.paths == []


def test_a_job_that_ends_while_we_check_it_is_not_interrupted() -> None:
    """The running job may be the next task's by the time the interrupt would land."""
    server = FakeA1111()
    follow = follower(server, Watch())

    def ours_but_ending() -> requests.Response:
        follow.ended.set()  # the txt2img call returned meanwhile
        return ACTIVE

    server.routes["/internal/progress"] = [ours_but_ending]

    follow.interrupt()

    assert not follow.interrupted
    assert "/sdapi/v1/interrupt" not in server.paths
