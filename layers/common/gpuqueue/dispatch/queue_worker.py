"""A dispatcher invocation's record, as one call: its message driven through a GPU slot
(TaskDispatcher), the next messages on that slot taken from the lane's queue while a whole
call fits in the invocation's time, up to `calls_per_worker` such calls at once (a
WorkerGroup); each message settled as the event source mapping settles a record."""

from __future__ import annotations

import threading
from collections.abc import Callable

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from pydantic import ValidationError

from gpuqueue.dispatch.dispatcher import (
    SHARED_RECEIVE_DRY_SECONDS,
    SHARED_RECEIVE_HOLD_SECONDS,
    SHARED_RECEIVE_WINDOW_SECONDS,
    DispatchOutcome,
    Pulled,
    TaskDispatcher,
)
from gpuqueue.dispatch.shared_receive import SharedReceive
from gpuqueue.dispatch.worker_group import WorkerGroup
from gpuqueue.errors import RetryLater
from gpuqueue.models import QueueMessage
from gpuqueue.observability import correlate_thread
from gpuqueue.store.task_queue import DELETE_BATCH, TaskQueue

OUTCOME_METRIC = {
    DispatchOutcome.DONE: "TasksSucceeded",
    DispatchOutcome.FAILED: "TasksFailed",
    DispatchOutcome.EXPIRED: "TasksExpired",
    # Canceled while it ran (a cancel before it ran is counted by the tasks function).
    DispatchOutcome.CANCELED: "TasksCanceled",
}


class MessageSettler:
    """What a message's end means on its queue and in the metrics, whether the event source
    mapping handed it over or a worker pulled it."""

    def __init__(self, queue: TaskQueue, *, metrics: Metrics, logger: Logger) -> None:
        self._queue = queue
        self._metrics = metrics
        self._logger = logger

    def count(self, outcome: DispatchOutcome) -> None:
        name = OUTCOME_METRIC.get(outcome)
        if name is not None:
            self._metrics.add_metric(name=name, unit=MetricUnit.Count, value=1)

    def return_later(self, retry: RetryLater, message: QueueMessage, receipt: str) -> bool:
        """Have a message come back after the retry's delay; True if it is to be deleted (a
        fresh, delayed copy was sent in its place)."""
        log = {"reason": retry.reason, "delay_seconds": retry.delay_seconds}
        if retry.requeue:
            self._queue.send(message, delay_seconds=retry.delay_seconds)
            self._logger.info("task requeued", extra=log)
            return True
        self._queue.retry_after(receipt, retry.delay_seconds)
        self._metrics.add_metric(name="TaskRetries", unit=MetricUnit.Count, value=1)
        self._logger.info("message returned to the queue", extra=log)
        return False


class QueuePuller:
    """The dispatcher's next tasks from this function's own queue: a worker still holding a
    GPU slot receives its next message itself. Each is settled as the event source mapping
    settles a record: deleted once its task's state is durable (in batches, at the end),
    sent back later on RetryLater, left to come back on any other error."""

    def __init__(
        self,
        queue: TaskQueue,
        settler: MessageSettler,
        *,
        logger: Logger,
        on_pulled: Callable[[], None] | None = None,
    ) -> None:
        self._queue = queue
        self._settler = settler
        self._logger = logger
        self._shared: SharedReceive[Pulled] = SharedReceive(
            self._receive,
            lambda pulled: queue.release([p.receipt for p in pulled]),
            window_seconds=SHARED_RECEIVE_WINDOW_SECONDS,
            hold_seconds=SHARED_RECEIVE_HOLD_SECONDS,
            dry_seconds=SHARED_RECEIVE_DRY_SECONDS,
        )
        self._done: list[str] = []
        self._lock = threading.Lock()  # the group's workers settle side by side
        self._taken: set[str] = set()
        self.on_pulled = on_pulled

    def take(self, task_id: str) -> bool:
        with self._lock:
            if task_id in self._taken:
                return False
            self._taken.add(task_id)
            return True

    def give_back(self, task_id: str) -> None:
        with self._lock:
            self._taken.discard(task_id)

    def expect(self, worker: object, at: float | None) -> None:
        self._shared.expect(worker, at)

    def pull(self) -> Pulled | None:
        pulled = self.pull_many(1)
        return pulled[0] if pulled else None

    def pull_many(self, count: int) -> list[Pulled]:
        """Up to `count` messages: ones received for this invocation's workers due now, then
        one receive (SharedReceive)."""
        pulled = self._shared.pull(count)
        if pulled and self.on_pulled is not None:
            self.on_pulled()
        return pulled

    def _receive(self, count: int) -> list[Pulled]:
        pulled: list[Pulled] = []
        for body, receipt in self._queue.receive(count):
            try:
                message = QueueMessage.model_validate_json(body)
            except ValidationError:
                # Left alone: it comes back until its receive count sends it to the DLQ.
                self._logger.warning("unreadable message left for the dead-letter queue")
                continue
            pulled.append(Pulled(message=message, receipt=receipt))
        return pulled

    def settle(self, pulled: Pulled, result: DispatchOutcome | Exception) -> None:
        if isinstance(result, DispatchOutcome):
            self._settler.count(result)
            self._delete_later(pulled.receipt)
        elif isinstance(result, RetryLater):
            if self._settler.return_later(result, pulled.message, pulled.receipt):
                self._delete_later(pulled.receipt)
        else:
            self._logger.error(
                "pulled task failed; its message comes back",
                extra={"task_id": pulled.message.task_id},
                exc_info=result,
            )

    def _delete_later(self, receipt: str) -> None:
        with self._lock:
            self._done.append(receipt)
            full = len(self._done) >= DELETE_BATCH
        if full:
            self.flush()

    def flush(self) -> None:
        """Delete the messages whose tasks are done (a batch at a time, and at the end)."""
        with self._lock:
            done, self._done = self._done, []
        self._queue.delete(done)

    def close(self) -> None:
        """The invocation ends: hand back what no worker took, delete what is done."""
        self._shared.close()
        self.flush()


class QueueWorker:
    def __init__(
        self,
        dispatcher: TaskDispatcher,
        queue: TaskQueue,
        *,
        calls_per_worker: int,
        metrics: Metrics,
        logger: Logger,
    ) -> None:
        self._dispatcher = dispatcher
        self._queue = queue
        self._calls_per_worker = calls_per_worker
        self._logger = logger
        self._settler = MessageSettler(queue, metrics=metrics, logger=logger)

    def serve(
        self, message: QueueMessage, receipt: str, *, remaining_seconds: Callable[[], float]
    ) -> None:
        """The record's task and the ones its workers pull after it. Returns when the record
        is to be deleted; raises RetryLater when it must stay on the queue (its visibility
        already set to the retry's delay)."""
        puller = QueuePuller(self._queue, self._settler, logger=self._logger)
        dispatcher = self._dispatcher
        logger = self._logger

        def work_on(pulled: Pulled) -> Callable[[], None]:
            def work() -> None:
                correlate_thread(logger, pulled.message.task_id)
                try:
                    dispatcher.serve_pulled(
                        pulled, remaining_seconds=remaining_seconds, next_tasks=puller
                    )
                finally:
                    logger.thread_safe_clear_keys()

            return work

        def start_some(count: int) -> list[Callable[[], None]]:
            return [work_on(pulled) for pulled in puller.pull_many(count)]

        group = WorkerGroup(
            size=self._calls_per_worker,
            start_some=start_some,
            free_slots=dispatcher.free_slots,
            remaining_seconds=remaining_seconds,
            min_seconds=dispatcher.seconds_for_a_call,
        )
        puller.on_pulled = group.backlog_seen
        try:
            with group:
                outcome = dispatcher.dispatch(
                    message, remaining_seconds=remaining_seconds, next_tasks=puller
                )
        except RetryLater as retry:
            if self._settler.return_later(retry, message, receipt):
                return  # returning normally deletes this one
            raise
        finally:
            puller.close()
        self._settler.count(outcome)
