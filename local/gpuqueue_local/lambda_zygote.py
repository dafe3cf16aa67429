"""A fork server for local Lambda workers.

Every handler imports the same heavy libraries (boto3, pydantic, Powertools): about a second
of CPU per worker, so a stack with twenty warm workers spent ten seconds of its start on
imports. The zygote imports them once; each worker is a fork of it that then imports only its
own handler (its module-level code runs in the fork, with the function's environment).

Only third-party libraries are preloaded: nothing that reads the environment at import time,
no gpuqueue code (its module-level loggers read POWERTOOLS_* when imported), no threads (a
fork copies only the forking thread).

Protocol: a SOCK_SEQPACKET socket pair. The parent sends one JSON request per worker
(argv, env, cwd, sys.path entries) with the worker's stdin, stdout and stderr pipe ends
attached (SCM_RIGHTS); the zygote forks and answers `{"pid": N}`. Children are reaped by
the kernel (SIGCHLD ignored), so a worker that is gone is simply no longer there.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from gpuqueue_local import lambda_worker

PRELOAD = (
    "boto3",
    "botocore.session",
    "botocore.client",
    "pydantic",
    "pydantic_settings",
    "requests",
    "aws_lambda_powertools",
    "aws_lambda_powertools.logging",
    "aws_lambda_powertools.metrics",
    "aws_lambda_powertools.tracing",
    "aws_lambda_powertools.event_handler",
    "aws_lambda_powertools.event_handler.openapi.models",
    "aws_lambda_powertools.utilities.batch",
    "aws_lambda_powertools.utilities.data_classes",
    "aws_lambda_powertools.utilities.idempotency",
    "aws_lambda_powertools.utilities.typing",
)
MAX_MESSAGE_BYTES = 1 << 20


def _preload() -> None:
    for name in PRELOAD:
        with contextlib.suppress(ImportError):  # a library a deployment does without
            importlib.import_module(name)


def _run_child(request: dict[str, object], fds: list[int]) -> int:
    for target, fd in zip((0, 1, 2), fds, strict=True):
        os.dup2(fd, target)
        os.close(fd)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    env = request["env"]
    assert isinstance(env, dict)
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in env.items()})
    os.chdir(str(request["cwd"]))
    path = request["path"]
    assert isinstance(path, list)
    sys.path[:0] = [str(p) for p in path]
    argv = request["argv"]
    assert isinstance(argv, list)
    return lambda_worker.main([str(a) for a in argv])


def serve(sock: socket.socket) -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers
    # Ctrl-C on the stack reaches its whole process group; the parent's EOF stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, 3)
        if not message:
            return  # the parent is gone
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                sock.close()
                code = _run_child(request, fds)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        for fd in fds:
            os.close(fd)
        sock.send(json.dumps({"pid": pid}).encode())


class ForkedProcess:
    """A worker forked by the zygote: pipes like a Popen's, and poll/kill/wait by pid (it is
    the zygote's child, not ours, so there is no wait status: a gone worker reads -9)."""

    def __init__(self, pid: int, stdin: IO[str], stdout: IO[str], stderr: IO[str]) -> None:
        self.pid = pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                self.returncode = -signal.SIGKILL
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0.0)
            time.sleep(0.01)
        return code


class Zygote:
    """The parent's handle on the fork server (started on first use, restarted if it died)."""

    _shared: Zygote | None = None
    _shared_lock = threading.Lock()

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        local_dir = str(Path(__file__).resolve().parents[1])
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (local_dir, os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        self._process = subprocess.Popen(
            [sys.executable, "-m", "gpuqueue_local.lambda_zygote", str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        child.close()
        self._sock = parent
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> Zygote:
        with cls._shared_lock:
            if cls._shared is None or cls._shared._process.poll() is not None:
                cls._shared = cls()
            return cls._shared

    def spawn(
        self, argv: Sequence[str], *, env: dict[str, str], cwd: str, path: Sequence[str]
    ) -> ForkedProcess:
        pipes = [os.pipe() for _ in range(3)]  # (read, write) each; non-inheritable
        child_ends = [pipes[0][0], pipes[1][1], pipes[2][1]]
        request = {"argv": list(argv), "env": env, "cwd": cwd, "path": list(path)}
        try:
            with self._lock:
                socket.send_fds(self._sock, [json.dumps(request).encode()], child_ends)
                answer = self._sock.recv(MAX_MESSAGE_BYTES)
        finally:
            for fd in child_ends:
                os.close(fd)
        if not answer:
            for fd in (pipes[0][1], pipes[1][0], pipes[2][0]):
                os.close(fd)
            raise RuntimeError("the local Lambda fork server exited")
        return ForkedProcess(
            pid=int(json.loads(answer)["pid"]),
            stdin=os.fdopen(pipes[0][1], "w", buffering=1, encoding="utf-8"),
            stdout=os.fdopen(pipes[1][0], "r", encoding="utf-8"),
            stderr=os.fdopen(pipes[2][0], "r", encoding="utf-8", errors="replace"),
        )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    _preload()
    serve(sock)


if __name__ == "__main__":
    main()
