"""`gpuqueue`: register, log in, submit, wait for and download images from the command line."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

import requests
import typer
from rich import box
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from . import credentials
from .client import ApiError, GpuqueueClient

DEFAULT_API_URL = "http://127.0.0.1:3000"
LOGIN_HINT = "not logged in or token expired: run `gpuqueue login`"
STATUS_STYLES = {
    "QUEUED": "yellow",
    "RUNNING": "cyan",
    "DONE": "green",
    "FAILED": "red",
    "CANCELED": "magenta",
}

app = typer.Typer(
    name="gpuqueue",
    help="Submit image tasks to a gpuqueue API and fetch the results.",
    no_args_is_help=True,
    add_completion=False,
    # Never print locals on a crash: they hold passwords and tokens.
    pretty_exceptions_show_locals=False,
)


@dataclass
class State:
    api_url: str
    token: str | None
    # Made per invocation so that COLUMNS and the streams in force now are the ones used.
    out: Console = field(default_factory=lambda: Console(highlight=False))
    err: Console = field(default_factory=lambda: Console(stderr=True, highlight=False))

    def fail(self, message: str, code: int = 1) -> NoReturn:
        self.err.print(Text(message, style="bold red"), soft_wrap=True)
        raise typer.Exit(code)

    def anonymous_client(self) -> GpuqueueClient:
        return GpuqueueClient(self.api_url)

    def client(self) -> GpuqueueClient:
        """A client with the --token / $GPUQUEUE_TOKEN token, else the cached one."""
        token = self.token
        if not token:
            cached = credentials.load(self.api_url)
            if cached is None or cached.expired():
                self.fail(f"error: {LOGIN_HINT}")
            token = cached.token
        return GpuqueueClient(self.api_url, token)


def _state(ctx: typer.Context) -> State:
    state = ctx.find_object(State)
    if state is None:  # pragma: no cover - the callback always sets it
        raise RuntimeError("gpuqueue: missing CLI state")
    return state


def describe_error(exc: ApiError, *, logging_in: bool = False) -> str:
    """One friendly line for an API error."""
    if exc.status == 401 and not logging_in:
        return f"error: {LOGIN_HINT}"
    if exc.status in (429, 503) and exc.retry_after is not None:
        return f"error: rate limited / queue full, retry in {exc.retry_after} s ({exc.message})"
    suffix = f" (field: {exc.field})" if exc.field else ""
    return f"error: {exc.message}{suffix}"


@contextmanager
def friendly_errors(state: State, *, logging_in: bool = False) -> Iterator[None]:
    """Turn API and network failures into one red line and exit code 1."""
    try:
        yield
    except ApiError as exc:
        state.fail(describe_error(exc, logging_in=logging_in))
    except requests.ConnectionError as exc:
        state.fail(f"error: cannot reach {_target(state, exc)}: is the stack running (`make up`)?")
    except requests.Timeout as exc:
        state.fail(f"error: {_target(state, exc)} did not answer in time")


def _target(state: State, exc: requests.RequestException) -> str:
    """The API URL, or the other host (the presigned image URL) that failed."""
    url = getattr(exc.request, "url", None) if exc.request is not None else None
    if isinstance(url, str) and url and not url.startswith(state.api_url):
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}"
    return state.api_url


@app.callback()
def _main(
    ctx: typer.Context,
    api_url: Annotated[
        str, typer.Option("--api-url", envvar="GPUQUEUE_API_URL", help="The API's base URL.")
    ] = DEFAULT_API_URL,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="GPUQUEUE_TOKEN",
            help="A bearer token (default: the one `gpuqueue login` cached for --api-url).",
            show_default=False,
        ),
    ] = None,
) -> None:
    ctx.obj = State(api_url=api_url.rstrip("/"), token=token or None)


UsernameOption = Annotated[str, typer.Option("--username", "-u", prompt=True)]


def _authenticate(state: State, username: str, token: str, expires_at: float | None) -> None:
    path = credentials.save(state.api_url, token, username, expires_at)
    state.err.print(f"token cached in {path}", style="dim", soft_wrap=True)


@app.command()
def register(
    ctx: typer.Context,
    username: UsernameOption,
    password: Annotated[
        str,
        typer.Option("--password", "-p", prompt=True, hide_input=True, confirmation_prompt=True),
    ],
) -> None:
    """Create a user and log in as it."""
    state = _state(ctx)
    client = state.anonymous_client()
    with friendly_errors(state, logging_in=True):
        token = client.register(username, password)
    _authenticate(state, username, token, client.expires_at)
    state.out.print(f"registered; logged in as {username}", soft_wrap=True)


@app.command()
def login(
    ctx: typer.Context,
    username: UsernameOption,
    password: Annotated[str, typer.Option("--password", "-p", prompt=True, hide_input=True)],
) -> None:
    """Log in and cache the token for --api-url."""
    state = _state(ctx)
    client = state.anonymous_client()
    with friendly_errors(state, logging_in=True):
        token = client.login(username, password)
    _authenticate(state, username, token, client.expires_at)
    state.out.print(f"logged in as {username}", soft_wrap=True)


@app.command()
def logout(ctx: typer.Context) -> None:
    """Forget the cached token for --api-url."""
    state = _state(ctx)
    forgotten = credentials.delete(state.api_url)
    state.out.print("logged out" if forgotten else "not logged in")


@app.command()
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
) -> None:
    """Queue an image task; print its id (with --wait: wait, download, print the file)."""
    state = _state(ctx)
    client = state.client()
    with friendly_errors(state):
        queued = client.submit_image(
            prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            steps=steps,
            seed=seed,
        )
    task_id = str(queued["task_id"])
    state.out.print(task_id, soft_wrap=True)
    if not wait:
        return
    started = time.monotonic()
    with friendly_errors(state):
        try:
            task = _wait_with_status(state, client, task_id, timeout, poll_interval)
        except TimeoutError:
            state.fail(
                f"error: task {task_id} not finished after {timeout:g} s; "
                f"check on it with `gpuqueue task {task_id}`"
            )
        except KeyboardInterrupt:
            state.fail(
                f"stopped waiting; task {task_id} goes on: `gpuqueue task {task_id}`", code=130
            )
        status = task.get("status")
        elapsed = time.monotonic() - started
        if status == "FAILED":
            state.fail(f"error: task {task_id} failed: {task.get('error') or 'unknown error'}")
        if status != "DONE":
            state.fail(f"error: task {task_id} was {str(status).lower()}")
        image = client.download_image(task_id)
    path = output if output is not None else Path(f"{task_id}.png")
    path.write_bytes(image)
    state.err.print(f"task {task_id} DONE in {elapsed:.1f} s", style="green", soft_wrap=True)
    state.out.print(str(path), soft_wrap=True)


def _wait_with_status(
    state: State, client: GpuqueueClient, task_id: str, timeout: float, poll_interval: float
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
                task_id, timeout=timeout, poll_interval=poll_interval, on_update=refresh
            )

    # Not a terminal (a pipe, CI): one line per change of state, not a redraw per poll.
    seen: list[object] = []

    def log_change(task: dict[str, Any]) -> None:
        if not seen or seen[-1] != task.get("status"):
            seen.append(task.get("status"))
            elapsed = time.monotonic() - started
            state.err.print(f"{_status_line(task_id, task)} ({elapsed:.1f} s)", soft_wrap=True)

    return client.wait(task_id, timeout=timeout, poll_interval=poll_interval, on_update=log_change)


def _status_line(task_id: str, task: dict[str, Any]) -> str:
    status = str(task.get("status", "?"))
    attempt = task.get("attempt")
    extra = f", attempt {attempt}" if isinstance(attempt, int) and attempt > 1 else ""
    return f"task {task_id}: {status}{extra}"


@app.command()
def tasks(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="Tasks per page (1-100).")] = 20,
    cursor: Annotated[
        str | None, typer.Option(help="The next-page cursor a previous call printed.")
    ] = None,
) -> None:
    """List your tasks, newest first."""
    state = _state(ctx)
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


@app.command()
def task(ctx: typer.Context, task_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Show one task as JSON."""
    state = _state(ctx)
    client = state.client()
    with friendly_errors(state):
        body = client.get_task(task_id)
    state.out.print_json(data=body)


@app.command()
def cancel(ctx: typer.Context, task_id: Annotated[str, typer.Argument(metavar="ID")]) -> None:
    """Cancel a QUEUED task."""
    state = _state(ctx)
    client = state.client()
    with friendly_errors(state):
        body = client.cancel(task_id)
    state.out.print(f"task {task_id}: {body.get('status', 'CANCELED')}", soft_wrap=True)


@app.command()
def stats(ctx: typer.Context) -> None:
    """Show the queue's numbers."""
    state = _state(ctx)
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


def main() -> None:
    """The `gpuqueue` console script."""
    app(prog_name="gpuqueue")
