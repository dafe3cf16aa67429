"""tools/lint_transformed.py: `make lint` also lints what SAM's transform writes, where AWS's
limits on generated resources (an SQS trigger's MaximumConcurrency, role actions) show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import lint_transformed  # tools/ is on the test path (tests/conftest.py)


def sam_template(*, maximum_concurrency: Any = 2, policies: list[Any] | None = None) -> dict:
    """One queue and one function it triggers, as template.yaml writes them."""
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Transform": "AWS::Serverless-2016-10-31",
        "Resources": {
            "Queue": {"Type": "AWS::SQS::Queue", "Properties": {"VisibilityTimeout": 60}},
            "Worker": {
                "Type": "AWS::Serverless::Function",
                "Properties": {
                    "CodeUri": "functions/worker/",
                    "Handler": "worker.handler",
                    "Runtime": "python3.12",
                    "Timeout": 10,
                    "Policies": policies or [],
                    "Events": {
                        "Work": {
                            "Type": "SQS",
                            "Properties": {
                                "Queue": {"Fn::GetAtt": ["Queue", "Arn"]},
                                "BatchSize": 1,
                                "ScalingConfig": {"MaximumConcurrency": maximum_concurrency},
                            },
                        }
                    },
                },
            },
        },
    }


def rules(findings: list[lint_transformed.Finding]) -> list[str]:
    return sorted(f.rule for f in findings)


def test_a_maximum_concurrency_sqs_refuses_fails_the_lint(tmp_path: Path) -> None:
    failing, _ = lint_transformed.lint(
        sam_template(maximum_concurrency=1), tmp_path / "transformed.json"
    )

    assert failing
    assert any("MaximumConcurrency" in "/".join(map(str, f.path)) for f in failing)
    assert (tmp_path / "transformed.json").is_file()


def test_sams_poller_policy_batch_actions_are_forgiven_and_said_so(tmp_path: Path) -> None:
    poller = [{"SQSPollerPolicy": {"QueueName": {"Fn::GetAtt": ["Queue", "QueueName"]}}}]

    failing, forgiven = lint_transformed.lint(
        sam_template(policies=poller), tmp_path / "transformed.json"
    )

    assert failing == []
    assert rules(forgiven) == ["W3037", "W3037"]
    assert {f.message.split("'")[1] for f in forgiven} == {
        "changemessagevisibilitybatch",
        "deletemessagebatch",
    }


def test_the_same_made_up_action_in_our_own_statement_still_fails(tmp_path: Path) -> None:
    own = [
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["sqs:DeleteMessageBatch"],
                    "Resource": {"Fn::GetAtt": ["Queue", "Arn"]},
                }
            ],
        }
    ]

    failing, forgiven = lint_transformed.lint(
        sam_template(policies=own), tmp_path / "transformed.json"
    )

    assert rules(failing) == ["W3037"]
    assert forgiven == []


def test_main_exits_1_and_names_the_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        lint_transformed, "load_template", lambda _path: sam_template(maximum_concurrency=1)
    )

    code = lint_transformed.main(["--output", str(tmp_path / "t.json")])

    out = capsys.readouterr().out
    assert code == 1
    assert "MaximumConcurrency" in out
    assert f"{tmp_path / 't.json'}:" in out
