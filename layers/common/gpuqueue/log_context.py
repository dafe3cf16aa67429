"""Log context: every line about a task carries its id, also as the correlation id.

One CloudWatch Logs Insights query (`correlation_id = "<task id>"`) then follows a task
through submit, dispatch, the stream, webhooks and the reaper, across functions.
"""

from __future__ import annotations

from aws_lambda_powertools import Logger


def correlate_task(logger: Logger, task_id: str) -> None:
    logger.append_keys(task_id=task_id)
    logger.set_correlation_id(task_id)


def correlate_thread(logger: Logger, task_id: str) -> None:
    """The same for one thread of an invocation running several tasks at once: this
    thread's lines carry the task's id (clear with `logger.thread_safe_clear_keys()`)."""
    logger.thread_safe_append_keys(task_id=task_id, correlation_id=task_id)
