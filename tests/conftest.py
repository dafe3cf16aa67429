"""Shared test setup: import paths and a safe AWS environment (helpers: gpuqueue_testing)."""

from __future__ import annotations

import gc
import json
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


def pytest_configure(config: pytest.Config) -> None:
    if "MUTANT_UNDER_TEST" in os.environ:
        # `make mutate` runs each mutant's tests in a fork of mutmut's process, whose heap
        # holds every module the tests import; pytest ends each session with five full
        # collections (0.85 s a mutant). Frozen, they leave that heap alone.
        gc.freeze()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    took = _mutmut_test_durations()
    if took:
        # Under `make mutate`, a mutant's tests fastest first: most mutants die at their
        # first failing test (-x), so a killed one costs its fastest test, not a random one.
        items.sort(key=lambda item: took.get(item.nodeid, 0.0))


def _mutmut_test_durations() -> dict[str, float]:
    """Each test's clean duration as mutmut measured it (its stats file, in the directory
    mutants run in); empty outside `make mutate`."""
    stats = Path("mutmut-stats.json")
    if "MUTANT_UNDER_TEST" not in os.environ or not stats.is_file():
        return {}
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    return {str(test): float(seconds) for test, seconds in durations.items()}
