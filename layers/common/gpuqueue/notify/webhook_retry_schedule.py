"""When a failed webhook attempt (connection error, timeout, a non-2xx or a redirect) comes
back: a capped exponential backoff with jitter, whose schedule spans more than an hour before
the delivery is dead-lettered."""

from __future__ import annotations

import random

# Attempts per delivery; with RETRY_BASE/RETRY_CAP and jitter of 0.5-1.0x the waits between
# them add up to more than an hour even at the low end (see `retry_schedule_floor`).
MAX_ATTEMPTS = 13
RETRY_BASE_SECONDS = 30.0
RETRY_CAP_SECONDS = 900.0


def retry_delay_seconds(
    attempt: int,
    *,
    base: float = RETRY_BASE_SECONDS,
    cap: float = RETRY_CAP_SECONDS,
    rng: random.Random | None = None,
) -> int:
    """The wait after failed attempt `attempt` (1-based): base x 2^(attempt-1), capped, then
    jittered to 50-100 % so receivers recovering from an outage are not hit all at once."""
    ceiling = min(cap, base * 2.0 ** (attempt - 1))
    return round(ceiling * float((rng or random).uniform(0.5, 1.0)))


def retry_schedule_floor(
    *,
    attempts: int = MAX_ATTEMPTS,
    base: float = RETRY_BASE_SECONDS,
    cap: float = RETRY_CAP_SECONDS,
) -> float:
    """The shortest time a delivery keeps being retried (every jitter at its low end)."""
    return float(sum(0.5 * min(cap, base * 2.0 ** (n - 1)) for n in range(1, attempts)))
