"""Which webhooks a callback-mode Cog endpoint asks for: all of them by default (progress,
and a cancel passed on within seconds), or `completed` only, the cheapest."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gpuqueue.fleet.endpoint_declarations import read_declarations
from gpuqueue.fleet.fleet_admin import EndpointSpec
from gpuqueue.gpu.cog_webhooks import CogPredictions
from gpuqueue.gpu.credentials import CredentialScope
from gpuqueue.models import Endpoint, EndpointProtocol, Task, TaskKind, TaskStatus


class Answer:
    status_code = 202
    text = ""


class RecordingSession:
    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    def put(self, url: str, *, json: dict[str, Any], **_: Any) -> Answer:
        self.bodies.append(json)
        return Answer()


def _events(callback_progress: bool) -> list[str]:
    session = RecordingSession()
    endpoint = Endpoint(
        endpoint_id="cog-1",
        url="http://gpu:5000",
        kind=TaskKind.IMAGE,
        protocol=EndpointProtocol.COG,
        callback=True,
        callback_progress=callback_progress,
    )
    task = Task(
        task_id="t-1",
        user_id="alice",
        status=TaskStatus.RUNNING,
        prompt="a lighthouse",
        created_at="2026-12-07T00:00:00.000000Z",
        updated_at="2026-12-07T00:00:00.000000Z",
    )
    CogPredictions(session).start(  # type: ignore[arg-type]
        endpoint, task, prediction_id="t-1-a1", webhook="https://api.example/hook"
    )
    (body,) = session.bodies
    return list(body["webhook_events_filter"])


def test_by_default_cog_sends_its_logs_too_for_the_progress_and_a_prompt_cancel() -> None:
    assert _events(callback_progress=True) == ["start", "logs", "completed"]


def test_without_progress_one_webhook_a_prediction() -> None:
    assert _events(callback_progress=False) == ["completed"]


def test_the_option_is_taken_from_the_admin_api_and_the_parameters_for_cog_only() -> None:
    spec = EndpointSpec(
        url="http://gpu:5000",
        kind=TaskKind.IMAGE,
        protocol="cog",
        callback=True,
        callback_progress=False,
    )
    assert spec.callback_progress is False
    with pytest.raises(ValidationError, match="callback mode is for cog endpoints only"):
        EndpointSpec(
            url="http://gpu:7860", kind=TaskKind.IMAGE, protocol="a1111", callback_progress=False
        )

    declared = read_declarations(
        {},
        {
            TaskKind.IMAGE: '[{"id": "c", "url": "http://c", "protocol": "cog", '
            '"callback": true, "callback_progress": false}]'
        },
        CredentialScope(secret_prefix="prod/gpu/", parameter_prefix="/prod/gpu/"),
    )
    (endpoint,) = declared[TaskKind.IMAGE].endpoints
    assert (endpoint.callback, endpoint.callback_progress) == (True, False)
