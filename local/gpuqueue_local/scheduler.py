"""Local EventBridge schedules: `rate(...)` and `cron(...)`-less rates, with a speed-up."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gpuqueue_local.lambda_runtime import FunctionRuntime

_RATE = re.compile(r"^rate\((\d+)\s+(minute|minutes|hour|hours|day|days)\)$")
_UNIT_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


def rate_seconds(expression: str) -> float:
    """Seconds between runs of an EventBridge `rate(N unit)` expression."""
    match = _RATE.match(expression.strip())
    if not match:
        raise ValueError(f"unsupported schedule expression (only rate(...)): {expression!r}")
    amount, unit = int(match.group(1)), match.group(2).rstrip("s")
    if amount < 1:
        raise ValueError(f"a rate must be positive: {expression!r}")
    return float(amount * _UNIT_SECONDS[unit])


def scheduled_event(rule_name: str, region: str = "us-east-1") -> dict[str, Any]:
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "region": region,
        "resources": [f"arn:aws:events:{region}:123456789012:rule/{rule_name}"],
        "detail": {},
    }


@dataclass
class Schedule:
    function: FunctionRuntime
    rule_name: str
    period_seconds: float
    speedup: float = 1.0
    log: Callable[[str], None] | None = None
    runs: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def interval(self) -> float:
        return self.period_seconds / max(self.speedup, 1e-6)

    def run_once(self) -> bool:
        result = self.function.invoke(scheduled_event(self.rule_name))
        self.runs += 1
        if not result.ok and self.log:
            self.log(f"{self.rule_name} failed: {result.error_message}")
        return result.ok

    def start(self, *, fire_now: bool = True) -> None:
        def loop() -> None:
            if fire_now:
                self.run_once()
            while not self._stop.wait(self.interval):
                self.run_once()

        self._thread = threading.Thread(target=loop, daemon=True, name=f"schedule-{self.rule_name}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
