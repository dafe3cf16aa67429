"""Waiting for a task to end (`generate --wait`, `transcribe`): over the API's push when it
offers one, else by polling, with a live status line (and, while its GPU reports steps, a
progress bar with step n/N and the ETA), on stderr: stdout stays the command's output."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import RenderableType
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Task as ProgressTask
from rich.text import Text

from ..client import GpuqueueClient
from .invocation import State

PushOption = Annotated[
    bool,
    typer.Option(
        "--push/--no-push",
        help="With --wait: hear of the end over the API's WebSocket when it offers one "
        "(else, or if it drops: poll); --no-push always polls.",
    ),
]


def wait_until_done(
    state: State,
    client: GpuqueueClient,
    task_id: str,
    timeout: float,
    poll_interval: float,
    *,
    push: bool = True,
    follow_up: str = "",
) -> dict[str, Any]:
    """Wait for the task (a live status line); fail unless it ends DONE."""
    check = f"`gpuqueue task {task_id}`{follow_up}"
    try:
        task = _wait_with_status(state, client, task_id, timeout, poll_interval, push=push)
    except TimeoutError:
        state.fail(
            f"error: task {task_id} not finished after {timeout:g} s; check on it with {check}"
        )
    except KeyboardInterrupt:
        state.fail(f"stopped waiting; task {task_id} goes on: {check}", code=130)
    status = task.get("status")
    if status in ("FAILED", "EXPIRED"):
        verb = "failed" if status == "FAILED" else "expired in the queue"
        state.fail(f"error: task {task_id} {verb}: {task.get('error') or 'unknown error'}")
    if status != "DONE":
        state.fail(f"error: task {task_id} was {str(status).lower()}")
    return task


def _wait_with_status(
    state: State,
    client: GpuqueueClient,
    task_id: str,
    timeout: float,
    poll_interval: float,
    *,
    push: bool = True,
) -> dict[str, Any]:
    started = time.monotonic()
    if state.err.is_terminal:
        # A live line: spinner, the task's state, its GPU's steps as a bar once the server
        # reports them (with step n/N and the ETA), and a ticking clock.
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            StepBar(bar_width=30),
            TextColumn("{task.fields[steps]}"),
            TimeElapsedColumn(),
            console=state.err,
            transient=True,
        ) as progress:
            line = progress.add_task(
                f"task {task_id}: submitted", total=1, completed=0, steps="", bar=False
            )

            def refresh(task: dict[str, Any]) -> None:
                # Drawn at once (refresh): each state read or push is a change worth seeing,
                # and they come at most every poll interval or 2 s.
                steps = gpu_steps(task)
                if steps is None:
                    progress.update(
                        line,
                        description=_status_line(task_id, task),
                        steps="",
                        bar=False,
                        refresh=True,
                    )
                    return
                step, total, eta = steps
                progress.update(
                    line,
                    description=_status_line(task_id, task),
                    total=total,
                    completed=step,
                    steps=_steps_text(step, total, eta),
                    bar=True,
                    refresh=True,
                )

            return client.wait(
                task_id,
                timeout=timeout,
                poll_interval=poll_interval,
                on_update=refresh,
                push=push,
            )

    # Not a terminal (a pipe, CI): one line per change of state or of step, not a redraw
    # per poll (steps come at most every 2 s: the API's bound on progress writes).
    seen: list[object] = []

    def log_change(task: dict[str, Any]) -> None:
        steps = gpu_steps(task)
        shown = (task.get("status"), steps[0] if steps else None, task.get("cancel_requested"))
        if not seen or seen[-1] != shown:
            seen.append(shown)
            elapsed = time.monotonic() - started
            extra = f", {_steps_text(*steps)}" if steps else ""
            state.err.print(
                f"{_status_line(task_id, task)}{extra} ({elapsed:.1f} s)", soft_wrap=True
            )

    return client.wait(
        task_id, timeout=timeout, poll_interval=poll_interval, on_update=log_change, push=push
    )


class StepBar(ProgressColumn):
    """The bar, only while the GPU reports steps: a protocol that reports none (or a task
    not running) shows its status alone, never an empty or pulsing bar."""

    def __init__(self, bar_width: int) -> None:
        super().__init__()
        self._bar = BarColumn(bar_width=bar_width)

    def render(self, task: ProgressTask) -> RenderableType:
        return self._bar.render(task) if task.fields.get("bar") else Text("")


def gpu_steps(task: dict[str, Any]) -> tuple[int, int, float | None] | None:
    """(step, steps, eta seconds or None) of a RUNNING task whose server reports steps."""
    progress = task.get("progress")
    if task.get("status") != "RUNNING" or not isinstance(progress, dict):
        return None
    step, steps, eta = progress.get("step"), progress.get("steps"), progress.get("eta_seconds")
    if not isinstance(step, int) or not isinstance(steps, int) or steps < 1:
        return None
    return step, steps, float(eta) if isinstance(eta, int | float) else None


def _steps_text(step: int, steps: int, eta: float | None) -> str:
    return f"step {step}/{steps}" + (f", ETA {eta:.0f} s" if eta is not None else "")


def _status_line(task_id: str, task: dict[str, Any]) -> str:
    status = str(task.get("status", "?"))
    attempt = task.get("attempt")
    extra = f", attempt {attempt}" if isinstance(attempt, int) and attempt > 1 else ""
    if status == "RUNNING" and task.get("cancel_requested") is True:
        extra += ", cancel requested"
    return f"task {task_id}: {status}{extra}"
