"""What every command shares: the invocation's API URL, token and consoles (`State`), and
API and network failures turned into one red line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NoReturn
from urllib.parse import urlsplit

import requests
import typer
from rich.console import Console
from rich.text import Text

from .. import credentials
from ..client import ApiError, GpuqueueClient

LOGIN_HINT = "not logged in or token expired: run `gpuqueue login`"


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


def state_of(ctx: typer.Context) -> State:
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
