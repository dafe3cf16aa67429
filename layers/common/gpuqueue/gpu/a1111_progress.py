"""Following one A1111 txt2img call: its progress, and stopping it when its task is canceled.

A1111's progress (`GET /sdapi/v1/progress`) and interrupt (`POST /sdapi/v1/interrupt`)
are server-wide: they are about whichever job the server runs now, and it runs one at a
time, queueing the others behind a lock (docs/gpu-servers.md section 3). So a job is only
followed when we know the running one is ours:

- `PER_TASK`: the server serves `POST /internal/progress {"id_task"}` (A1111 1.6+ with its
  web UI) and our txt2img named its task with `force_task_id`: the answer says whether our
  task is the active one, and its progress.
- `SERVER_WIDE`: no such route (an API-only server, `--nowebui`, answers 404) but the
  endpoint's capacity is 1: this queue sends it one call at a time, so the running job is
  ours (unless someone else uses the server behind the queue's back).
- `NOT_OURS`: neither: another task's job may be the one running. No progress is reported
  and no interrupt sent; a canceled task still ends CANCELED (its image is not kept), but
  its GPU runs to the end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from enum import StrEnum

import requests
from aws_lambda_powertools import Logger
from pydantic import BaseModel, ValidationError

from gpuqueue.gpu.call_watch import POLL_SECONDS, CallWatch
from gpuqueue.gpu.credentials import GpuCredentials
from gpuqueue.models import Endpoint

logger = Logger(child=True)

PROGRESS_PATH = "/sdapi/v1/progress?skip_current_image=true"  # no live preview's base64
TASK_PROGRESS_PATH = "/internal/progress"
INTERRUPT_PATH = "/sdapi/v1/interrupt"
# A progress poll or an interrupt is small: an answer slower than this is not worth waiting
# for (the next poll comes a second later).
POLL_TIMEOUT = (3.0, 2.0)
# Statuses of a server without the per-task route: FastAPI's "no such route / method".
NO_ROUTE_STATUSES = frozenset({404, 405})


class Following(StrEnum):
    UNKNOWN = "unknown"  # the per-task route not tried yet
    PER_TASK = "per_task"
    SERVER_WIDE = "server_wide"
    NOT_OURS = "not_ours"


class _TaskProgress(BaseModel):
    """`POST /internal/progress`'s answer (modules/progress.ProgressResponse)."""

    active: bool
    queued: bool = False
    completed: bool = False
    progress: float | None = None
    eta: float | None = None


class _SharedState(BaseModel):
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class _ServerProgress(BaseModel):
    """`GET /sdapi/v1/progress`'s answer (modules/api/models.ProgressResponse)."""

    eta_relative: float | None = None
    state: _SharedState


def a1111_task_id(task_id: str, attempt: int) -> str:
    """Our `force_task_id`: A1111's own ids look like `task(txt2img-XXXXXXX)`. One per
    attempt, so a retry is never taken for its earlier attempt (A1111 keeps finished ids)."""
    return f"task(gpuqueue-{task_id}-{attempt})"


class A1111Follower:
    """`poll` and `interrupt` for `gpu.call_watch.watched`, for one txt2img call; `ended`
    must be set when the call returns."""

    def __init__(
        self,
        session: requests.Session,
        credentials: GpuCredentials,
        endpoint: Endpoint,
        *,
        id_task: str,
        steps: int,
        watch: CallWatch,
        poll_seconds: float = POLL_SECONDS,
    ) -> None:
        self._session = session
        self._credentials = credentials
        self._endpoint = endpoint
        self.id_task = id_task
        self._steps = steps
        self._watch = watch
        self._poll_seconds = poll_seconds
        self.following = Following.UNKNOWN
        self.interrupted = False  # an interrupt was sent for our job
        self.ended = threading.Event()

    # -- for watched()

    def poll(self) -> None:
        """Report our job's progress, when it is ours and running."""
        if self.following is Following.NOT_OURS:
            return
        if self.following in (Following.UNKNOWN, Following.PER_TASK):
            answer = self._task_progress()
            if answer is not None:
                if answer.active and answer.progress is not None:
                    # One image (n_iter 1): A1111's fraction is step / steps exactly.
                    step = round(answer.progress * self._steps)
                    self._watch.progress(step, self._steps, eta_seconds=answer.eta)
                return
        if self.following is not Following.SERVER_WIDE:
            return
        state = self._server_progress()
        if state is not None and state.state.job_count != 0 and state.state.sampling_steps > 0:
            self._watch.progress(
                state.state.sampling_step,
                state.state.sampling_steps,
                eta_seconds=state.eta_relative,
            )

    def interrupt(self) -> None:
        """Stop our job: once it is the one running (not while it queues behind another,
        whose job an interrupt would stop), and never when we cannot tell it is ours."""
        while not self.ended.is_set():
            if self._ours_is_running():
                if self.ended.is_set():
                    return  # it ended meanwhile: the running job may be another's now
                try:
                    self._send(
                        lambda headers: self._session.post(
                            self._url(INTERRUPT_PATH), headers=headers, timeout=POLL_TIMEOUT
                        )
                    )
                except requests.RequestException:
                    self.ended.wait(self._poll_seconds)
                    continue
                self.interrupted = True
                return
            if self.following is Following.NOT_OURS:
                return
            self.ended.wait(self._poll_seconds)

    # -- the server's answers

    def _ours_is_running(self) -> bool:
        if self.following in (Following.UNKNOWN, Following.PER_TASK):
            answer = self._task_progress()
            if answer is not None:
                return answer.active
        if self.following is not Following.SERVER_WIDE:
            return False
        state = self._server_progress()
        # Idle: ours has not begun yet (an interrupt now would be cleared by its start).
        return state is not None and state.state.job_count != 0

    def _task_progress(self) -> _TaskProgress | None:
        """Our task's progress; None when the server has no per-task route (then we know
        how to follow the job from here on) or did not answer."""
        try:
            response = self._send(
                lambda headers: self._session.post(
                    self._url(TASK_PROGRESS_PATH),
                    json={"id_task": self.id_task, "id_live_preview": -1, "live_preview": False},
                    headers=headers,
                    timeout=POLL_TIMEOUT,
                )
            )
        except requests.RequestException:
            return None
        if response.status_code in NO_ROUTE_STATUSES:
            self._without_task_route()
            return None
        try:
            answer = _TaskProgress.model_validate_json(response.content)
        except ValidationError:
            return None
        if response.status_code == 200:
            self.following = Following.PER_TASK
            return answer
        return None

    def _without_task_route(self) -> None:
        if self._endpoint.capacity == 1:
            self.following = Following.SERVER_WIDE
            return
        self.following = Following.NOT_OURS
        logger.info(
            "a1111 endpoint has no per-task progress route and takes several calls at once: "
            "its progress is not reported and a canceled task's job is not interrupted",
            extra={"endpoint_id": self._endpoint.endpoint_id, "capacity": self._endpoint.capacity},
        )

    def _server_progress(self) -> _ServerProgress | None:
        try:
            response = self._send(
                lambda headers: self._session.get(
                    self._url(PROGRESS_PATH), headers=headers, timeout=POLL_TIMEOUT
                )
            )
            if response.status_code != 200:
                return None
            return _ServerProgress.model_validate_json(response.content)
        except (requests.RequestException, ValidationError):
            return None

    def _send(self, request: Callable[[dict[str, str]], requests.Response]) -> requests.Response:
        return self._credentials.send(self._endpoint, lambda headers: request(dict(headers)))

    def _url(self, path: str) -> str:
        return f"{self._endpoint.url.rstrip('/')}{path}"
