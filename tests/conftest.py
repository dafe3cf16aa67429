"""Shared test setup: import paths and a safe AWS environment (helpers: gpuqueue_testing)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Every function folder on one path, as STYLE.md says (handler module names are unique).
for path in [
    REPO / "tests",
    REPO / "layers/common",
    REPO / "local",
    REPO / "tools",
    *sorted((REPO / "functions").iterdir()),
]:
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# Never reach a real account from a test.
for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
    os.environ.pop(var, None)
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_SERVICE_NAME": "gpuqueue",
        "POWERTOOLS_METRICS_NAMESPACE": "gpuqueue-test",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
    }
)


from gpuqueue_testing import FakeLambdaContext  # noqa: E402


@pytest.fixture
def lambda_context() -> type[FakeLambdaContext]:
    return FakeLambdaContext
