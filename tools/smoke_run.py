"""`make smoke`: the smoke suite (tests/e2e/smoke) against a deployed gpuqueue stack.

The stack is named by its API URL, or by its CloudFormation stack name: then its `ApiUrl`
output is read here with the caller's AWS credentials (`describe_stacks`, nothing else),
before pytest starts, because the test session drops every AWS credential on purpose. The
suite itself speaks HTTP only, as a user who signs up: no state file, no admin, no AWS.

Usage::

    python tools/smoke_run.py --api-url https://abc123.execute-api.us-east-1.amazonaws.com
    python tools/smoke_run.py --stack gpuqueue-dev --region us-east-1 [-- PYTEST ARGS]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

REPO = Path(__file__).resolve().parents[1]
SUITE = "tests/e2e/smoke"
API_URL_ENV = "GPUQUEUE_SMOKE_API_URL"  # read by tests/e2e/smoke/conftest.py
TASK_TIMEOUT_ENV = "GPUQUEUE_SMOKE_TASK_TIMEOUT"
DEFAULT_TASK_TIMEOUT_SECONDS = 300.0
# pytest-timeout's limit per test must leave the task's own deadline room to fire first,
# so a slow stack fails with the task's statuses rather than a bare timeout traceback.
PYTEST_TIMEOUT_MARGIN_SECONDS = 120.0

USAGE = """\
usage: make smoke API_URL=https://<api-id>.execute-api.<region>.amazonaws.com
       make smoke STACK=<stack name> [REGION=us-east-1]

Runs the smoke suite (tests/e2e/smoke) against a deployed gpuqueue stack over HTTP, as a
freshly signed-up user. STACK reads the stack's ApiUrl output with your AWS credentials.
SMOKE_TIMEOUT=<seconds> bounds the wait for the image task (default 300).
`make test` runs the same suite against the local stack."""

Runner = Callable[[Sequence[str], Mapping[str, str]], int]


class SmokeTargetError(Exception):
    """No stack to test, or the named one cannot be found: said in a sentence."""


def stack_outputs(cloudformation: Any, stack: str) -> dict[str, str]:
    """The stack's outputs by key (`ApiUrl`, `WebSocketUrl`, ...)."""
    try:
        stacks = cloudformation.describe_stacks(StackName=stack)["Stacks"]
    except ClientError as exc:
        message = exc.response.get("Error", {}).get("Message", str(exc))
        raise SmokeTargetError(f"cannot read stack {stack!r}: {message}") from exc
    except BotoCoreError as exc:  # no credentials, no region, no network
        raise SmokeTargetError(f"cannot read stack {stack!r}: {exc}") from exc
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def resolve_api_url(
    api_url: str | None, stack: str | None, cloudformation: Callable[[], Any]
) -> str:
    """The API to test: `api_url`, or the `ApiUrl` output of `stack` (both: they must agree)."""
    if not api_url and not stack:
        raise SmokeTargetError("no stack to test: give API_URL or STACK")
    if not stack:
        return str(api_url).rstrip("/")
    outputs = stack_outputs(cloudformation(), stack)
    found = outputs.get("ApiUrl")
    if not found:
        have = ", ".join(sorted(outputs)) or "none"
        raise SmokeTargetError(f"stack {stack!r} has no ApiUrl output (outputs: {have})")
    if api_url and api_url.rstrip("/") != found.rstrip("/"):
        raise SmokeTargetError(f"API_URL {api_url} is not stack {stack!r}'s ApiUrl {found}")
    return found.rstrip("/")


def pytest_command(task_timeout: float, extra: Sequence[str]) -> list[str]:
    timeout = int(task_timeout + PYTEST_TIMEOUT_MARGIN_SECONDS)
    # -v names every check that passed (or skipped, with its reason) against that stack.
    return [sys.executable, "-m", "pytest", SUITE, "-v", f"--timeout={timeout}", *extra]


def _run(command: Sequence[str], env: Mapping[str, str]) -> int:
    return subprocess.run(command, cwd=REPO, env=dict(env), check=False).returncode


def main(argv: Sequence[str] | None = None, run: Runner = _run) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], usage=USAGE)
    parser.add_argument("--api-url", default=None)
    parser.add_argument("--stack", default=None)
    parser.add_argument("--region", default=None)
    parser.add_argument("--task-timeout", type=float, default=DEFAULT_TASK_TIMEOUT_SECONDS)
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)

    def cloudformation() -> Any:
        return boto3.client("cloudformation", region_name=args.region)

    try:
        api_url = resolve_api_url(args.api_url, args.stack, cloudformation)
    except SmokeTargetError as exc:
        print(f"make smoke: {exc}\n\n{USAGE}", file=sys.stderr)
        return 2
    print(f"smoke test of {api_url}" + (f" (stack {args.stack})" if args.stack else ""))
    env = {
        **os.environ,
        API_URL_ENV: api_url,
        TASK_TIMEOUT_ENV: f"{args.task_timeout:g}",
    }
    return run(pytest_command(args.task_timeout, args.pytest_args), env)


if __name__ == "__main__":
    sys.exit(main())
