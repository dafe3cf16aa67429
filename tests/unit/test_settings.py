"""Typed settings read from the env vars the template sets."""

from __future__ import annotations

import pytest

from gpuqueue.settings import CheckerSettings, DispatcherSettings


@pytest.fixture
def checker_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("ENDPOINTS_TABLE", "endpoints")
    monkeypatch.delenv("IMAGE_ENDPOINT_URLS", raising=False)
    return monkeypatch


@pytest.fixture
def dispatcher_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in {
        "TASKS_TABLE": "tasks",
        "ENDPOINTS_TABLE": "endpoints",
        "IMAGES_BUCKET": "images",
        "TASK_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/tasks",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HEALTH_CHECK_PERIOD_SECONDS", raising=False)
    return monkeypatch


def test_checker_reads_comma_separated_endpoint_urls(checker_env: pytest.MonkeyPatch) -> None:
    checker_env.setenv("IMAGE_ENDPOINT_URLS", "http://gpu-a:8000,http://gpu-b:8000")

    assert CheckerSettings().image_endpoint_urls == ["http://gpu-a:8000", "http://gpu-b:8000"]


def test_checker_ignores_spaces_around_endpoint_urls(checker_env: pytest.MonkeyPatch) -> None:
    checker_env.setenv("IMAGE_ENDPOINT_URLS", "  http://gpu-a:8000 ,\thttp://gpu-b:8000  ")

    assert CheckerSettings().image_endpoint_urls == ["http://gpu-a:8000", "http://gpu-b:8000"]


def test_checker_drops_trailing_slashes_from_endpoint_urls(
    checker_env: pytest.MonkeyPatch,
) -> None:
    checker_env.setenv("IMAGE_ENDPOINT_URLS", "http://gpu-a:8000/,http://gpu-b:8000/v1/")

    assert CheckerSettings().image_endpoint_urls == ["http://gpu-a:8000", "http://gpu-b:8000/v1"]


def test_checker_has_no_endpoints_when_the_parameter_is_empty(
    checker_env: pytest.MonkeyPatch,
) -> None:
    checker_env.setenv("IMAGE_ENDPOINT_URLS", "")

    assert CheckerSettings().image_endpoint_urls == []


def test_checker_skips_empty_items_between_commas(checker_env: pytest.MonkeyPatch) -> None:
    checker_env.setenv("IMAGE_ENDPOINT_URLS", ",http://gpu-a:8000,, ,")

    assert CheckerSettings().image_endpoint_urls == ["http://gpu-a:8000"]


def test_checker_has_no_endpoints_when_the_variable_is_unset(
    checker_env: pytest.MonkeyPatch,
) -> None:
    assert CheckerSettings().image_endpoint_urls == []


@pytest.mark.parametrize(("period", "max_age"), [("60", 180.0), ("20", 60.0)])
def test_health_rows_go_stale_after_three_check_periods(
    dispatcher_env: pytest.MonkeyPatch, period: str, max_age: float
) -> None:
    dispatcher_env.setenv("HEALTH_CHECK_PERIOD_SECONDS", period)

    assert DispatcherSettings().health_max_age_seconds == max_age


def test_health_max_age_defaults_to_three_minutes(dispatcher_env: pytest.MonkeyPatch) -> None:
    assert DispatcherSettings().health_max_age_seconds == 180.0
