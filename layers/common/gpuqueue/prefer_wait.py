"""`Prefer: wait=N` (RFC 7240): block up to N seconds (at most 25, inside API Gateway's 30 s)
for the task to reach a final state, then answer as usual.

For clients that would rather hold one request open briefly than poll. The wait polls the
task row with a growing interval (0.1 s to 0.5 s: about 55 reads for 25 s), so its cost is
the Lambda's duration plus a few cheap reads; the answer is the same shape either way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gpuqueue.models import Task

MAX_WAIT_SECONDS = 25
# What the invocation keeps for itself after the wait (shaping and returning the answer).
RESERVE_SECONDS = 2.0
FIRST_POLL_SECONDS = 0.1
MAX_POLL_SECONDS = 0.5


def requested_wait(prefer: str | None) -> int | None:
    """The `wait` preference in whole seconds (capped at 25), or None. Preferences the
    server does not understand are ignored, as RFC 7240 asks."""
    if not prefer:
        return None
    for preference in prefer.split(","):
        name, _, value = preference.strip().partition("=")
        if name.strip().lower() != "wait":
            continue
        try:
            seconds = int(value.strip().strip('"'))
        except ValueError:
            return None
        return min(seconds, MAX_WAIT_SECONDS) if seconds > 0 else None
    return None


def wait_until_final(
    read: Callable[[], Task],
    seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Task:
    """Read the task until it is final or `seconds` have passed; the last read."""
    deadline = clock() + seconds
    interval = FIRST_POLL_SECONDS
    task = read()
    while not task.status.is_terminal:
        left = deadline - clock()
        if left <= 0:
            return task
        sleep(min(interval, left))
        interval = min(MAX_POLL_SECONDS, interval * 1.5)
        task = read()
    return task


def wait_budget(requested: int, remaining_seconds: float) -> float:
    """What the wait may take: the request's N, within what is left of the invocation."""
    return max(0.0, min(float(requested), remaining_seconds - RESERVE_SECONDS))
