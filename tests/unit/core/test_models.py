"""The boundary models: what an image request may ask for and what a client gets back."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from gpuqueue.models import (
    Endpoint,
    ImageParams,
    ImageRequest,
    Task,
    TaskKind,
    TaskStatus,
    TaskView,
)

NOW = 1_800_000_000.0


def image_request(**overrides: Any) -> ImageRequest:
    return ImageRequest.model_validate({"prompt": "a red fox in snow", **overrides})


def task(status: TaskStatus, **overrides: Any) -> Task:
    fields: dict[str, Any] = {
        "task_id": "task-1",
        "user_id": "user-1",
        "status": status,
        "prompt": "a red fox in snow",
        "created_at": "2026-01-27T10:00:00.000000Z",
        "updated_at": "2026-01-27T10:00:05.000000Z",
        "attempt": 1,
        **overrides,
    }
    return Task.model_validate(fields)


def endpoint(**overrides: Any) -> Endpoint:
    fields: dict[str, Any] = {
        "endpoint_id": "gpu-a",
        "url": "http://gpu-a:8000",
        "kind": TaskKind.IMAGE,
        "healthy": True,
        "last_checked_at": NOW - 30,
        **overrides,
    }
    return Endpoint.model_validate(fields)


# --- ImageRequest -----------------------------------------------------------------------------


def test_image_request_needs_a_prompt() -> None:
    with pytest.raises(ValidationError, match="prompt"):
        ImageRequest.model_validate({"width": 512})


def test_image_request_strips_whitespace_around_the_prompt() -> None:
    assert image_request(prompt="  a red fox  \n").prompt == "a red fox"


def test_image_request_rejects_a_prompt_of_only_whitespace() -> None:
    with pytest.raises(ValidationError, match="prompt"):
        image_request(prompt="   ")


def test_image_request_accepts_a_prompt_of_2000_characters() -> None:
    assert len(image_request(prompt="x" * 2000).prompt) == 2000


def test_image_request_rejects_a_prompt_longer_than_2000_characters() -> None:
    with pytest.raises(ValidationError, match="prompt"):
        image_request(prompt="x" * 2001)


def test_image_request_defaults_to_a_512_square_at_30_steps_without_seed() -> None:
    request = image_request()

    assert (request.width, request.height, request.steps, request.seed) == (512, 512, 30, None)


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize("value", [64, 72, 1024, 2048])
def test_image_sides_from_64_to_2048_in_steps_of_8_are_accepted(side: str, value: int) -> None:
    assert getattr(image_request(**{side: value}), side) == value


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize("value", [0, 56, 63, 100, 2049, 2056, -512])
def test_image_sides_outside_64_to_2048_or_not_a_multiple_of_8_are_rejected(
    side: str, value: int
) -> None:
    with pytest.raises(ValidationError, match=side):
        image_request(**{side: value})


@pytest.mark.parametrize("steps", [1, 150])
def test_steps_from_1_to_150_are_accepted(steps: int) -> None:
    assert image_request(steps=steps).steps == steps


@pytest.mark.parametrize("steps", [0, 151, -1])
def test_steps_outside_1_to_150_are_rejected(steps: int) -> None:
    with pytest.raises(ValidationError, match="steps"):
        image_request(steps=steps)


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seeds_across_the_unsigned_32_bit_range_are_accepted(seed: int) -> None:
    assert image_request(seed=seed).seed == seed


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seeds_outside_the_unsigned_32_bit_range_are_rejected(seed: int) -> None:
    with pytest.raises(ValidationError, match="seed"):
        image_request(seed=seed)


def test_image_request_rejects_fields_it_does_not_know() -> None:
    with pytest.raises(ValidationError, match="sampler"):
        image_request(sampler="euler_a")


def test_image_request_params_carry_the_generation_knobs_but_not_the_prompt() -> None:
    request = image_request(width=640, height=480, steps=20, seed=7, negative_prompt="blurry")

    assert request.params() == ImageParams(width=640, height=480, steps=20, seed=7)


# --- TaskView ---------------------------------------------------------------------------------


def test_a_done_task_shows_where_to_fetch_its_image() -> None:
    view = TaskView.of(task(TaskStatus.DONE, result_key="results/task-1.png"))

    assert view.result_url == "/api/images/task-1"


@pytest.mark.parametrize(
    "status", [TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.FAILED, TaskStatus.CANCELED]
)
def test_a_task_that_is_not_done_has_no_image_url(status: TaskStatus) -> None:
    assert TaskView.of(task(status)).result_url is None


def test_a_failed_task_shows_why_it_failed() -> None:
    view = TaskView.of(task(TaskStatus.FAILED, error="HTTP 400 from gpu-a"))

    assert view.error == "HTTP 400 from gpu-a"


@pytest.mark.parametrize(
    "status", [TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.DONE, TaskStatus.CANCELED]
)
def test_an_error_from_an_earlier_attempt_is_hidden_unless_the_task_failed(
    status: TaskStatus,
) -> None:
    view = TaskView.of(task(status, error="attempt 1 on gpu-a: timed out"))

    assert view.error is None


def test_task_view_does_not_expose_lease_or_storage_internals() -> None:
    stored = task(
        TaskStatus.RUNNING, lease_id="lease-1", lease_until=NOW, result_key="results/x.png"
    )

    shown = TaskView.of(stored).model_dump()

    assert {"lease_id", "lease_until", "result_key", "expires_at"} & set(shown) == set()


# --- Endpoint.is_routable -------------------------------------------------------------------


def test_a_healthy_recently_checked_endpoint_is_routable() -> None:
    assert endpoint().is_routable(NOW, max_age_seconds=180) is True


def test_an_unhealthy_endpoint_is_not_routable_however_fresh() -> None:
    assert endpoint(healthy=False, last_checked_at=NOW).is_routable(NOW, 180) is False


def test_an_endpoint_never_checked_is_not_routable() -> None:
    assert endpoint(last_checked_at=None).is_routable(NOW, 180) is False


def test_a_healthy_row_older_than_the_max_age_is_not_routable() -> None:
    assert endpoint(last_checked_at=NOW - 181).is_routable(NOW, 180) is False


def test_a_healthy_row_exactly_at_the_max_age_is_still_routable() -> None:
    assert endpoint(last_checked_at=NOW - 180).is_routable(NOW, 180) is True


# --- TaskStatus -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [TaskStatus.DONE, TaskStatus.FAILED, TaskStatus.CANCELED])
def test_done_failed_and_canceled_are_terminal(status: TaskStatus) -> None:
    assert status.is_terminal is True


@pytest.mark.parametrize("status", [TaskStatus.QUEUED, TaskStatus.RUNNING])
def test_queued_and_running_are_not_terminal(status: TaskStatus) -> None:
    assert status.is_terminal is False
