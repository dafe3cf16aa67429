"""`--wait`'s ending and its status lines off a terminal (a pipe, CI): a task canceled while
waited on is a failure naming its state, Ctrl-C stops the wait but not the task, and the
lines show what the GPU reports (steps only when they make sense, a requested cancel)."""

from __future__ import annotations

import importlib.util
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import typer
from rich.console import Console

CLIENT_DIR = Path(__file__).resolve().parents[3] / "client"
if importlib.util.find_spec("gpuqueue_client") is None:  # no `pip install -e .` in this venv
    sys.path.insert(0, str(CLIENT_DIR))

from gpuqueue_client.client import GpuqueueClient  # noqa: E402
from gpuqueue_client.commands.invocation import State  # noqa: E402
from gpuqueue_client.commands.waiting import gpu_steps, wait_until_done  # noqa: E402

TASK_ID = "t-42"


class ScriptedClient:
    """`GpuqueueClient.wait` replaying task states to `on_update`, then returning the last
    (or raising, as Ctrl-C or the timeout would)."""

    def __init__(self, *states: dict[str, Any], then: BaseException | None = None) -> None:
        self.states = states
        self.then = then

    def wait(
        self,
        task_id: str,
        *,
        timeout: float,
        poll_interval: float,
        on_update: Callable[[dict[str, Any]], None],
        push: bool,
    ) -> dict[str, Any]:
        for state in self.states:
            on_update(state)
        if self.then is not None:
            raise self.then
        return self.states[-1]


def state() -> tuple[State, io.StringIO]:
    err = io.StringIO()
    console = Console(file=err, force_terminal=False, width=200, highlight=False)
    return State(api_url="http://api", token="tok", err=console), err


def wait(client: ScriptedClient) -> tuple[dict[str, Any] | int, list[str]]:
    """The task waited for (or the exit code) and the stderr lines."""
    invocation, err = state()
    try:
        outcome: dict[str, Any] | int = wait_until_done(
            invocation, cast(GpuqueueClient, client), TASK_ID, timeout=60, poll_interval=1
        )
    except typer.Exit as exit_:
        outcome = exit_.exit_code
    return outcome, [line.rsplit(" (", 1)[0] for line in err.getvalue().splitlines()]


def running(step: Any = None, steps: Any = None, **extra: Any) -> dict[str, Any]:
    task: dict[str, Any] = {"task_id": TASK_ID, "status": "RUNNING", **extra}
    if step is not None:
        task["progress"] = {"step": step, "steps": steps, "eta_seconds": None}
    return task


def test_a_task_canceled_while_waited_on_fails_naming_its_state() -> None:
    code, lines = wait(
        ScriptedClient(
            running(3, 20),
            running(4, 20, cancel_requested=True),
            {"task_id": TASK_ID, "status": "CANCELED"},
        )
    )

    assert code == 1
    assert lines == [
        f"task {TASK_ID}: RUNNING, step 3/20",
        f"task {TASK_ID}: RUNNING, cancel requested, step 4/20",
        f"task {TASK_ID}: CANCELED",
        f"error: task {TASK_ID} was canceled",
    ]


def test_ctrl_c_stops_the_wait_and_says_the_task_goes_on() -> None:
    code, lines = wait(ScriptedClient(running(), then=KeyboardInterrupt()))

    assert code == 130
    assert lines[-1] == f"stopped waiting; task {TASK_ID} goes on: `gpuqueue task {TASK_ID}`"


@pytest.mark.parametrize(
    ("step", "steps"),
    [(3, 0), ("3", 20), (3, None), (3.0, 20)],
    ids=["zero-steps", "step-text", "no-steps", "step-float"],
)
def test_progress_that_makes_no_sense_shows_no_steps(step: Any, steps: Any) -> None:
    task = running(step, steps)

    assert gpu_steps(task) is None
    done = {"task_id": TASK_ID, "status": "DONE"}
    outcome, lines = wait(ScriptedClient(task, done))
    assert outcome == done
    assert lines == [f"task {TASK_ID}: RUNNING", f"task {TASK_ID}: DONE"]
