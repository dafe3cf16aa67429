"""Local EventBridge schedules: rate expressions, the Scheduled Event, the speed-up."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from fakes import RecordingFunction
from gpuqueue_local.lambda_runtime import InvocationResult
from gpuqueue_local.scheduler import Schedule, rate_seconds, scheduled_event
from gpuqueue_local.stack import MIN_HEALTH_PERIOD_SECONDS, StackOptions, local_function_env
from gpuqueue_testing import wait_for


def schedule(function: RecordingFunction, **kwargs: Any) -> Schedule:
    runtime: Any = function
    options: dict[str, Any] = {"rule_name": "stack-CheckerSchedule", "period_seconds": 60.0}
    options.update(kwargs)
    return Schedule(function=runtime, **options)


# --- rate_seconds ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "seconds"),
    [
        ("rate(1 minute)", 60.0),
        ("rate(5 minutes)", 300.0),
        ("rate(2 hours)", 7200.0),
        ("rate(1 hour)", 3600.0),
        ("rate(1 day)", 86400.0),
        ("rate(3 days)", 259200.0),
    ],
)
def test_rate_expression_gives_the_seconds_between_runs(expression: str, seconds: float) -> None:
    assert rate_seconds(expression) == seconds


def test_rate_expression_may_have_surrounding_whitespace() -> None:
    assert rate_seconds("  rate(10 minutes)\n") == 600.0


@pytest.mark.parametrize(
    "expression",
    [
        "cron(0/5 * * * ? *)",
        "rate(5 seconds)",
        "rate(minutes)",
        "rate(-1 minutes)",
        "rate(1.5 hours)",
        "rate 5 minutes",
        "rate(5 minutes",
        "",
    ],
)
def test_cron_and_malformed_expressions_are_refused(expression: str) -> None:
    with pytest.raises(ValueError, match="unsupported schedule expression"):
        rate_seconds(expression)


def test_zero_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        rate_seconds("rate(0 minutes)")


# --- scheduled_event --------------------------------------------------------------------


def test_scheduled_event_has_eventbridges_shape() -> None:
    event = scheduled_event("stack-CheckerSchedule", region="eu-west-1")

    assert event["version"] == "0"
    assert event["source"] == "aws.events"
    assert event["detail-type"] == "Scheduled Event"
    assert event["region"] == "eu-west-1"
    assert event["account"] == "123456789012"
    assert event["detail"] == {}
    assert event["time"].endswith("Z")


def test_scheduled_event_names_the_rule_in_resources() -> None:
    event = scheduled_event("stack-CheckerSchedule")

    assert event["resources"] == [
        "arn:aws:events:us-east-1:123456789012:rule/stack-CheckerSchedule"
    ]


def test_each_scheduled_event_has_its_own_id() -> None:
    assert scheduled_event("r")["id"] != scheduled_event("r")["id"]


# --- Schedule -------------------------------------------------------------------------


def test_interval_is_the_period_without_speedup() -> None:
    assert schedule(RecordingFunction(), period_seconds=60.0).interval == 60.0


def test_speedup_divides_the_interval() -> None:
    assert schedule(RecordingFunction(), period_seconds=60.0, speedup=60.0).interval == 1.0
    assert schedule(RecordingFunction(), period_seconds=60.0, speedup=0.5).interval == 120.0


def test_run_once_invokes_the_function_with_the_rules_scheduled_event() -> None:
    function = RecordingFunction()
    rule = schedule(function, rule_name="stack-CheckerSchedule")

    assert rule.run_once() is True

    assert rule.runs == 1
    [event] = function.events
    assert event["detail-type"] == "Scheduled Event"
    assert event["resources"] == [
        "arn:aws:events:us-east-1:123456789012:rule/stack-CheckerSchedule"
    ]


def test_failed_run_is_logged_and_reported() -> None:
    failure = InvocationResult(ok=False, error_type="ValueError", error_message="boom")
    lines: list[str] = []
    rule = schedule(RecordingFunction(result=failure), rule_name="r", log=lines.append)

    assert rule.run_once() is False

    assert lines == ["r failed: boom"]


def test_started_schedule_fires_at_once_then_every_interval() -> None:
    function = RecordingFunction()
    rule = schedule(function, period_seconds=60.0, speedup=600.0)  # every 0.1 s
    rule.start(fire_now=True)
    try:
        wait_for(lambda: len(function.events) >= 3, timeout=5.0, what="three scheduled runs")
    finally:
        rule.stop()


def test_stop_ends_the_schedules_thread() -> None:
    function = RecordingFunction()
    rule = schedule(function, period_seconds=60.0, speedup=600.0)
    rule.start(fire_now=True)
    wait_for(lambda: function.events, timeout=5.0, what="the first scheduled run")

    rule.stop()

    assert rule._thread is not None
    rule._thread.join(timeout=5.0)
    assert not rule._thread.is_alive()


def test_schedule_started_without_fire_now_waits_one_interval() -> None:
    function = RecordingFunction()
    rule = schedule(function, period_seconds=3600.0)
    rule.start(fire_now=False)
    try:
        assert rule._thread is not None
        assert rule._thread.is_alive()
        assert function.events == []
    finally:
        rule.stop()


# --- what a speed-up compresses -------------------------------------------------------


@pytest.mark.parametrize(
    ("template_period", "speedup", "compressed"),
    [("30", 2.0, 15.0), ("30", 20.0, MIN_HEALTH_PERIOD_SECONDS), ("120", 20.0, 6.0)],
)
def test_a_speedup_compresses_the_health_period_but_not_below_the_floor(
    template_period: str, speedup: float, compressed: float
):
    stack: Any = SimpleNamespace(
        resolver=SimpleNamespace(parameters={"HealthCheckPeriodSeconds": template_period})
    )

    env = local_function_env(StackOptions(schedule_speedup=speedup), stack)

    # A health row stays fresh for 3 periods: the floor keeps that window above a loaded
    # machine's delay between checker runs, while the schedules themselves run 20x faster.
    assert float(env["HEALTH_CHECK_PERIOD_SECONDS"]) == compressed
    assert float(env["SCHEDULE_PERIOD_SECONDS"]) == 60.0 / speedup
