"""A Cog model that behaves like a diffusion model on the wire, for the real Cog server.

`cog_runner.py` serves it with Cog's own HTTP server (coglet 0.23.1, from PyPI: no Docker, no
GPU). It takes the inputs Cog's Stable Diffusion models take (prompt, negative_prompt, width,
height, num_inference_steps, seed), runs one "denoising" step per step under a tqdm bar on
stderr (what diffusers prints, so the prediction's `logs` carry the same progress text a real
model's do), and returns a real PNG of the requested size.

Knobs for tests (extra inputs, so no schema is needed): `step_delay` (seconds a step takes;
default from COG_STEP_DELAY_SECONDS, else 0.1) and `fail_at_step` (raise at that step: a
model error, which Cog answers HTTP 200 with `status: failed`).

A cancel reaches a sync predictor as `cog.CancelationException`, which coglet injects into
the predicting thread (PyThreadState_SetAsyncExc). Python delivers such an exception between
bytecodes, never inside a C call like a long `time.sleep`: so a step sleeps in short ticks,
which bounds how long a cancel waits.

This file runs inside the Cog venv (.venv-cog), not the project's: it imports nothing of
gpuqueue.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Optional

import cog
from tqdm import tqdm

DEFAULT_STEP_DELAY_SECONDS = float(os.environ.get("COG_STEP_DELAY_SECONDS", "0.1"))
# The longest a cancel waits for the step's sleep (see the module docstring).
CANCEL_TICK_SECONDS = 0.02
MAX_SIDE = 2048


class ModelError(RuntimeError):
    """The failure a test asks for with `fail_at_step`."""


def png_bytes(width: int, height: int, seed: int) -> bytes:
    """An RGB PNG of a seeded gradient: rows are one precomputed row shifted through a
    per-row byte table, so a 1024x1024 image costs milliseconds, not seconds."""
    digest = hashlib.sha256(str(seed).encode()).digest()
    red, green, blue = digest[0], digest[1], digest[2]
    row = bytes(
        channel
        for x in range(width)
        for channel in (
            (red + x * 255 // max(width - 1, 1)) % 256,
            green,
            (blue + 255 - x * 255 // max(width - 1, 1)) % 256,
        )
    )
    tables = [bytes((value + shift) % 256 for value in range(256)) for shift in range(256)]
    raw = b"".join(
        b"\x00" + row.translate(tables[y * 255 // max(height - 1, 1)]) for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _sleep_interruptibly(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(min(left, CANCEL_TICK_SECONDS))


class Predictor(cog.BasePredictor):  # type: ignore[misc]  # cog is untyped here
    def setup(self) -> None:
        print("setup: fake diffusion model loaded")

    def predict(  # noqa: PLR0917 - Cog passes a model's inputs by name, as its parameters
        self,
        prompt: str = "",
        negative_prompt: str = "",
        width: int = 512,
        height: int = 512,
        num_inference_steps: int = 20,
        seed: Optional[int] = None,  # noqa: UP045 - Cog's input inspector reads Optional
        step_delay: float = DEFAULT_STEP_DELAY_SECONDS,
        fail_at_step: int = 0,
    ) -> cog.Path:
        if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
            raise ValueError(f"width and height must be 1..{MAX_SIDE}, got {width}x{height}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if seed is None:
            seed = int.from_bytes(os.urandom(4), "big")
        print(f"Using seed: {seed}")
        for step in tqdm(range(num_inference_steps), file=sys.stderr):
            if fail_at_step and step + 1 == fail_at_step:
                raise ModelError(f"model error at step {step + 1}")
            _sleep_interruptibly(step_delay)
        out = Path(tempfile.mkdtemp(prefix="cog-out-")) / "out.png"
        out.write_bytes(png_bytes(width, height, seed))
        return cog.Path(out)
