"""A Python client and the `gpuqueue` command line for the gpuqueue HTTP API."""

from __future__ import annotations

from . import webhooks
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
from .push import PUSH_URL_HEADER
from .webhooks import WebhookVerificationError

__all__ = [
    "PUSH_URL_HEADER",
    "SYNC_AUDIO_MAX_BYTES",
    "TERMINAL_STATUSES",
    "ApiError",
    "ChainedReader",
    "GpuqueueClient",
    "WebhookVerificationError",
    "audio_content_type",
    "fits_sync",
    "transcribe_request_size",
    "wav_header",
    "webhooks",
]
