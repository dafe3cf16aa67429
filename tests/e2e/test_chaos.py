"""`make chaos` in a small size: faults of every kind at once, and nothing stuck, lost,
doubled or over capacity (tools/chaos.py does the run and the checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# A group of its own: its stack runs beside the other end-to-end tests' one at a time.
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("chaos")]

REPO = Path(__file__).resolve().parents[2]
TASKS = 24


# The run's own bounds (its deadline, the subprocess timeout) end it; the suite-wide 120 s
# would cut a loaded machine's run short of them.
@pytest.mark.timeout(330)
def test_every_task_ends_once_despite_endpoint_faults_and_dispatcher_crashes(tmp_path):
    figures = tmp_path / "chaos.json"
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    command = [sys.executable, "tools/chaos.py", "--tasks", str(TASKS), "--deadline", "150"]
    run = subprocess.run(
        [*command, "--json", str(figures)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(figures.read_text())

    assert report["failures"] == []
    assert sum(report["statuses"].values()) == TASKS
    assert set(report["statuses"]) <= {"DONE", "FAILED"}
    assert report["stuck"] == []
    # Every fault happened: three dispatcher crashes that killed workers, a killed endpoint,
    # and calls on every endpoint (the hanging one's time out, the failing one's 500s).
    assert report["dispatcher_crashes"] == 3
    assert report["workers_killed"] >= 3
    assert report["endpoint_killed"] is True
    assert report["max_calls_per_task"] <= 3
    assert all(peak <= 2 for peak in report["max_in_flight"])
    assert report["gpu_calls"] >= TASKS
