"""The fault-injection knobs every stand-in GPU server shares, and their validation.

Read on every request, so a change (Python API or `POST /knobs`) applies at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Upper bound for a hanging call, so a forgotten hang can never wedge a process forever.
HANG_BOUND_S: Final = 600.0


@dataclass
class FaultKnobs:
    latency_s: float = 0.0  # extra delay before answering a call
    failure_rate: float = 0.0  # share of calls answered with ``fail_status``
    failure_seed: int | None = None  # seed for the failure RNG (None = nondeterministic)
    hang: bool = False  # calls block until released/disconnected/stopped
    healthy: bool = True  # False -> GET /health answers 503
    capacity: int = 0  # max concurrent calls, 0 = unlimited; excess gets 429
    fail_status: int = 500  # HTTP status used for injected failures


def as_float(name: str, value: object, lo: float, hi: float) -> float:
    # bool is an int subclass; reject it so `true` is not silently read as 1.0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number")
    if not lo <= float(value) <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}")
    return float(value)


def as_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be between {lo} and {hi}")
    return value


def validate_knob(name: str, value: object) -> object:
    """A JSON value from `POST /knobs` -> the typed knob value, or ValueError."""
    if name == "latency_s":
        return as_float(name, value, 0.0, HANG_BOUND_S)
    if name == "failure_rate":
        return as_float(name, value, 0.0, 1.0)
    if name == "failure_seed":
        return None if value is None else as_int(name, value, -(2**63), 2**63 - 1)
    if name in ("hang", "healthy"):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be a boolean")
        return value
    if name == "capacity":
        return as_int(name, value, 0, 1_000_000)
    if name == "fail_status":
        return as_int(name, value, 400, 599)
    raise ValueError(f"unknown knob: {name}")
