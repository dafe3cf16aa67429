"""The alarms, their topic and the dashboard in template.yaml (issue 8's thresholds)."""

from __future__ import annotations

import ast
import json
import operator as op
import re
from pathlib import Path
from typing import Any

import pytest

from gpuqueue_local.template import load_template

ROOT = Path(__file__).resolve().parents[3]
TEMPLATE = load_template()
RESOURCES: dict[str, dict[str, Any]] = TEMPLATE["Resources"]
CUSTOM_NAMESPACE = "gpuqueue/${AWS::StackName}"


def _alarms() -> dict[str, dict[str, Any]]:
    return {
        name: r["Properties"]
        for name, r in RESOURCES.items()
        if r["Type"] == "AWS::CloudWatch::Alarm"
    }


def emitted_metric_names() -> set[str]:
    """Every metric name the code emits: `add_metric(name=...)` and `single_metric(name=...)`
    calls, and the dispatcher's per-kind latency names, read from the source."""
    names: set[str] = set()
    sources = [*ROOT.glob("functions/*/*.py"), *ROOT.glob("layers/common/gpuqueue/**/*.py")]
    for path in sources:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in {"add_metric", "single_metric"}:
                    for keyword in node.keywords:
                        if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                            names.add(str(keyword.value.value))
            # Names held in a table (CALL_LATENCY_METRIC = {kind: "GenerationLatency", ...}).
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id.endswith("_METRIC") for t in node.targets
            ):
                for value in ast.walk(node.value):
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        names.add(value.value)
    return names


def test_the_code_scan_finds_the_known_metrics():
    assert {"TasksSubmitted", "TasksFailed", "HealthyEndpoints", "GenerationLatency"} <= (
        emitted_metric_names()
    )


def _stat(alarm: dict[str, Any], metric_id: str) -> dict[str, Any]:
    [metric] = [m for m in alarm["Metrics"] if m["Id"] == metric_id]
    stat: dict[str, Any] = metric["MetricStat"]
    return stat


def test_queue_usage_alarm_is_80_percent_of_the_capacity_parameter():
    alarm = _alarms()["QueueUsageAlarm"]
    [expression] = [m for m in alarm["Metrics"] if m.get("ReturnData")]
    assert expression["Expression"] == {"Fn::Sub": "100 * waiting / ${QueueCapacity}"}
    waiting = _stat(alarm, "waiting")["Metric"]
    assert waiting["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert waiting["Dimensions"][0]["Value"] == {"Fn::GetAtt": ["TaskQueue", "QueueName"]}
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 80)


def test_failure_rate_alarm_is_10_percent_of_finished_tasks():
    alarm = _alarms()["FailureRateAlarm"]
    [expression] = [m for m in alarm["Metrics"] if m.get("ReturnData")]
    assert "100 * failed / (failed + succeeded)" in expression["Expression"]
    assert _stat(alarm, "failed")["Metric"]["MetricName"] == "TasksFailed"
    assert _stat(alarm, "succeeded")["Metric"]["MetricName"] == "TasksSucceeded"
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 10)


def _metric_math(expression: str, values: dict[str, float]) -> float:
    """CloudWatch metric math for what our alarms use: IF, comparisons, + - * /, metric ids."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.BinOp):
            ops = {ast.Add: op.add, ast.Sub: op.sub, ast.Mult: op.mul, ast.Div: op.truediv}
            return float(ops[type(node.op)](value(node.left), value(node.right)))
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            tests = {ast.Lt: op.lt, ast.Gt: op.gt, ast.LtE: op.le, ast.GtE: op.ge, ast.Eq: op.eq}
            return float(tests[type(node.ops[0])](value(node.left), value(node.comparators[0])))
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "IF":
            condition, when_true, when_false = node.args
            return value(when_true) if value(condition) else value(when_false)
        raise ValueError(f"not in our metric math: {ast.dump(node)}")

    return value(ast.parse(expression, mode="eval").body)


def _in_alarm(alarm: dict[str, Any], figures: dict[str, float] | None) -> bool:
    """The alarm's state for one period's figures (metric name -> value; None: no data)."""
    if figures is None:
        return bool(alarm["TreatMissingData"] == "breaching")
    inputs = {
        m["Id"]: figures[m["MetricStat"]["Metric"]["MetricName"]]
        for m in alarm["Metrics"]
        if "MetricStat" in m
    }
    [expression] = [m["Expression"] for m in alarm["Metrics"] if m.get("ReturnData")]
    compare = {"GreaterThanThreshold": op.gt, "LessThanThreshold": op.lt}
    return bool(
        compare[alarm["ComparisonOperator"]](_metric_math(expression, inputs), alarm["Threshold"])
    )


@pytest.mark.parametrize(
    ("active", "healthy", "alarms"),
    [
        pytest.param(0, 0, False, id="no image endpoint yet (the default)"),
        pytest.param(1, 1, False, id="one-GPU fleet, healthy"),
        pytest.param(1, 0, True, id="one-GPU fleet, down"),
        pytest.param(2, 2, False, id="two healthy"),
        pytest.param(2, 1, True, id="one of two down"),
        pytest.param(5, 2, False, id="two of five healthy"),
        pytest.param(5, 1, True, id="one of five healthy"),
    ],
)
def test_the_image_endpoints_alarm_wants_min_2_and_the_active_ones_healthy(
    active: int, healthy: int, alarms: bool
) -> None:
    alarm = _alarms()["HealthyImageEndpointsAlarm"]
    figures = {"ActiveEndpoints": float(active), "HealthyEndpoints": float(healthy)}

    assert _in_alarm(alarm, figures) is alarms


def test_the_image_endpoints_alarm_fires_when_the_checker_stops_reporting() -> None:
    alarm = _alarms()["HealthyImageEndpointsAlarm"]

    assert _in_alarm(alarm, None) is True
    assert (alarm["EvaluationPeriods"], alarm["DatapointsToAlarm"]) == (3, 3)
    for metric in alarm["Metrics"]:
        if "MetricStat" in metric:
            assert {"Name": "Kind", "Value": "image"} in metric["MetricStat"]["Metric"][
                "Dimensions"
            ]


def test_average_processing_over_20_seconds_alarms():
    alarm = _alarms()["ProcessingTimeAlarm"]
    assert (alarm["MetricName"], alarm["Statistic"]) == ("GenerationLatency", "Average")
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 20000)


@pytest.mark.parametrize(
    "queue",
    [
        "TaskDeadLetterQueue",
        "PriorityDeadLetterQueue",
        "TaskEventsDeadLetterQueue",
        "WebhookDeadLetterQueue",
    ],
)
def test_every_dead_letter_queue_alarms_when_not_empty(queue):
    alarm = _alarms()[f"{queue}NotEmptyAlarm"]
    assert alarm["MetricName"] == "ApproximateNumberOfMessagesVisible"
    assert alarm["Dimensions"] == [
        {"Name": "QueueName", "Value": {"Fn::GetAtt": [queue, "QueueName"]}}
    ]
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0)


@pytest.mark.parametrize("queue", ["TaskQueue", "PriorityQueue"])
def test_oldest_message_age_alarms_at_the_parameter(queue):
    alarm = _alarms()[f"{queue}OldestMessageAlarm"]
    assert alarm["MetricName"] == "ApproximateAgeOfOldestMessage"
    assert alarm["Threshold"] == {"Ref": "AlarmOldestMessageSeconds"}
    assert TEMPLATE["Parameters"]["AlarmOldestMessageSeconds"]["Default"] == 900


@pytest.mark.parametrize("function", ["DispatcherFunction", "PriorityDispatcherFunction"])
@pytest.mark.parametrize("metric", ["Errors", "Throttles"])
def test_dispatcher_errors_and_throttles_alarm(function, metric):
    alarm = _alarms()[f"{function}{metric}Alarm"]
    assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/Lambda", metric)
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": function}}]
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0)


def test_every_alarm_notifies_the_topic_and_mail_is_optional():
    for name, alarm in _alarms().items():
        assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}], name
        assert alarm["OKActions"] == [{"Ref": "AlarmTopic"}], name
    subscription = RESOURCES["AlarmEmailSubscription"]
    assert subscription["Condition"] == "HasAlarmEmail"
    assert subscription["Properties"]["Endpoint"] == {"Ref": "AlarmEmail"}
    assert TEMPLATE["Parameters"]["AlarmEmail"]["Default"] == ""


def test_cloudwatch_alarms_may_use_the_key_their_topic_is_encrypted_with():
    """An alarm cannot publish to a topic under the AWS-managed alias/aws/sns key (its policy
    cannot grant CloudWatch): the notification is dropped. Our own key must grant it."""
    key_id = RESOURCES["AlarmTopic"]["Properties"]["KmsMasterKeyId"]
    assert isinstance(key_id, dict), f"{key_id!r} is not a key of this stack"
    [name] = key_id.values()
    key = RESOURCES[name if isinstance(name, str) else name[0]]
    assert key["Type"] == "AWS::KMS::Key"
    assert key["Properties"]["EnableKeyRotation"] is True
    statements = key["Properties"]["KeyPolicy"]["Statement"]

    def granted(principal: dict[str, Any]) -> set[str]:
        return {
            action
            for s in statements
            if s["Effect"] == "Allow" and s["Principal"] == principal and "Condition" not in s
            for action in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])
        }

    assert {"kms:GenerateDataKey*", "kms:Decrypt"} <= granted(
        {"Service": "cloudwatch.amazonaws.com"}
    )
    account = {"AWS": {"Fn::Sub": "arn:${AWS::Partition}:iam::${AWS::AccountId}:root"}}
    assert granted(account) == {"kms:*"}  # the account administers it (through IAM)


def test_alarms_on_custom_metrics_name_metrics_the_code_emits():
    emitted = emitted_metric_names()
    for name, alarm in _alarms().items():
        namespaces = [alarm.get("Namespace")] + [
            m["MetricStat"]["Metric"]["Namespace"]
            for m in alarm.get("Metrics", [])
            if "MetricStat" in m
        ]
        metrics = [alarm.get("MetricName")] + [
            m["MetricStat"]["Metric"]["MetricName"]
            for m in alarm.get("Metrics", [])
            if "MetricStat" in m
        ]
        for namespace, metric in zip(namespaces, metrics, strict=True):
            if namespace == {"Fn::Sub": CUSTOM_NAMESPACE}:
                assert metric in emitted, (name, metric)


def _dashboard() -> dict[str, Any]:
    body = RESOURCES["OperationsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    # ${Resource.Attribute} / ${AWS::Region} placeholders become plain strings.
    parsed: dict[str, Any] = json.loads(re.sub(r"\$\{[^}]+\}", "placeholder", body))
    return parsed


def test_dashboard_body_is_valid_json_naming_emitted_metrics_of_every_subject():
    widgets = _dashboard()["widgets"]
    emitted = emitted_metric_names()
    body = RESOURCES["OperationsDashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    custom = {
        metric[1]
        for widget in widgets
        for metric in widget["properties"].get("metrics", [])
        if metric[0] == "gpuqueue/placeholder"
    }
    assert "gpuqueue/${AWS::StackName}" in body
    assert custom <= emitted, custom - emitted
    titles = " ".join(w["properties"]["title"].lower() for w in widgets)
    for subject in ("queue depth", "throughput", "latency", "failures", "healthy endpoints"):
        assert subject in titles
    latency = next(w for w in widgets if "latency" in w["properties"]["title"].lower())
    stats = {m[-1]["stat"] for m in latency["properties"]["metrics"]}
    assert stats == {"p50", "p90", "p99"}
    alarms = next(w for w in widgets if w["type"] == "alarm")
    assert alarms["properties"]["alarms"]
