"""A Python client and the `gpuqueue` command line for the gpuqueue HTTP API."""

from __future__ import annotations

from .client import (
    SYNC_AUDIO_MAX_BYTES,
    TERMINAL_STATUSES,
    ApiError,
    ChainedReader,
    GpuqueueClient,
    audio_content_type,
    fits_sync,
    transcribe_request_size,
    wav_header,
)

__all__ = [
    "SYNC_AUDIO_MAX_BYTES",
    "TERMINAL_STATUSES",
    "ApiError",
    "ChainedReader",
    "GpuqueueClient",
    "audio_content_type",
    "fits_sync",
    "transcribe_request_size",
    "wav_header",
]
