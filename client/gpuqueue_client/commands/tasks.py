"""Tasks: `generate` an image, list `tasks`, show a `task`, `cancel` one, the queue's `stats`."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from .invocation import friendly_errors, state_of
from .waiting import PushOption, wait_until_done

STATUS_STYLES = {
    "AWAITING_UPLOAD": "blue",
    "QUEUED": "yellow",
    "RUNNING": "cyan",
    "DONE": "green",
    "FAILED": "red",
    "CANCELED": "magenta",
    "EXPIRED": "magenta",
}


def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    *,
    negative_prompt: Annotated[
        str | None, typer.Option("--negative-prompt", help="What not to draw.")
    ] = None,
    width: Annotated[int | None, typer.Option(help="64-2048, a multiple of 8.")] = None,
    height: Annotated[int | None, typer.Option(help="64-2048, a multiple of 8.")] = None,
    steps: Annotated[int | None, typer.Option(help="1-150.")] = None,
    seed: Annotated[int | None, typer.Option(help="0-4294967295.")] = None,
    priority: Annotated[
        str | None,
        typer.Option(help="normal, or high: the priority lane (vip and admin users only)."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the result and download it.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where --wait saves the PNG.", show_default="ID.png"),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="With --wait: give up after this many seconds.", min=0)
    ] = 300,
    poll_interval: Annotated[
        float, typer.Option(help="With --wait: seconds between polls.", min=0.01)
    ] = 1.0,
    push: PushOption = True,
) -> None:
    """Queue an image task; print its id (with --wait: wait, download, print the file)."""
    state = state_of(ctx)
    client = state.client()
    with friendly_errors(state):
        queued = client.submit_image(
            prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            seed=seed,
            priority=priority,
        )
    task_id = str(queued["task_id"])
    state.out.print(task_id, soft_wrap=True)
    if not wait:
        return
    started = time.monotonic()
    with friendly_errors(state):
        wait_until_done(state, client, task_id, timeout, poll_interval, push=push)
        elapsed = time.monotonic() - started
        image = client.download_image(task_id)
    path = output if output is not None else Path(f"{task_id}.png")
    path.write_bytes(image)
    state.err.print(f"task {task_id} DONE in {elapsed:.1f} s", style="green", soft_wrap=True)
    state.out.print(str(path), soft_wrap=True)


def tasks(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="Tasks per page (1-100).")] = 20,
    cursor: Annotated[
        str | None, typer.Option(help="The next-page cursor a previous call printed.")
    ] = None,
) -> None:
    """List your tasks, newest first."""
    state = state_of(ctx)
    client = state.client()
    with friendly_errors(state):
        page, next_cursor = client.list_tasks(limit=limit, cursor=cursor)
    if not page:
        state.out.print("no tasks")
    else:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        table.add_column("id", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("created (UTC)", no_wrap=True)
        # The one column that gives way on a narrow terminal: cut, never wrapped.
        table.add_column("prompt")
        for task in page:
            status = str(task.get("status", ""))
            table.add_row(
                str(task.get("task_id", "")),
                Text(status, style=STATUS_STYLES.get(status, "")),
                _when(task.get("created_at")),
                Text(str(task.get("prompt", "")), no_wrap=True, overflow="ellipsis"),
            )
        state.out.print(table)
    if next_cursor:
        state.out.print(f"next page: gpuqueue tasks --cursor {next_cursor}", soft_wrap=True)


def _when(value: object) -> str:
    if not isinstance(value, str) or not value:
        return ""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M")


def task(ctx: typer.Context, task_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Show one task as JSON."""
    state = state_of(ctx)
    client = state.client()
    with friendly_errors(state):
        body = client.get_task(task_id)
    state.out.print_json(data=body)


def cancel(ctx: typer.Context, task_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Cancel a task: a QUEUED one at once; a RUNNING one is asked to stop (its GPU server
    is interrupted; OpenAI-compatible endpoints cannot stop a job, it finishes)."""
    state = state_of(ctx)
    client = state.client()
    with friendly_errors(state):
        body = client.cancel(task_id)
    status = str(body.get("status", "CANCELED"))
    if status == "RUNNING" and body.get("cancel_requested") is True:
        # Not over yet: the GPU is being stopped; the task ends CANCELED within seconds.
        state.out.print(f"task {task_id}: RUNNING, cancel requested", soft_wrap=True)
        state.err.print(
            f"its GPU is being stopped; `gpuqueue task {task_id}` shows it CANCELED once it is",
            soft_wrap=True,
        )
        return
    state.out.print(f"task {task_id}: {status}", soft_wrap=True)


def stats(ctx: typer.Context) -> None:
    """Show the queue's numbers."""
    state = state_of(ctx)
    client = state.client()
    with friendly_errors(state):
        body = client.stats()
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("metric", no_wrap=True)
    table.add_column("value")
    for key, value in body.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        table.add_row(str(key), Text(shown))
    state.out.print(table)
