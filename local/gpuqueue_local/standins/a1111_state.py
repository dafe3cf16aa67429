"""The server-wide job state of the stand-in's AUTOMATIC1111 half, as A1111 keeps it.

Written against AUTOMATIC1111/stable-diffusion-webui v1.10 (docs/gpu-servers.md section 3):
`modules/shared_state.py` (`State.begin/end/interrupt/dict`), `modules/progress.py`
(`current_task`, `pending_tasks`, `finished_tasks`, `POST /internal/progress`) and
`modules/api/api.py` (`text2imgapi` under `queue_lock`, `progressapi`, `interruptapi`).

What a client of a real A1111 must live with, and this reproduces:

- One job at a time: txt2img waits on the server's queue lock, so a second call queues
  inside the server (A1111 never answers "busy").
- Progress (`GET /sdapi/v1/progress`) and interrupt (`POST /sdapi/v1/interrupt`) are
  server-wide: they are about whichever job runs now, maybe another caller's. An interrupt
  when idle does nothing; the flag is cleared by the next job's `begin()`.
- An interrupted job stops at its next sampling step and txt2img still answers 200 with
  the partial image (none when it was interrupted before its first step).
- Per-task progress (`POST /internal/progress {"id_task"}`, the task id a caller may set
  with txt2img's `force_task_id`) exists only when the web UI is served: an API-only server
  (`--nowebui`) answers 404 there.
"""

from __future__ import annotations

import random
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

# A1111 keeps the last 16 finished task ids (modules/progress.py).
_FINISHED_KEPT: Final = 16
TXT2IMG_JOB: Final = "scripts_txt2img"


def create_task_id(task_type: str) -> str:
    """A1111's id for a task its caller did not name (`modules/progress.create_task_id`)."""
    suffix = "".join(random.choices(string.ascii_uppercase + string.digits, k=7))
    return f"task({task_type}-{suffix})"


@dataclass
class _SharedState:
    """`modules.shared.state`: the fields the API shows."""

    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    time_start: float = 0.0
    textinfo: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": self.stopping_generation,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }


@dataclass(frozen=True)
class JobEnd:
    """How a txt2img job ended: the steps it ran, and whether an interrupt stopped it."""

    steps_run: int
    interrupted: bool


class A1111State:
    """One A1111 server's queue lock, shared state and task bookkeeping."""

    def __init__(self) -> None:
        self._queue_lock = threading.Lock()  # api.py's queue_lock: one job at a time
        self._lock = threading.Lock()  # guards the fields below (A1111 relies on the GIL)
        self._state = _SharedState()
        self._current_task: str | None = None
        self._pending: dict[str, float] = {}
        self._finished: list[str] = []
        self._preview: Callable[[], str] | None = None  # the running job's live preview
        self.interrupts = 0  # POST /sdapi/v1/interrupt calls
        self.interrupted_jobs = 0  # jobs an interrupt stopped

    # -- txt2img

    def run_job(
        self,
        task_id: str,
        steps: int,
        *,
        latency_s: float,
        stop: threading.Event,
        preview: Callable[[], str],
        tick_s: float = 0.05,
    ) -> JobEnd | None:
        """Queue behind the lock, then run `steps` sampling steps over `latency_s`,
        stopping at the next step after an interrupt (`preview` renders its live preview).
        None: the server stopped first."""
        with self._lock:
            self._pending[task_id] = time.time()
        while not self._queue_lock.acquire(timeout=tick_s):
            if stop.is_set():
                with self._lock:
                    self._pending.pop(task_id, None)
                return None
        try:
            with self._lock:
                self._begin(task_id, steps)
                self._preview = preview
            end = self._sample(steps, latency_s=latency_s, stop=stop)
            with self._lock:
                if end is not None:
                    self._finish(task_id)
                    if end.interrupted:
                        self.interrupted_jobs += 1
                self._end()
            return end
        finally:
            self._queue_lock.release()

    def _begin(self, task_id: str, steps: int) -> None:
        # State.begin(job="scripts_txt2img") then start_task(id); process_images then sets
        # job_count = n_iter (1 here) and the sampler its step count.
        self._state = _SharedState(
            job=TXT2IMG_JOB,
            job_count=1,
            job_timestamp=datetime.now().strftime("%Y%m%d%H%M%S"),
            sampling_steps=steps,
            time_start=time.time(),
        )
        self._current_task = task_id
        self._pending.pop(task_id, None)

    def _sample(self, steps: int, *, latency_s: float, stop: threading.Event) -> JobEnd | None:
        per_step = latency_s / steps
        started = time.monotonic()
        for step in range(1, steps + 1):
            # The sampler's step callback raises InterruptedException when the flag is up.
            with self._lock:
                if self._state.interrupted:
                    return JobEnd(steps_run=step - 1, interrupted=True)
            # Wait till this step's end on the clock (not per step), so rounding never adds up.
            if stop.wait(max(0.0, started + per_step * step - time.monotonic())):
                return None
            with self._lock:
                self._state.sampling_step = step
        with self._lock:
            return JobEnd(steps_run=steps, interrupted=self._state.interrupted)

    def _finish(self, task_id: str) -> None:
        if self._current_task == task_id:
            self._current_task = None
        self._finished.append(task_id)
        del self._finished[:-_FINISHED_KEPT]

    def _end(self) -> None:
        # State.end(): job and job_count reset; the step counts and flags stay as they were.
        self._state.job = ""
        self._state.job_count = 0
        self._preview = None

    # -- the routes

    def interrupt(self) -> None:
        """`POST /sdapi/v1/interrupt`: whichever job runs now (harmless when idle)."""
        with self._lock:
            self.interrupts += 1
            self._state.interrupted = True

    def progress(self, *, skip_current_image: bool) -> dict[str, Any]:
        """`GET /sdapi/v1/progress` (`current_image`: the live preview, unless skipped)."""
        with self._lock:
            state = self._state
            if state.job_count == 0:
                return _progress_answer(0.0, 0.0, state, None)
            progress = 0.01 + state.job_no / state.job_count
            if state.sampling_steps > 0:
                progress += state.sampling_step / state.sampling_steps / state.job_count
            elapsed = time.time() - state.time_start
            eta_relative = elapsed / progress - elapsed
            preview = None if skip_current_image else self._preview
            image = preview() if preview is not None and state.sampling_step > 0 else None
            return _progress_answer(min(progress, 1.0), eta_relative, state, image)

    def task_progress(self, id_task: str | None) -> dict[str, Any]:
        """`POST /internal/progress`: the named task's (modules/progress.progressapi)."""
        with self._lock:
            active = id_task is not None and id_task == self._current_task
            queued = id_task in self._pending
            completed = id_task in self._finished
            answer: dict[str, Any] = {
                "active": active,
                "queued": queued,
                "completed": completed,
                "progress": None,
                "eta": None,
                "live_preview": None,
                "id_live_preview": -1,
                "textinfo": "Waiting...",
            }
            if not active:
                if queued and id_task is not None:
                    order = sorted(self._pending, key=self._pending.__getitem__)
                    answer["textinfo"] = f"In queue: {order.index(id_task) + 1}/{len(order)}"
                return answer
            state = self._state
            progress = 0.0
            if state.job_count > 0:
                progress += state.job_no / state.job_count
                if state.sampling_steps > 0:
                    progress += state.sampling_step / state.sampling_steps / state.job_count
            progress = min(progress, 1.0)
            elapsed = time.time() - state.time_start
            answer["progress"] = progress
            answer["eta"] = elapsed / progress - elapsed if progress > 0 else None
            answer["textinfo"] = state.textinfo
            return answer

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "interrupts": self.interrupts,
                "interrupted": self.interrupted_jobs,
                "current_task": self._current_task,
                "queued_tasks": len(self._pending),
            }

    def reset_stats(self) -> None:
        with self._lock:
            self.interrupts = 0
            self.interrupted_jobs = 0


def _progress_answer(
    progress: float, eta_relative: float, state: _SharedState, image: str | None
) -> dict[str, Any]:
    return {
        "progress": progress,
        "eta_relative": eta_relative,
        "state": state.as_dict(),
        "current_image": image,
        "textinfo": state.textinfo,
        # api.py answers `current_task=current_task`, a name it imported from
        # modules.progress when the module loaded (None then): it is always null.
        "current_task": None,
    }
