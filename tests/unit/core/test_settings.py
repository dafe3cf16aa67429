"""Typed settings read from the env vars the template sets."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from gpuqueue.fleet.balancer import Strategy
from gpuqueue.settings import CheckerSettings, DispatcherSettings, StatsSettings


@pytest.fixture
def checker_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("ENDPOINTS_TABLE", "endpoints")
    for name in ("IMAGE_ENDPOINT_URLS", "HEALTH_CHECK_PERIOD_SECONDS", "SCHEDULE_PERIOD_SECONDS"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def dispatcher_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in {
        "TASKS_TABLE": "tasks",
        "ENDPOINTS_TABLE": "endpoints",
        "TASK_FILES_BUCKET": "images",
        "TASK_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/tasks",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("HEALTH_CHECK_PERIOD_SECONDS", "DISPATCH_STRATEGY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def stats_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name, value in {
        "TASK_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/tasks",
        "DEAD_LETTER_QUEUE_URL": "https://sqs.us-east-1.amazonaws.com/123456789012/tasks-dlq",
        "ENDPOINTS_TABLE": "endpoints",
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


def test_health_check_period_defaults_to_thirty_seconds(
    dispatcher_env: pytest.MonkeyPatch,
) -> None:
    assert DispatcherSettings().health_check_period_seconds == 30.0


def test_health_max_age_defaults_to_ninety_seconds(dispatcher_env: pytest.MonkeyPatch) -> None:
    assert DispatcherSettings().health_max_age_seconds == 90.0


def test_stats_health_max_age_defaults_to_ninety_seconds(stats_env: pytest.MonkeyPatch) -> None:
    assert StatsSettings().health_max_age_seconds == 90.0


def test_checker_health_check_period_defaults_to_thirty_seconds(
    checker_env: pytest.MonkeyPatch,
) -> None:
    assert CheckerSettings().health_check_period_seconds == 30.0


# --- CheckerSettings.rounds_per_run -----------------------------------------------------------


def test_checker_probes_twice_per_run_by_default(checker_env: pytest.MonkeyPatch) -> None:
    assert CheckerSettings().rounds_per_run == 2


@pytest.mark.parametrize(
    ("schedule", "period", "rounds"),
    [("60", "30", 2), ("60", "60", 1), ("60", "45", 1), ("3", "1.5", 2), ("60", "7", 8)],
)
def test_checker_rounds_per_run_is_how_many_whole_periods_fit_in_the_schedule(
    checker_env: pytest.MonkeyPatch, schedule: str, period: str, rounds: int
) -> None:
    checker_env.setenv("SCHEDULE_PERIOD_SECONDS", schedule)
    checker_env.setenv("HEALTH_CHECK_PERIOD_SECONDS", period)

    assert CheckerSettings().rounds_per_run == rounds


def test_checker_probes_at_least_once_when_the_period_exceeds_the_schedule(
    checker_env: pytest.MonkeyPatch,
) -> None:
    checker_env.setenv("HEALTH_CHECK_PERIOD_SECONDS", "120")

    assert CheckerSettings().rounds_per_run == 1


# --- DispatcherSettings.dispatch_strategy -----------------------------------------------------


def test_dispatch_strategy_defaults_to_least_loaded(dispatcher_env: pytest.MonkeyPatch) -> None:
    assert DispatcherSettings().dispatch_strategy is Strategy.LEAST_LOADED


@pytest.mark.parametrize("strategy", list(Strategy))
def test_dispatch_strategy_accepts_each_strategy_name(
    dispatcher_env: pytest.MonkeyPatch, strategy: Strategy
) -> None:
    dispatcher_env.setenv("DISPATCH_STRATEGY", strategy.value)

    assert DispatcherSettings().dispatch_strategy is strategy


def test_dispatch_strategy_rejects_an_unknown_name(dispatcher_env: pytest.MonkeyPatch) -> None:
    dispatcher_env.setenv("DISPATCH_STRATEGY", "bogus")

    with pytest.raises(ValidationError, match="dispatch_strategy"):
        DispatcherSettings()


# --- StatsSettings ----------------------------------------------------------------------------


def test_stats_reads_the_endpoints_table(stats_env: pytest.MonkeyPatch) -> None:
    assert StatsSettings().endpoints_table == "endpoints"


def test_stats_requires_the_endpoints_table(stats_env: pytest.MonkeyPatch) -> None:
    stats_env.delenv("ENDPOINTS_TABLE")

    with pytest.raises(ValidationError, match="endpoints_table"):
        StatsSettings()
