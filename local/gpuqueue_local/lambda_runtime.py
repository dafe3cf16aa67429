"""Local Lambda: each function runs in worker processes built from template.yaml.

A worker is one "container": it imports the handler once (cold start) and then serves
invocations one at a time. Concurrency is bounded per function (reserved concurrency);
an invocation that runs past the function's Timeout is cut off by killing its worker,
and counts as a failure, as on Lambda.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from gpuqueue_local.lambda_zygote import Zygote

LogSink = Callable[[str, str], None]
# Lambda gives init 10 s; local imports on a loaded 2-core CI box can take longer.
INIT_TIMEOUT_SECONDS = 30.0


def print_log(function_name: str, line: str) -> None:
    print(f"[{function_name}] {line}", flush=True)


@dataclass(frozen=True)
class FunctionSpec:
    logical_id: str
    handler: str
    code_dir: Path
    layer_dirs: tuple[Path, ...]
    env: dict[str, str]
    timeout_seconds: float
    memory_mb: int
    reserved_concurrency: int | None


@dataclass
class InvocationResult:
    ok: bool
    payload: Any = None
    error_type: str | None = None
    error_message: str | None = None
    duration_s: float = 0.0
    timed_out: bool = False
    max_memory_mb: int | None = None  # the worker process's peak resident memory so far


InvocationListener = Callable[[str, float, float, bool], None]


class InvocationLog:
    """Appends each invocation (function, start, end: epoch seconds; ok) to a JSON-lines
    file: what tests read to tell which invocations were alive when (say, that no
    dispatcher ran while a callback-mode generation did)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def __call__(self, function: str, started: float, ended: float, ok: bool) -> None:
        line = json.dumps({"function": function, "start": started, "end": ended, "ok": ok})
        with self._lock, self._path.open("a") as out:
            out.write(line + "\n")


class WorkerCrashed(RuntimeError):
    pass


class _Worker:
    def __init__(self, spec: FunctionSpec, base_env: dict[str, str], log: LogSink) -> None:
        env = {**base_env, **spec.env}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(spec.code_dir), *(str(d) for d in spec.layer_dirs), env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        env["AWS_LAMBDA_FUNCTION_NAME"] = spec.logical_id
        env["AWS_LAMBDA_FUNCTION_MEMORY_SIZE"] = str(spec.memory_mb)
        self.spec = spec
        # A fork of the zygote, which has the libraries every handler needs imported already;
        # this worker imports only its handler (as `python -m gpuqueue_local.lambda_worker`).
        self.process = Zygote.shared().spawn(
            [
                "--handler",
                spec.handler,
                "--function-name",
                spec.logical_id,
                "--memory",
                str(spec.memory_mb),
            ],
            env=env,
            cwd=str(spec.code_dir),
            path=[p for p in env["PYTHONPATH"].split(os.pathsep) if p],
        )
        self._replies: IO[str] = self.process.stdout
        self._log_thread = threading.Thread(
            target=self._pump_logs, args=(log,), daemon=True, name=f"log-{spec.logical_id}"
        )
        self._log_thread.start()
        self._reply_lock = threading.Lock()
        self._pending: dict[str, Any] | None = None
        self._reply_ready = threading.Event()
        self._reader = threading.Thread(target=self._read_replies, daemon=True)
        self._started = threading.Event()
        self._reader.start()

    def _pump_logs(self, log: LogSink) -> None:
        stream = self.process.stderr
        assert stream is not None
        for line in stream:
            log(self.spec.logical_id, line.rstrip("\n"))

    def _read_replies(self) -> None:
        for line in self._replies:
            message = json.loads(line)
            if message.get("ready"):
                self._started.set()
                continue
            with self._reply_lock:
                self._pending = message
            self._reply_ready.set()
        # EOF: the process died; wake anyone waiting.
        self._started.set()
        self._reply_ready.set()

    def wait_ready(self, timeout: float) -> bool:
        return self._started.wait(timeout) and self.alive

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def invoke(self, event: Any, timeout_seconds: float) -> InvocationResult:
        request_id = str(uuid.uuid4())
        # Init (imports) has its own limit on Lambda and does not count against Timeout.
        if not self.wait_ready(INIT_TIMEOUT_SECONDS):
            self.kill()
            return InvocationResult(
                ok=False,
                error_type="Runtime.InitError",
                error_message="the function failed to initialise (see its log)",
            )
        started = time.monotonic()
        self._reply_ready.clear()
        self._pending = None
        if not self.alive:  # died between being picked and now: don't wait out the timeout
            raise WorkerCrashed("the worker exited before the invocation")
        stdin = self.process.stdin
        assert stdin is not None
        try:
            stdin.write(
                json.dumps(
                    {"id": request_id, "event": event, "timeout_ms": int(timeout_seconds * 1000)}
                )
                + "\n"
            )
            stdin.flush()
        except (BrokenPipeError, OSError) as error:
            raise WorkerCrashed(str(error)) from error
        deadline = started + timeout_seconds
        if not self._reply_ready.wait(max(0.0, deadline - time.monotonic())):
            self.kill()
            return InvocationResult(
                ok=False,
                error_type="Sandbox.Timedout",
                error_message=f"Task timed out after {timeout_seconds:.2f} seconds",
                duration_s=time.monotonic() - started,
                timed_out=True,
            )
        reply = self._take_reply()
        duration = time.monotonic() - started
        if reply is None or reply.get("id") != request_id:
            self.kill()
            return InvocationResult(
                ok=False,
                error_type="Runtime.ExitError",
                error_message="the function's process exited during the invocation",
                duration_s=duration,
            )
        memory = reply.get("max_memory_mb")
        if memory is not None and memory > self.spec.memory_mb:
            # Lambda kills a function that goes past its MemorySize: the invocation fails
            # and its sandbox goes, so a function sized too small fails here as there.
            self.kill()
            return InvocationResult(
                ok=False,
                error_type="Runtime.OutOfMemory",
                error_message=(
                    f"Runtime exited with error: signal: killed (Max Memory Used {memory} MB "
                    f"of its MemorySize {self.spec.memory_mb} MB)"
                ),
                duration_s=duration,
                max_memory_mb=memory,
            )
        if "error" in reply:
            return InvocationResult(
                ok=False,
                error_type=reply["error"].get("errorType"),
                error_message=reply["error"].get("errorMessage"),
                duration_s=duration,
                max_memory_mb=memory,
            )
        return InvocationResult(
            ok=True, payload=reply.get("result"), duration_s=duration, max_memory_mb=memory
        )

    def _take_reply(self) -> dict[str, Any] | None:
        with self._reply_lock:
            reply, self._pending = self._pending, None
        return reply

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


@dataclass
class FunctionRuntime:
    """The pool of workers for one function, capped at its concurrency."""

    spec: FunctionSpec
    base_env: dict[str, str]
    log: LogSink = print_log
    max_concurrency: int = 10
    invocations: int = 0
    errors: int = 0
    # The largest Max Memory Used of any invocation (what sizes MemorySize on Lambda).
    peak_memory_mb: int = 0
    # Every invocation's duration summed: what Lambda bills (times MemorySize).
    billed_seconds: float = 0.0
    in_flight: int = 0  # invocations running now
    on_invocation: InvocationListener | None = None  # told of each one as it ends
    _idle: list[_Worker] = field(default_factory=list)
    _all: list[_Worker] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _slots: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        limit = self.spec.reserved_concurrency or self.max_concurrency
        self.concurrency = max(1, min(limit, self.max_concurrency))
        self._slots = threading.BoundedSemaphore(self.concurrency)

    def warm(self, count: int = 1, timeout: float = 30.0) -> None:
        workers = [self._spawn() for _ in range(min(count, self.concurrency))]
        for worker in workers:
            if worker.wait_ready(timeout):
                with self._lock:
                    self._idle.append(worker)

    def _spawn(self) -> _Worker:
        worker = _Worker(self.spec, self.base_env, self.log)
        with self._lock:
            self._all.append(worker)
        return worker

    def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult:
        """Run one invocation; blocks while the function is at its concurrency limit."""
        timeout = min(timeout_seconds or self.spec.timeout_seconds, self.spec.timeout_seconds)
        with self._slots:
            with self._lock:
                self.in_flight += 1
                worker = self._idle.pop() if self._idle else None
                if worker is not None and not worker.alive:
                    self._all = [w for w in self._all if w is not worker]
                    worker = None
            if worker is None:
                worker = self._spawn()
            began = time.time()
            try:
                result = worker.invoke(event, timeout)
            except WorkerCrashed as error:
                worker.kill()
                result = InvocationResult(
                    ok=False, error_type="Runtime.ExitError", error_message=str(error)
                )
            with self._lock:
                self.in_flight -= 1
                self.invocations += 1
                self.billed_seconds += result.duration_s
                if not result.ok:
                    self.errors += 1
                if result.max_memory_mb is not None:
                    self.peak_memory_mb = max(self.peak_memory_mb, result.max_memory_mb)
                if worker.alive:
                    self._idle.append(worker)
                else:
                    self._all = [w for w in self._all if w is not worker]
            if self.on_invocation is not None:
                self.on_invocation(self.spec.logical_id, began, time.time(), result.ok)
            return result

    def crash_workers(self) -> int:
        """Kill every worker abruptly (fault injection): in-flight invocations fail."""
        with self._lock:
            workers = list(self._all)
        for worker in workers:
            worker.kill()
        return len(workers)

    def stop(self) -> None:
        with self._lock:
            workers = list(self._all)
            self._all.clear()
            self._idle.clear()
        for worker in workers:
            worker.kill()
