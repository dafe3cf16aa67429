"""`gpuqueue`: register, log in, submit, wait for and download images; operators: endpoints."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
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


# -- GPU endpoints (operators) ----------------------------------------------------------------

endpoints_app = typer.Typer(
    help="Operators: list, add or change, drain and delete GPU endpoints (group admin).",
    no_args_is_help=True,
)
app.add_typer(endpoints_app, name="endpoints")

ENDPOINT_STATE_STYLES = {"ACTIVE": "green", "DRAINING": "yellow", "DISABLED": "dim"}
CIRCUIT_STYLES = {"CLOSED": "", "HALF_OPEN": "yellow", "OPEN": "red"}
# What `endpoints put` carries over from the current row when an option is not given.
ENDPOINT_SPEC_FIELDS = ("url", "kind", "protocol", "capacity", "weight", "state")


class Kind(StrEnum):
    image = "image"
    speech = "speech"


class Protocol(StrEnum):
    openai = "openai"
    a1111 = "a1111"


class EndpointState(StrEnum):
    ACTIVE = "ACTIVE"
    DRAINING = "DRAINING"
    DISABLED = "DISABLED"


EndpointIdArgument = Annotated[str, typer.Argument(metavar="ID", help="The endpoint's id.")]


@endpoints_app.command("list")
def endpoints_list(
    ctx: typer.Context,
    kind: Annotated[Kind | None, typer.Option(help="Only this kind.")] = None,
) -> None:
    """Show every endpoint: state, health, circuit, load and latency."""
    state = _state(ctx)
    client = state.client()
    with friendly_errors(state):
        rows = client.list_endpoints(kind.value if kind else None)
    if not rows:
        state.out.print("no endpoints")
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("url")  # the one column that folds on a narrow terminal
    table.add_column("state", no_wrap=True)
    table.add_column("healthy", no_wrap=True)
    table.add_column("circuit", no_wrap=True)
    table.add_column("in-flight/capacity", no_wrap=True, justify="right")
    table.add_column("latency (EWMA)", no_wrap=True, justify="right")
    for row in rows:
        endpoint_state = str(row.get("state", ""))
        circuit = str(row.get("circuit", ""))
        table.add_row(
            str(row.get("endpoint_id", "")),
            str(row.get("kind", "")),
            Text(str(row.get("url", "")), overflow="fold"),
            Text(endpoint_state, style=ENDPOINT_STATE_STYLES.get(endpoint_state, "")),
            _healthy(row),
            Text(circuit, style=CIRCUIT_STYLES.get(circuit, "")),
            f"{row.get('in_flight', 0)}/{row.get('capacity', '?')}",
            _millis(row.get("latency_ewma_ms")),
        )
    state.out.print(table)


def _healthy(row: dict[str, Any]) -> Text:
    if row.get("healthy") is not True:
        return Text("no", style="red")
    usable = row.get("state") == "ACTIVE" and row.get("circuit") != "OPEN"
    if usable and row.get("routable") is not True:
        return Text("stale", style="yellow")  # healthy at the last check, but it is too old
    return Text("yes", style="green")


def _millis(value: object) -> str:
    return f"{value:.0f} ms" if isinstance(value, int | float) else "-"


def _endpoint_line(row: dict[str, Any]) -> str:
    return (
        f"endpoint {row.get('endpoint_id')}: {row.get('state')}, {row.get('kind')} "
        f"{row.get('url')}, capacity {row.get('capacity')}, weight {row.get('weight')}, "
        f"in flight {row.get('in_flight', 0)} (source {row.get('source')})"
    )


@endpoints_app.command("put")
def endpoints_put(
    ctx: typer.Context,
    endpoint_id: EndpointIdArgument,
    *,
    url: Annotated[str | None, typer.Option(help="Base URL, http(s)://host[:port][/path].")] = None,
    kind: Annotated[Kind | None, typer.Option(help="What it serves.")] = None,
    protocol: Annotated[Protocol | None, typer.Option(help="Its API.")] = None,
    capacity: Annotated[
        int | None, typer.Option(help="Concurrent calls it takes (1-64).", min=1, max=64)
    ] = None,
    weight: Annotated[
        int | None,
        typer.Option(help="Share of work under weighted dispatch (1-100).", min=1, max=100),
    ] = None,
    endpoint_state: Annotated[
        EndpointState | None,
        typer.Option("--state", case_sensitive=False, help="ACTIVE, DRAINING or DISABLED."),
    ] = None,
) -> None:
    """Add an endpoint (--url and --kind needed), or change the options given.

    Options not given keep the endpoint's current values (the API's defaults when new).
    """
    state = _state(ctx)
    client = state.client()
    given: dict[str, Any] = {
        "url": url,
        "kind": kind.value if kind else None,
        "protocol": protocol.value if protocol else None,
        "capacity": capacity,
        "weight": weight,
        "state": endpoint_state.value if endpoint_state else None,
    }
    with friendly_errors(state):
        current = next(
            (r for r in client.list_endpoints() if r.get("endpoint_id") == endpoint_id), None
        )
        spec = {
            name: given[name] if given[name] is not None else (current or {}).get(name)
            for name in ENDPOINT_SPEC_FIELDS
        }
        if current is None and (spec["url"] is None or spec["kind"] is None):
            state.fail(f"error: endpoint {endpoint_id} is new: --url and --kind are needed")
        row = client.put_endpoint(endpoint_id, **spec)
    verb = "added" if current is None else "changed"
    state.out.print(f"{verb} {_endpoint_line(row)}", soft_wrap=True)


@endpoints_app.command("drain")
def endpoints_drain(ctx: typer.Context, endpoint_id: EndpointIdArgument) -> None:
    """Send the endpoint no new work; calls already running finish."""
    state = _state(ctx)
    client = state.client()
    with friendly_errors(state):
        row = client.drain_endpoint(endpoint_id)
    state.out.print(_endpoint_line(row), soft_wrap=True)


@endpoints_app.command("delete")
def endpoints_delete(ctx: typer.Context, endpoint_id: EndpointIdArgument) -> None:
    """Remove an endpoint added here (declared ones: --state DISABLED, or the stack parameter)."""
    state = _state(ctx)
    client = state.client()
    with friendly_errors(state):
        client.delete_endpoint(endpoint_id)
    state.out.print(f"endpoint {endpoint_id} deleted", soft_wrap=True)


def main() -> None:
    """The `gpuqueue` console script."""
    app(prog_name="gpuqueue")
