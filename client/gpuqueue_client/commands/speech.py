"""Speech: `transcribe` a file (answered at once, or uploaded and queued as a task), and the
`transcript` of a speech task."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
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
from rich.text import Text

from ..client import (
    PCM_SAMPLE_WIDTH,
    ApiError,
    ChainedReader,
    GpuqueueClient,
    ProgressCallback,
    audio_content_type,
    fits_sync,
    wav_header,
)
from .invocation import State, describe_speech_error, friendly_errors, state_of
from .waiting import PushOption, wait_until_done

DEFAULT_SAMPLE_RATE = 16000
DEFAULT_CHANNELS = 1
RAW_PCM_SUFFIXES = frozenset({".pcm", ".raw"})


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
    state = state_of(ctx)
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
        wait_until_done(
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


def transcript(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(metavar="ID")],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the API's JSON answer, not the text.")
    ] = False,
) -> None:
    """Print the transcript of a DONE speech task (`transcribe --no-wait` queued it)."""
    state = state_of(ctx)
    client = state.client()
    with friendly_errors(state, describe=describe_speech_error):
        body = client.transcript(task_id)
    _print_transcript(state, body, json_output)
