"""A Python client and the `gpuqueue` command line for the gpuqueue HTTP API."""

from __future__ import annotations

from .client import TERMINAL_STATUSES, ApiError, GpuqueueClient

__all__ = ["TERMINAL_STATUSES", "ApiError", "GpuqueueClient"]
