"""Waiting for a task to end (`generate --wait`, `transcribe`): over the API's push when it
offers one, else by polling, with a live status line."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

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
        # A live line: spinner, the task's state, and a ticking clock.
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=state.err,
            transient=True,
        ) as progress:
            line = progress.add_task(f"task {task_id}: submitted", total=None)

            def refresh(task: dict[str, Any]) -> None:
                progress.update(line, description=_status_line(task_id, task))

            return client.wait(
                task_id,
                timeout=timeout,
                poll_interval=poll_interval,
                on_update=refresh,
                push=push,
            )

    # Not a terminal (a pipe, CI): one line per change of state, not a redraw per poll.
    seen: list[object] = []

    def log_change(task: dict[str, Any]) -> None:
        if not seen or seen[-1] != task.get("status"):
            seen.append(task.get("status"))
            elapsed = time.monotonic() - started
            state.err.print(f"{_status_line(task_id, task)} ({elapsed:.1f} s)", soft_wrap=True)

    return client.wait(
        task_id, timeout=timeout, poll_interval=poll_interval, on_update=log_change, push=push
    )


def _status_line(task_id: str, task: dict[str, Any]) -> str:
    status = str(task.get("status", "?"))
    attempt = task.get("attempt")
    extra = f", attempt {attempt}" if isinstance(attempt, int) and attempt > 1 else ""
    return f"task {task_id}: {status}{extra}"
