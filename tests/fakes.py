"""Stand-ins several test files share: a clock a test moves by hand, and a local Lambda
function that records what it is invoked with. One-off fakes stay in their test file."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from gpuqueue.intake.rate_limiter import RateLimiter
from gpuqueue_local.lambda_runtime import InvocationResult

# A fixed instant (2027): what an epoch-seconds clock reads in a test unless it says.
NOW = 1_800_000_000.0


class FakeClock:
    """A clock (`clock()` -> seconds) that stands still at `now` until the test moves it."""

    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def stop_rate_limiter_clocks(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Every RateLimiter built from here on (a handler's too) reads the returned clock, set
    to the time now: a loaded machine taking seconds between two calls must not refill a
    bucket under a test's expectations."""
    clock = FakeClock(time.time())
    build = RateLimiter.__init__

    def with_clock(self: RateLimiter, *args: Any, **kwargs: Any) -> None:
        build(self, *args, **{**kwargs, "clock": clock})

    monkeypatch.setattr(RateLimiter, "__init__", with_clock)
    return clock


@dataclass
class FakeSpec:
    """The part of a FunctionSpec the local gateways read."""

    timeout_seconds: float = 10.0


@dataclass
class RecordingFunction:
    """A FunctionRuntime's surface (`invoke`, `spec`): answers `result` (by default a 200
    with an empty JSON body) and keeps each event with the timeout it was given, from any
    thread."""

    result: InvocationResult = field(
        default_factory=lambda: InvocationResult(ok=True, payload={"statusCode": 200, "body": "{}"})
    )
    spec: FakeSpec = field(default_factory=FakeSpec)
    calls: list[tuple[Any, float | None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult:
        with self._lock:
            self.calls.append((event, timeout_seconds))
        return self.result

    @property
    def events(self) -> list[Any]:
        with self._lock:
            return [event for event, _ in self.calls]

    @property
    def event(self) -> Any:
        """The one event it was invoked with."""
        events = self.events
        assert len(events) == 1, f"expected one invocation, got {len(events)}"
        return events[0]
