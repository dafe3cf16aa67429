"""Observability: each function's logger, tracer and metrics, and the one decorator that puts
them around its `lambda_handler`; and the log context that ties a task's lines together.

Every line about a task carries its id, also as the correlation id: one CloudWatch Logs
Insights query (`correlation_id = "<task id>"`) then follows a task through submit, dispatch,
the stream, webhooks and the reaper, across functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from aws_lambda_powertools import Logger, Metrics, Tracer

Handler = TypeVar("Handler", bound=Callable[..., Any])

# What X-Ray's patch_all patches in Lambda minus sqlite3, which no function uses: the AWS SDK
# and requests (GPU calls, health checks). Naming them spares each cold start the import of
# every other library the SDK knows how to patch.
TRACED_LIBRARIES = ("botocore", "requests")


class Observability:
    """One function's logger, tracer and metrics (Powertools, configured by POWERTOOLS_* in
    its environment, read here: build it at module level, once per cold start).

    `entry` is the decorator for `lambda_handler`: each invocation starts with a clear log
    context carrying the Lambda context's keys (and, given `correlation_id_path`, the
    correlation id found there in the event); it runs in an X-Ray subsegment unless
    `traced=False`; with `publishes_metrics=True` the metrics it added are flushed as one EMF
    blob when it returns or raises.
    """

    def __init__(
        self,
        *,
        correlation_id_path: str | None = None,
        traced: bool = True,
        publishes_metrics: bool = False,
    ) -> None:
        self.logger = Logger()
        self.tracer = Tracer(patch_modules=TRACED_LIBRARIES) if traced else None
        self._metrics = Metrics() if publishes_metrics else None
        self._correlation_id_path = correlation_id_path

    @property
    def metrics(self) -> Metrics:
        # Metrics added without the flush at the end of `entry` would vanish: say so at import.
        if self._metrics is None:
            raise AttributeError("metrics of a function built without publishes_metrics=True")
        return self._metrics

    def entry(self, handler: Handler) -> Handler:
        # Innermost first: the flush runs inside the subsegment, both inside the log context.
        wrapped: Callable[..., Any] = handler
        if self._metrics is not None:
            wrapped = self._metrics.log_metrics(wrapped)
        if self.tracer is not None:
            wrapped = self.tracer.capture_lambda_handler(wrapped)
        wrapped = self.logger.inject_lambda_context(
            wrapped, correlation_id_path=self._correlation_id_path, clear_state=True
        )
        return cast(Handler, wrapped)


def correlate_task(logger: Logger, task_id: str) -> None:
    """This invocation's lines from here on carry the task's id, also as correlation id."""
    logger.append_keys(task_id=task_id)
    logger.set_correlation_id(task_id)


def correlate_thread(logger: Logger, task_id: str) -> None:
    """The same for one thread of an invocation running several tasks at once: this
    thread's lines carry the task's id (clear with `logger.thread_safe_clear_keys()`)."""
    logger.thread_safe_append_keys(task_id=task_id, correlation_id=task_id)
