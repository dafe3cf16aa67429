"""`make smoke` (tools/smoke_run.py): which stack it tests, and how it says it has none.
CloudFormation is stubbed (botocore's Stubber): nothing leaves the process."""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence
from typing import Any

import boto3
import pytest
from botocore.exceptions import NoCredentialsError
from botocore.stub import Stubber

import smoke_run  # tools/ is on the test path (tests/conftest.py)
from e2e.smoke.smoke_api import new_password  # tests/ is on the test path too
from gpuqueue_local.template import load_template, resources_of_type

API = "https://abc123.execute-api.eu-west-1.amazonaws.com"


class Recorder:
    """Stands in for running pytest: keeps the command and environment it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []

    def __call__(self, command: Sequence[str], env: Mapping[str, str]) -> int:
        self.calls.append((list(command), dict(env)))
        return 0


def _stubbed_cloudformation(stacks: list[dict[str, Any]] | None, error: str | None = None):
    client = boto3.client("cloudformation", region_name="eu-west-1")
    stubber = Stubber(client)
    if error is not None:
        stubber.add_client_error(
            "describe_stacks", service_error_code="ValidationError", service_message=error
        )
    else:
        stubber.add_response("describe_stacks", {"Stacks": stacks or []}, {"StackName": "gq"})
    stubber.activate()
    return client


def _stack(outputs: dict[str, str]) -> dict[str, Any]:
    return {
        "StackName": "gq",
        "CreationTime": "2026-12-01T00:00:00Z",
        "StackStatus": "UPDATE_COMPLETE",
        "Outputs": [{"OutputKey": k, "OutputValue": v} for k, v in outputs.items()],
    }


def test_without_api_url_or_stack_it_prints_the_usage_and_runs_nothing(capsys):
    run = Recorder()

    code = smoke_run.main([], run=run)

    assert code == 2
    assert run.calls == []
    err = capsys.readouterr().err
    assert "no stack to test: give API_URL or STACK" in err
    assert "usage: make smoke API_URL=https://" in err
    assert "make smoke STACK=<stack name> [REGION=us-east-1]" in err


def test_an_api_url_runs_the_smoke_suite_against_it_with_a_timeout_past_the_tasks():
    run = Recorder()

    code = smoke_run.main(
        ["--api-url", API + "/", "--task-timeout", "90", "--", "-k", "png"], run=run
    )

    assert code == 0
    [(command, env)] = run.calls
    assert command[1:4] == ["-m", "pytest", "tests/e2e/smoke"]
    assert command[-2:] == ["-k", "png"]
    timeout = next(int(a.split("=")[1]) for a in command if a.startswith("--timeout="))
    assert timeout > 90
    assert env["GPUQUEUE_SMOKE_API_URL"] == API
    assert env["GPUQUEUE_SMOKE_TASK_TIMEOUT"] == "90"


def test_the_suites_exit_code_is_make_smokes():
    assert smoke_run.main(["--api-url", API], run=lambda command, env: 1) == 1


def test_a_stack_name_is_resolved_to_its_api_url_output():
    client = _stubbed_cloudformation([_stack({"ApiUrl": API, "WebSocketUrl": "wss://ws"})])

    assert smoke_run.resolve_api_url(None, "gq", lambda: client) == API


def test_an_api_url_that_is_not_the_stacks_is_refused():
    client = _stubbed_cloudformation([_stack({"ApiUrl": API})])

    with pytest.raises(smoke_run.SmokeTargetError, match="is not stack 'gq'"):
        smoke_run.resolve_api_url("https://other.example", "gq", lambda: client)


def test_an_unknown_stack_fails_with_cloudformations_reason():
    client = _stubbed_cloudformation(None, error="Stack with id gq does not exist")

    with pytest.raises(smoke_run.SmokeTargetError, match="cannot read stack 'gq': Stack with id"):
        smoke_run.resolve_api_url(None, "gq", lambda: client)


def test_missing_aws_credentials_fail_in_a_sentence_not_a_traceback():
    class NoCredentials:
        def describe_stacks(self, **_: Any) -> dict[str, Any]:
            raise NoCredentialsError

    with pytest.raises(smoke_run.SmokeTargetError, match="cannot read stack 'gq': Unable to"):
        smoke_run.resolve_api_url(None, "gq", NoCredentials)


def test_a_stack_without_an_api_url_output_names_the_outputs_it_has():
    client = _stubbed_cloudformation([_stack({"WebSocketUrl": "wss://ws"})])

    with pytest.raises(
        smoke_run.SmokeTargetError, match=r"no ApiUrl output \(outputs: WebSocketUrl\)"
    ):
        smoke_run.resolve_api_url(None, "gq", lambda: client)


def test_the_smoke_users_password_meets_the_templates_password_policy():
    template = load_template()
    [pool] = resources_of_type(template, "AWS::Cognito::UserPool").values()
    policy = pool["Properties"]["Policies"]["PasswordPolicy"]
    # The PasswordMinimumLength parameter: long enough for the longest it may be.
    assert policy["MinimumLength"] == {"Ref": "PasswordMinimumLength"}
    longest_minimum = int(template["Parameters"]["PasswordMinimumLength"]["MaxValue"])
    classes = {
        "RequireLowercase": string.ascii_lowercase,
        "RequireUppercase": string.ascii_uppercase,
        "RequireNumbers": string.digits,
        "RequireSymbols": "^$*.[]{}()?\"!@#%&/\\,><':;|_~`=+-",  # Cognito's symbol set
    }

    passwords = {new_password() for _ in range(20)}

    assert len(passwords) == 20  # random: every run's user gets its own
    for password in passwords:
        assert longest_minimum <= len(password) <= 256
        for rule, characters in classes.items():
            if policy.get(rule):
                assert set(password) & set(characters), (rule, password)
