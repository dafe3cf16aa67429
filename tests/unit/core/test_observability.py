"""The entry decorator every function wears: what an operator then finds in the logs and
the metrics of one invocation."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.metrics import MetricUnit

from gpuqueue.observability import Observability, correlate_task
from gpuqueue_testing import FakeLambdaContext


@pytest.fixture(autouse=True)
def own_service(monkeypatch: pytest.MonkeyPatch) -> str:
    # A service of its own: a fresh Powertools logger writing to this test's captured stdout.
    service = f"obs-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("POWERTOOLS_SERVICE_NAME", service)
    monkeypatch.setenv("POWERTOOLS_LOG_LEVEL", "INFO")
    return service


def printed(
    capsys: pytest.CaptureFixture[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(log lines, EMF blobs) printed so far."""
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    return [r for r in records if "_aws" not in r], [r for r in records if "_aws" in r]


def http_api_event(request_id: str) -> dict[str, Any]:
    return {"requestContext": {"requestId": request_id}, "rawPath": "/"}


def test_a_request_s_lines_carry_its_request_id_and_the_lambda_context(capsys):
    observed = Observability(correlation_id_path=correlation_paths.API_GATEWAY_HTTP)

    @observed.entry
    def lambda_handler(event: dict[str, Any], context: Any) -> str:
        observed.logger.info("handled")
        return "ok"

    context = FakeLambdaContext(function_name="submit")
    assert lambda_handler(http_api_event("req-1"), context) == "ok"
    [line], _ = printed(capsys)
    assert line["message"] == "handled"
    assert line["correlation_id"] == "req-1"
    assert line["function_name"] == "submit"
    assert line["function_request_id"] == context.aws_request_id


def test_a_task_s_keys_do_not_leak_into_the_next_invocation(capsys):
    observed = Observability()
    calls: list[str | None] = []

    @observed.entry
    def lambda_handler(event: dict[str, Any], context: Any) -> None:
        observed.logger.info("before")
        if event.get("task_id"):
            correlate_task(observed.logger, event["task_id"])
        observed.logger.info("after")
        calls.append(observed.logger.get_correlation_id())

    lambda_handler({"task_id": "t-1"}, FakeLambdaContext())
    lambda_handler({}, FakeLambdaContext())
    lines, _ = printed(capsys)
    assert [(line["message"], line.get("task_id")) for line in lines] == [
        ("before", None),
        ("after", "t-1"),
        ("before", None),
        ("after", None),
    ]
    assert lines[1]["correlation_id"] == "t-1"
    assert calls == ["t-1", None]


def test_metrics_are_flushed_also_when_the_handler_raises(capsys, own_service):
    observed = Observability(publishes_metrics=True)

    @observed.entry
    def lambda_handler(event: dict[str, Any], context: Any) -> None:
        observed.metrics.add_metric(name="TasksSubmitted", unit=MetricUnit.Count, value=1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        lambda_handler({}, FakeLambdaContext())
    _, [blob] = printed(capsys)
    assert blob["TasksSubmitted"] == [1.0]
    assert blob["service"] == own_service
    [directive] = blob["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "gpuqueue-test"


def test_a_function_without_metrics_has_none_to_add_to():
    observed = Observability()
    with pytest.raises(AttributeError, match="publishes_metrics"):
        _ = observed.metrics


def test_an_untraced_function_has_no_tracer_and_still_answers():
    observed = Observability(traced=False)

    @observed.entry
    def lambda_handler(event: dict[str, Any], context: Any) -> int:
        return 7

    assert observed.tracer is None
    assert lambda_handler({}, FakeLambdaContext()) == 7
