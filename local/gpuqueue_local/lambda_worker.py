"""One Lambda "container": a process that imports a handler once and serves invocations.

Protocol (one JSON object per line): the parent writes `{"id", "event", "timeout_ms"}` to
stdin; the worker answers `{"id", "result"}` or `{"id", "error": {"errorType",
"errorMessage"}}` on a private pipe. Everything the handler prints or logs goes to stderr,
which the parent streams with the function's name as prefix.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class WorkerContext:
    """LambdaContext for a local invocation: remaining time follows the function's Timeout."""

    function_name: str
    memory_limit_in_mb: int
    deadline: float
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_version: str = "$LATEST"

    @property
    def invoked_function_arn(self) -> str:
        return f"arn:aws:lambda:us-east-1:123456789012:function:{self.function_name}"

    @property
    def log_group_name(self) -> str:
        return f"/aws/lambda/{self.function_name}"

    @property
    def log_stream_name(self) -> str:
        return f"local/[$LATEST]{os.getpid()}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


def _serve(
    handler: Any, function_name: str, memory: int, requests_in: TextIO, replies: TextIO
) -> None:
    for line in requests_in:
        if not line.strip():
            continue
        request = json.loads(line)
        context = WorkerContext(
            function_name=function_name,
            memory_limit_in_mb=memory,
            deadline=time.monotonic() + request["timeout_ms"] / 1000,
        )
        try:
            reply: dict[str, Any] = {
                "id": request["id"],
                "result": handler(request["event"], context),
            }
            encoded = json.dumps(reply, default=str)
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            encoded = json.dumps(
                {
                    "id": request["id"],
                    "error": {"errorType": type(error).__name__, "errorMessage": str(error)},
                }
            )
        replies.write(encoded[:-1] + f', "max_memory_mb": {_max_memory_mb()}}}' + "\n")
        replies.flush()


def _max_memory_mb() -> int:
    """The process's peak resident memory so far: what Lambda reports as Max Memory Used."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--handler", required=True, help="module.function")
    parser.add_argument("--function-name", required=True)
    parser.add_argument("--memory", type=int, default=512)
    args = parser.parse_args(argv)

    # Keep the protocol pipe private; point fd 1 (print, Powertools' logger) at stderr.
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    module_name, _, function = args.handler.rpartition(".")
    handler = getattr(importlib.import_module(module_name), function)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    _serve(handler, args.function_name, args.memory, sys.stdin, replies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
