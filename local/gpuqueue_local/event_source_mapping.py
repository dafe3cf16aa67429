"""Local SQS event source mapping: long-poll, batch, cap concurrency, settle partial batches.

Like Lambda's pollers: at most `concurrency` batches in flight (MaximumConcurrency, bounded
by reserved concurrency), a batch is up to BatchSize messages gathered for at most the
batching window, successes are deleted, failures and function errors are left for SQS's
visibility timeout and redrive to handle.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from gpuqueue_local.event_sources import settle_batch, sqs_event
from gpuqueue_local.lambda_runtime import FunctionRuntime

if TYPE_CHECKING:
    from mypy_boto3_sqs.type_defs import MessageTypeDef

LONG_POLL_SECONDS = 2  # short enough that stopping is quick; SQS allows up to 20
# Lambda polls an SQS queue with five pollers and adds more only while messages keep coming.
# Here too: an idle queue costs five long polls, not one per allowed batch (an uncapped
# function's 32 pollers kept moto a third busy with receives on empty dead-letter queues).
IDLE_POLLERS = 5


@dataclass
class SqsEventSource:
    function: FunctionRuntime
    queue_url: str
    queue_arn: str
    batch_size: int = 10
    batching_window_seconds: float = 0.0
    concurrency: int = 2
    region: str = "us-east-1"
    log: Callable[[str], None] | None = None
    # The function's keys: Lambda's pollers receive and delete with its execution role.
    credentials: Mapping[str, str] = field(default_factory=dict)
    batches: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _enabled: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    # Set while receives return messages: the pollers past IDLE_POLLERS poll only then.
    _busy: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        self._enabled.set()
        for index in range(self.concurrency):
            thread = threading.Thread(
                target=self._poll,
                args=(index >= IDLE_POLLERS,),
                daemon=True,
                name=f"esm-{self.function.spec.logical_id}-{index}",
            )
            thread.start()
            self._threads.append(thread)

    def pause(self) -> None:
        """Like setting the mapping's `Enabled: false`: batches in flight finish, no new polls."""
        self._enabled.clear()

    def resume(self) -> None:
        self._enabled.set()

    def stopping(self) -> None:
        """No new polls or invocations (what is under way goes on); `stop` then waits."""
        self._stop.set()
        self._enabled.set()
        self._busy.set()

    def stop(self) -> None:
        self.stopping()
        for thread in self._threads:
            thread.join(timeout=LONG_POLL_SECONDS + 5)

    def _receive(self, sqs: Any) -> list[MessageTypeDef]:
        messages: list[MessageTypeDef] = []
        window_ends = time.monotonic() + self.batching_window_seconds
        while len(messages) < self.batch_size and not self._stop.is_set():
            wait = LONG_POLL_SECONDS if not messages else 0
            got = sqs.receive_message(
                QueueUrl=self.queue_url,
                MaxNumberOfMessages=min(10, self.batch_size - len(messages)),
                WaitTimeSeconds=wait,
                AttributeNames=["All"],
                MessageAttributeNames=["All"],
            ).get("Messages", [])
            messages.extend(got)
            if messages and (not got or time.monotonic() >= window_ends):
                break
        return messages

    def _poll(self, extra: bool) -> None:
        sqs = boto3.client(
            "sqs",
            region_name=self.region,
            aws_access_key_id=self.credentials.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=self.credentials.get("AWS_SECRET_ACCESS_KEY"),
            config=Config(read_timeout=LONG_POLL_SECONDS + 10, retries={"max_attempts": 2}),
        )
        while not self._stop.is_set():
            if not self._enabled.wait(timeout=0.5):
                continue
            if extra and not self._busy.wait(timeout=0.5):
                continue
            try:
                messages = self._receive(sqs)
            except Exception as error:
                if self.log:
                    self.log(f"receive failed: {error}")
                self._stop.wait(1.0)
                continue
            if not messages:
                self._busy.clear()
                continue
            self._busy.set()
            if not self._enabled.is_set():
                # Paused while this poll was under way: hand the messages straight back.
                for message in messages:
                    sqs.change_message_visibility(
                        QueueUrl=self.queue_url,
                        ReceiptHandle=message["ReceiptHandle"],
                        VisibilityTimeout=0,
                    )
                continue
            event = sqs_event(messages, queue_arn=self.queue_arn, region=self.region)
            result = self.function.invoke(event)
            self.batches += 1
            try:
                failed = settle_batch(
                    sqs, self.queue_url, messages, result.payload, function_failed=not result.ok
                )
            except Exception as error:
                if self.log:
                    self.log(f"settling the batch failed: {error}")
                continue
            if self.log and (failed or not result.ok):
                reason = result.error_message if not result.ok else "partial batch failure"
                self.log(f"{len(failed)}/{len(messages)} messages back to the queue ({reason})")
