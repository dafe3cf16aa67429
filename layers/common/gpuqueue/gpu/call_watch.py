"""What a GPU call reports while it runs, and how it learns that it should stop.

An adapter whose server reports steps (A1111's progress route, ComfyUI's progress events,
Cog's logs) passes them to `CallWatch.progress`; an adapter whose server can stop a job
(A1111's interrupt, ComfyUI's queue delete and interrupt, Cog's cancel) asks
`CallWatch.wait_cancel` between its polls and stops the job when it answers True, then
raises GpuCanceled. The dispatcher's watch writes the progress to the task at a bounded
rate and learns of a cancel from the same writes (dispatch/call_watch.py): adapters
never touch AWS.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Protocol, TypeVar

from gpuqueue.errors import GpuCanceled

T = TypeVar("T")

# How often an adapter polls its server for progress (and asks whether to stop) while a
# call runs: often enough to stop the GPU within seconds, rarely enough to cost the
# server nothing.
POLL_SECONDS = 1.0


class CallWatch(Protocol):
    def progress(self, step: int, steps: int, *, eta_seconds: float | None = None) -> None:
        """The server's latest count; cheap (nothing is written here)."""
        ...

    def job_started(self, job_id: str) -> None:
        """The server's id for the job (a prediction id, a prompt id), once it has one."""
        ...

    def wait_cancel(self, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as the task's owner has asked to cancel it."""
        ...


class NoWatch:
    """A call nobody follows: progress goes nowhere and no cancel ever comes."""

    def progress(self, step: int, steps: int, *, eta_seconds: float | None = None) -> None:
        return None

    def job_started(self, job_id: str) -> None:
        return None

    def wait_cancel(self, seconds: float) -> bool:
        # Sleep like a real wait, so a poll loop over NoWatch does not spin.
        threading.Event().wait(seconds)
        return False


NO_WATCH = NoWatch()


def watched(
    call: Callable[[], T],
    *,
    watch: CallWatch,
    poll: Callable[[], None] | None = None,
    interrupt: Callable[[], None] | None = None,
    poll_seconds: float = POLL_SECONDS,
) -> T:
    """Run a blocking GPU call while a side thread polls the server's progress (`poll`)
    and watches for a cancel; on one, `interrupt` tells the server to stop and, once the
    call returns (however it ends), GpuCanceled is raised instead of its result.

    Errors of `poll` and `interrupt` are the side thread's: a progress route that fails
    costs the progress, never the call."""
    done = threading.Event()
    canceled = threading.Event()

    def follow() -> None:
        while not done.is_set():
            if watch.wait_cancel(poll_seconds):
                canceled.set()
                if interrupt is not None and not done.is_set():
                    # Best effort: the call's own end tells whether the server stopped.
                    with contextlib.suppress(Exception):
                        interrupt()
                return
            if done.is_set() or poll is None:
                continue
            try:
                poll()
            except Exception:  # noqa: S112 - a progress poll is best effort
                continue

    follower = threading.Thread(target=follow, name="gpu-call-watch", daemon=True)
    follower.start()
    try:
        result = call()
    except Exception:
        if canceled.is_set():
            raise GpuCanceled("canceled by its owner while it ran") from None
        raise
    finally:
        done.set()
    if canceled.is_set():
        raise GpuCanceled("canceled by its owner while it ran")
    return result
