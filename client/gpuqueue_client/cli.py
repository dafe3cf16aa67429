"""`gpuqueue`: register, log in, submit, wait for and download images, transcribe speech;
operators: endpoints; webhook receivers: verify and sign deliveries."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterator
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
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from . import credentials, webhooks
from .client import (
    PCM_SAMPLE_WIDTH,
    ApiError,
    ChainedReader,
    GpuqueueClient,
    ProgressCallback,
    audio_content_type,
    fits_sync,
    wav_header,
)

DEFAULT_API_URL = "http://127.0.0.1:3000"
LOGIN_HINT = "not logged in or token expired: run `gpuqueue login`"
STATUS_STYLES = {
    "AWAITING_UPLOAD": "blue",
    "QUEUED": "yellow",
    "RUNNING": "cyan",
    "DONE": "green",
    "FAILED": "red",
    "CANCELED": "magenta",
    "EXPIRED": "magenta",
}

app = typer.Typer(
    name="gpuqueue",
    help="Submit image and speech tasks to a gpuqueue API and fetch the results.",
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
    if exc.status == 429 and exc.code in {"ACTIVE_TASK_LIMIT", "NEW_ACCOUNT_LIMIT"}:
        return f"error: too many active tasks; wait for one to finish or cancel one ({exc.message})"
    if exc.status == 429 and exc.retry_after is not None:
        return f"error: rate limited, retry in {exc.retry_after} s ({exc.message})"
    if exc.status == 503 and exc.retry_after is not None:
        return f"error: queue full, retry in {exc.retry_after} s ({exc.message})"
    suffix = f" (field: {exc.field})" if exc.field else ""
    return f"error: {exc.message}{suffix}"


def describe_speech_error(exc: ApiError) -> str:
    """One friendly line for an error of a speech route."""
    if exc.status == 503 and exc.retry_after is not None and exc.code != "QUEUE_FULL":
        return f"error: no speech endpoint available, retry in {exc.retry_after} s ({exc.message})"
    if exc.status == 504:
        return f"error: the speech endpoint did not answer in time ({exc.message})"
    return describe_error(exc)


@contextmanager
def friendly_errors(
    state: State,
    *,
    logging_in: bool = False,
    describe: Callable[[ApiError], str] | None = None,
) -> Iterator[None]:
    """Turn API and network failures into one red line and exit code 1."""
    try:
        yield
    except ApiError as exc:
        state.fail(describe(exc) if describe else describe_error(exc, logging_in=logging_in))
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
    email: Annotated[
        str | None,
        typer.Option("--email", help="Where the code goes, on a stack that verifies sign-ups."),
    ] = None,
) -> None:
    """Create a user and log in as it (or, where sign-ups are verified by e-mail, have a code
    sent for `confirm`)."""
    state = _state(ctx)
    client = state.anonymous_client()
    with friendly_errors(state, logging_in=True):
        token = client.register(username, password, email=email)
    if token is None:
        state.out.print(
            "if the name was free, a code is on its way by e-mail: "
            f"gpuqueue confirm -u {username} --code CODE",
            soft_wrap=True,
        )
        return
    _authenticate(state, username, token, client.expires_at)
    state.out.print(f"registered; logged in as {username}", soft_wrap=True)


@app.command()
def confirm(
    ctx: typer.Context,
    username: UsernameOption,
    password: Annotated[str, typer.Option("--password", "-p", prompt=True, hide_input=True)],
    code: Annotated[str, typer.Option("--code", prompt=True, help="The code from the e-mail.")],
) -> None:
    """Confirm an e-mailed sign-up code and log in."""
    state = _state(ctx)
    client = state.anonymous_client()
    with friendly_errors(state, logging_in=True):
        token = client.confirm_registration(username, password, code)
    _authenticate(state, username, token, client.expires_at)
    state.out.print(f"confirmed; logged in as {username}", soft_wrap=True)


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


PushOption = Annotated[
    bool,
    typer.Option(
        "--push/--no-push",
        help="With --wait: hear of the end over the API's WebSocket when it offers one "
        "(else, or if it drops: poll); --no-push always polls.",
    ),
]


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
            priority=priority,
        )
    task_id = str(queued["task_id"])
    state.out.print(task_id, soft_wrap=True)
    if not wait:
        return
    started = time.monotonic()
    with friendly_errors(state):
        _wait_until_done(state, client, task_id, timeout, poll_interval, push=push)
        elapsed = time.monotonic() - started
        image = client.download_image(task_id)
    path = output if output is not None else Path(f"{task_id}.png")
    path.write_bytes(image)
    state.err.print(f"task {task_id} DONE in {elapsed:.1f} s", style="green", soft_wrap=True)
    state.out.print(str(path), soft_wrap=True)


def _wait_until_done(
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


# -- speech -------------------------------------------------------------------------------------

DEFAULT_SAMPLE_RATE = 16000
DEFAULT_CHANNELS = 1
RAW_PCM_SUFFIXES = frozenset({".pcm", ".raw"})


@app.command()
def transcribe(
    ctx: typer.Context,
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE",
            exists=True,
            dir_okay=False,
            readable=True,
            help="The audio: wav, mp3, flac, ogg, webm or m4a; with --pcm, raw PCM.",
            show_default=False,
        ),
    ],
    *,
    language: Annotated[
        str | None,
        typer.Option(help="The spoken language, e.g. en (default: detected).", show_default=False),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(
            help="Text that steers the transcription (names, spellings); not with --pcm.",
            show_default=False,
        ),
    ] = None,
    pcm: Annotated[
        bool,
        typer.Option("--pcm", help="FILE is raw 16-bit little-endian PCM (as an ESP32 sends)."),
    ] = False,
    sample_rate: Annotated[
        int | None,
        typer.Option(
            "--sample-rate", help="With --pcm: samples a second.", show_default="16000", min=1
        ),
    ] = None,
    channels: Annotated[
        int | None,
        typer.Option(help="With --pcm: 1 or 2.", show_default="1", min=1),
    ] = None,
    force_async: Annotated[
        bool,
        typer.Option("--async", help="Upload and queue a task even when FILE is short."),
    ] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the API's JSON answer, not the text.")
    ] = False,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait/--no-wait",
            help="After an upload: wait for the transcript, or print the task id and return.",
        ),
    ] = True,
    timeout: Annotated[
        float, typer.Option(help="With --wait: give up after this many seconds.", min=0)
    ] = 600,
    poll_interval: Annotated[
        float, typer.Option(help="With --wait: seconds between polls.", min=0.01)
    ] = 1.0,
    push: PushOption = True,
) -> None:
    """Transcribe FILE; print the text, then its language and duration (on stderr).

    A request of up to 4,000,000 bytes is answered at once; a longer FILE is uploaded
    straight to S3 (with a progress bar) and transcribed as a task.
    """
    state = _state(ctx)
    if not pcm and (sample_rate is not None or channels is not None):
        state.fail("error: --sample-rate and --channels go with --pcm")
    if pcm and prompt:
        state.fail("error: --prompt does not go with --pcm: the PCM route takes no prompt")
    if not pcm and file.suffix.lower() in RAW_PCM_SUFFIXES:
        state.fail(f"error: {file.name} looks like raw PCM: add --pcm")
    rate = sample_rate if sample_rate is not None else DEFAULT_SAMPLE_RATE
    chans = channels if channels is not None else DEFAULT_CHANNELS
    client = state.client()
    size = file.stat().st_size
    if pcm:
        sync = size <= client.sync_max_bytes
    else:
        sync = fits_sync(
            size,
            filename=file.name,
            language=language,
            prompt=prompt,
            limit=client.sync_max_bytes,
        )
    if sync and not force_async:
        with friendly_errors(state, describe=describe_speech_error), _busy(state, file.name):
            try:
                if pcm:
                    body = client.transcribe_pcm(
                        file, sample_rate=rate, channels=chans, language=language
                    )
                else:
                    body = client.transcribe(file, language=language, prompt=prompt)
            except ApiError as exc:
                if exc.status != 413:
                    raise
                # The API's limit is lower than this client's copy of it: go the long way.
                state.err.print(
                    "too large for a synchronous answer: uploading it for a task instead",
                    style="dim",
                    soft_wrap=True,
                )
            else:
                _print_transcript(state, body, json_output)
                return
    _transcribe_async(
        state,
        client,
        file,
        size,
        pcm=(rate, chans) if pcm else None,
        language=language,
        prompt=prompt,
        json_output=json_output,
        wait=wait,
        timeout=timeout,
        poll_interval=poll_interval,
        push=push,
    )


def _transcribe_async(
    state: State,
    client: GpuqueueClient,
    file: Path,
    size: int,
    *,
    pcm: tuple[int, int] | None,
    language: str | None,
    prompt: str | None,
    json_output: bool,
    wait: bool,
    timeout: float,
    poll_interval: float,
    push: bool = True,
) -> None:
    """Start an async transcription, upload FILE (raw PCM wrapped into WAV), wait, print."""
    if pcm is not None:
        rate, chans = pcm
        frame = PCM_SAMPLE_WIDTH * chans
        if size == 0 or size % frame:
            state.fail(
                f"error: {file.name}: {size} bytes is not a whole number of "
                f"{chans}-channel 16-bit frames ({frame} bytes each)"
            )
        filename, content_type, total = file.with_suffix(".wav").name, "audio/wav", size + 44
    else:
        filename, content_type, total = file.name, audio_content_type(file.name), size
    with friendly_errors(state, describe=describe_speech_error):
        started = client.start_async_transcription(
            filename, total, content_type=content_type, language=language, prompt=prompt
        )
    task_id = str(started["task_id"])
    headers = {str(k): str(v) for k, v in (started.get("upload_headers") or {}).items()}
    with file.open("rb") as stream, friendly_errors(state):
        source = (
            ChainedReader(io.BytesIO(wav_header(size, sample_rate=rate, channels=chans)), stream)
            if pcm is not None
            else stream
        )
        try:
            with _upload_progress(state, filename, total) as progress:
                client.upload(
                    str(started["upload_url"]),
                    headers,
                    source,
                    size=total,
                    method=str(started.get("upload_method") or "PUT"),
                    progress=progress,
                )
        except ApiError as exc:
            state.fail(
                f"error: the upload for task {task_id} was refused "
                f"({exc.status} {exc.code or 'ERROR'}): {exc.message}"
            )
        except ValueError as exc:
            state.fail(f"error: the upload for task {task_id} failed: {exc}")
        except KeyboardInterrupt:
            state.fail(f"upload stopped; task {task_id} will never start", code=130)
    if not wait:
        if json_output:
            state.out.print_json(data=started)
        else:
            state.out.print(task_id, soft_wrap=True)
        state.err.print(
            f"uploaded; follow it with `gpuqueue task {task_id}`, "
            f"then `gpuqueue transcript {task_id}`",
            style="dim",
            soft_wrap=True,
        )
        return
    begun = time.monotonic()
    with friendly_errors(state, describe=describe_speech_error):
        _wait_until_done(
            state,
            client,
            task_id,
            timeout,
            poll_interval,
            push=push,
            follow_up=f", then `gpuqueue transcript {task_id}`",
        )
        body = client.transcript(task_id)
    elapsed = time.monotonic() - begun
    state.err.print(f"task {task_id} DONE in {elapsed:.1f} s", style="green", soft_wrap=True)
    _print_transcript(state, body, json_output)


@contextmanager
def _busy(state: State, filename: str) -> Iterator[None]:
    """A spinner while a synchronous transcription runs (on a terminal only)."""
    if not state.err.is_terminal:
        yield
        return
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=state.err,
        transient=True,
    ) as progress:
        progress.add_task(f"transcribing {filename}", total=None)
        yield


@contextmanager
def _upload_progress(state: State, filename: str, total: int) -> Iterator[ProgressCallback]:
    """A progress bar on a terminal; elsewhere (a pipe, CI) a line every quarter."""
    if state.err.is_terminal:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=state.err,
        ) as progress:
            bar = progress.add_task(f"uploading {filename}", total=total)

            def advance(sent: int, _total: int) -> None:
                progress.update(bar, completed=sent)

            yield advance
        return

    started = time.monotonic()
    state.err.print(f"uploading {filename} ({_megabytes(total)})", soft_wrap=True)
    marks = [25, 50, 75, 100]

    def log_quarters(sent: int, whole: int) -> None:
        percent = 100 * sent // whole if whole else 100
        while marks and percent >= marks[0]:
            elapsed = time.monotonic() - started
            state.err.print(
                f"upload: {marks.pop(0)}% ({_megabytes(sent)} of {_megabytes(whole)}, "
                f"{elapsed:.1f} s)",
                soft_wrap=True,
            )

    yield log_quarters


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB"


def _print_transcript(state: State, body: dict[str, Any], json_output: bool) -> None:
    if json_output:
        state.out.print_json(data=body)
        return
    text = str(body.get("text") or "").strip()
    if text:
        state.out.print(Text(text), soft_wrap=True)
    else:
        state.err.print("no speech recognized", style="yellow")
    state.err.print(_speech_summary(body), style="dim", soft_wrap=True)


def _speech_summary(body: dict[str, Any]) -> str:
    language = body.get("language")
    parts = [f"language: {language}" if language else "language: unknown"]
    probability = body.get("language_probability")
    if language and isinstance(probability, int | float):
        parts[0] += f" (probability {probability:.2f})"
    duration = body.get("duration")
    if isinstance(duration, int | float):
        parts.append(f"duration: {duration:.1f} s")
    return ", ".join(parts)


@app.command()
def transcript(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(metavar="ID")],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the API's JSON answer, not the text.")
    ] = False,
) -> None:
    """Print the transcript of a DONE speech task (`transcribe --no-wait` queued it)."""
    state = _state(ctx)
    client = state.client()
    with friendly_errors(state, describe=describe_speech_error):
        body = client.transcript(task_id)
    _print_transcript(state, body, json_output)


# -- GPU endpoints (operators) ----------------------------------------------------------------

endpoints_app = typer.Typer(
    help="Operators: list, add or change, drain and delete GPU endpoints (group admin).",
    no_args_is_help=True,
)
app.add_typer(endpoints_app, name="endpoints")

ENDPOINT_STATE_STYLES = {"ACTIVE": "green", "DRAINING": "yellow", "DISABLED": "dim"}
CIRCUIT_STYLES = {"CLOSED": "", "HALF_OPEN": "yellow", "OPEN": "red"}
# What `endpoints put` carries over from the current row when an option is not given.
ENDPOINT_SPEC_FIELDS = ("url", "kind", "protocol", "capacity", "weight", "state", "credentials")


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
        f"{_credentials_text(row.get('credentials'))}, "
        f"in flight {row.get('in_flight', 0)} (source {row.get('source')})"
    )


def _credentials_text(credentials: object) -> str:
    """Where the endpoint's key is kept and how it is sent (never the key: the API has none)."""
    if not isinstance(credentials, dict):
        return "no credentials"
    store = (
        f"secret {credentials['secret']}"
        if credentials.get("secret")
        else f"parameter {credentials.get('parameter')}"
    )
    header = credentials.get("header") if credentials.get("type") == "header" else None
    return f"key from {store} as {header or 'Authorization: Bearer'}"


def _credentials(
    state: State,
    current: object,
    *,
    secret: str | None,
    parameter: str | None,
    header: str | None,
    remove: bool,
) -> dict[str, str] | None:
    """The credentials reference to send: the options given, else the current one."""
    if remove and (secret or parameter or header):
        state.fail("error: --no-credentials goes alone, without --credentials-* options")
    if secret and parameter:
        state.fail("error: give --credentials-secret or --credentials-parameter, not both")
    if remove:
        return None
    kept = {k: v for k, v in current.items() if v is not None} if isinstance(current, dict) else {}
    if secret or parameter:
        kept = {"secret": secret} if secret else {"parameter": str(parameter)}
    elif header and not kept:
        state.fail(
            "error: --credentials-header needs --credentials-secret or --credentials-parameter"
        )
    if not kept:
        return None
    chosen = header or (kept.get("header") if (secret or parameter) is None else None)
    store = {k: v for k, v in kept.items() if k in ("secret", "parameter")}
    return {"type": "header", "header": chosen, **store} if chosen else {"type": "bearer", **store}


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
    credentials_secret: Annotated[
        str | None,
        typer.Option(help="Secrets Manager secret holding its API key (<stack>/gpu/...)."),
    ] = None,
    credentials_parameter: Annotated[
        str | None,
        typer.Option(help="SSM SecureString parameter holding its API key (/<stack>/gpu/...)."),
    ] = None,
    credentials_header: Annotated[
        str | None,
        typer.Option(help="Send the key in this header (e.g. X-Api-Key), not as a bearer token."),
    ] = None,
    no_credentials: Annotated[
        bool, typer.Option("--no-credentials", help="Call it without a key.")
    ] = False,
) -> None:
    """Add an endpoint (--url and --kind needed), or change the options given.

    Options not given keep the endpoint's current values (the API's defaults when new).
    The key itself never goes through the API: store it in the secret or parameter named.
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
            name: given[name] if given.get(name) is not None else (current or {}).get(name)
            for name in ENDPOINT_SPEC_FIELDS
        }
        if current is None and (spec["url"] is None or spec["kind"] is None):
            state.fail(f"error: endpoint {endpoint_id} is new: --url and --kind are needed")
        spec["credentials"] = _credentials(
            state,
            spec["credentials"],
            secret=credentials_secret,
            parameter=credentials_parameter,
            header=credentials_header,
            remove=no_credentials,
        )
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


# -- webhooks (receivers) ---------------------------------------------------------------------

webhook_app = typer.Typer(
    help="Webhook receivers: check a delivery's signature, or sign a body to test one.",
    no_args_is_help=True,
)
app.add_typer(webhook_app, name="webhook")

SecretOption = Annotated[
    list[str],
    typer.Option(
        "--secret",
        metavar="SECRET",
        envvar="GPUQUEUE_WEBHOOK_SECRET",
        help="The webhook secret; give it twice during a rotation (new and old; in the "
        "variable: separated by spaces).",
        show_default=False,
    ),
]
BodyFileOption = Annotated[
    typer.FileBinaryRead,
    typer.Option(
        "--body-file",
        metavar="FILE",
        help="The raw request body, byte for byte; - reads standard input.",
        show_default=False,
    ),
]


def _webhook_secrets(secrets: list[str]) -> list[str]:
    if not secrets or not all(secrets):
        raise typer.BadParameter("a webhook secret must not be empty", param_hint="'--secret'")
    return secrets


@webhook_app.command("verify")
def webhook_verify(
    ctx: typer.Context,
    secret: SecretOption,
    signature: Annotated[
        str,
        typer.Option(
            "--signature",
            help="The X-Gpuqueue-Signature header's value (t=...,v1=...).",
            show_default=False,
        ),
    ],
    body_file: BodyFileOption,
    tolerance: Annotated[
        int, typer.Option(help="Refuse a timestamp more than this many seconds from now.", min=0)
    ] = webhooks.DEFAULT_TOLERANCE_SECONDS,
) -> None:
    """Check a delivery: print `valid` (exit 0), or why it must be refused (exit 1)."""
    state = _state(ctx)
    secrets = _webhook_secrets(secret)
    name, colon, value = signature.partition(":")
    header = value if colon and name.strip().lower() == "x-gpuqueue-signature" else signature
    try:
        webhooks.verify_or_raise(
            secrets, header.strip(), body_file.read(), tolerance_seconds=tolerance
        )
    except webhooks.WebhookVerificationError as exc:
        state.fail(f"invalid: {exc.reason}")
    state.out.print("valid")


@webhook_app.command("sign")
def webhook_sign(
    ctx: typer.Context,
    secret: SecretOption,
    body_file: BodyFileOption,
    timestamp: Annotated[
        int | None,
        typer.Option(help="The t= to sign with (unix seconds).", show_default="now", min=0),
    ] = None,
) -> None:
    """Print the X-Gpuqueue-Signature value for a body, to test a receiver (with curl)."""
    state = _state(ctx)
    secrets = _webhook_secrets(secret)
    when = int(time.time()) if timestamp is None else timestamp
    state.out.print(webhooks.sign(secrets, body_file.read(), timestamp=when), soft_wrap=True)


def main() -> None:
    """The `gpuqueue` console script."""
    app(prog_name="gpuqueue")
