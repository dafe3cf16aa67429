"""Runs the real Cog HTTP server (cog/coglet 0.23.1 from PyPI, no Docker) with the fake
diffusion model in `gpuqueue_local/cog_model/predict.py`, for tests and `make up`.

Not a stand-in: the server is Cog's own (coglet, in Rust), so what the `cog` adapter meets
here is what it meets in a Replicate-style container: `/health-check` STARTING -> READY,
409 when its one slot is busy, failures as HTTP 200 `status: failed`, cancel by id.

The server runs from `.venv-cog` (`make venv` builds it from requirements-cog.txt), with
that venv's `bin` first on PATH because coglet spawns its worker as `python3` from PATH,
and the model's directory as cwd (COG_PREDICT_TYPE_STUB names `predict.py` relative to it).
It runs in its own process group, so stopping it also stops the worker.

Standalone::

    python -m gpuqueue_local.standins.cog_runner --port 5000 --step-delay 0.2
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Self

import requests

__all__ = [
    "COG_VENV",
    "MODEL_DIR",
    "CogServer",
    "CogServerError",
    "main",
    "readable_log_line",
]

HOST: Final = "127.0.0.1"
REPO_ROOT: Final = Path(__file__).resolve().parents[3]
# GPUQUEUE_COG_VENV points elsewhere, e.g. a worktree sharing another checkout's venv.
COG_VENV: Final = Path(os.environ.get("GPUQUEUE_COG_VENV", REPO_ROOT / ".venv-cog"))
MODEL_DIR: Final = Path(__file__).resolve().parents[1] / "cog_model"
PREDICTOR: Final = "predict.py:Predictor"
# Setup of the fake model takes ~1 s here; coglet's own start is the rest. Generous for a
# loaded 2-core machine.
START_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 10.0
_POLL_S: Final = 0.05
_KEPT_LOG_LINES: Final = 200


class CogServerError(RuntimeError):
    """The Cog server could not be started, or did not become READY in time."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class CogServer:
    """One real Cog server process. `start()` returns once `/health-check` says READY;
    `stop()` ends the process group (idempotent). Also a context manager."""

    name = "cog"

    def __init__(
        self,
        *,
        port: int = 0,
        step_delay_s: float | None = None,
        venv: Path = COG_VENV,
        model_dir: Path = MODEL_DIR,
        predictor: str = PREDICTOR,
        env: Mapping[str, str] | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self._port = port or _free_port()
        self._venv = venv
        self._model_dir = model_dir
        self._predictor = predictor
        self._extra_env = dict(env or {})
        if step_delay_s is not None:
            self._extra_env["COG_STEP_DELAY_SECONDS"] = str(step_delay_s)
        self._log = log
        self._lines: collections.deque[str] = collections.deque(maxlen=_KEPT_LOG_LINES)
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._tmp: Path | None = None
        self._stopped = False

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._port}"

    @property
    def stopped(self) -> bool:
        return self._stopped

    def recent_logs(self) -> list[str]:
        """The server's last output lines (JSON log events), newest last."""
        return list(self._lines)

    def _python(self) -> Path:
        python = self._venv / "bin" / "python"
        if not python.exists():
            raise CogServerError(
                f"no Cog venv at {self._venv}: `make venv` builds it (requirements-cog.txt)"
            )
        return python

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the server and wait until it is READY (or raise CogServerError)."""
        if self._process is not None or self._stopped:
            raise RuntimeError("CogServer can only be started once")
        python = self._python()
        # The predictor's outputs (one PNG a prediction) go to a directory removed at stop.
        self._tmp = Path(tempfile.mkdtemp(prefix="gpuqueue-cog-"))
        env = {
            **os.environ,
            "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "COG_PREDICT_TYPE_STUB": self._predictor,
            "PORT": str(self._port),
            "TMPDIR": str(self._tmp),
            "PYTHONUNBUFFERED": "1",
            **self._extra_env,
        }
        # The dev venv's own settings must not leak into the Cog venv's interpreter.
        for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
            if name not in self._extra_env:
                env.pop(name, None)
        self._process = subprocess.Popen(
            [str(python), "-m", "cog.server.http", "--host", HOST],
            cwd=self._model_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the worker too
        )
        self._reader = threading.Thread(
            target=self._read_output, name=f"cog-{self._port}-log", daemon=True
        )
        self._reader.start()
        try:
            self.wait_status({"READY"}, timeout=timeout)
        except CogServerError:
            self.stop()
            raise

    def _read_output(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        for raw in self._process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self._lines.append(line)
            if self._log is not None:
                self._log(line)

    def health(self) -> dict[str, Any]:
        """`GET /health-check`'s body (always HTTP 200 on Cog; the state is in `status`)."""
        answer = requests.get(f"{self.url}/health-check", timeout=2)
        body: dict[str, Any] = answer.json()
        return body

    def status(self) -> str | None:
        """The server's state (READY, BUSY, STARTING, SETUP_FAILED...), None if unreachable."""
        try:
            return str(self.health().get("status"))
        except (requests.RequestException, ValueError):
            return None

    def wait_status(self, wanted: set[str], *, timeout: float) -> str:
        """Wait until the server's state is one of `wanted`; raise CogServerError if the
        process dies, setup fails, or the deadline passes."""
        deadline = time.monotonic() + timeout
        last: str | None = None
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                raise CogServerError(
                    f"the Cog server exited with {self._process.returncode}: "
                    + " | ".join(self.recent_logs()[-10:])
                )
            last = self.status()
            if last in wanted:
                return last
            if last in {"SETUP_FAILED", "DEFUNCT"} and not wanted & {last}:
                raise CogServerError(f"the Cog server is {last}: {self._setup_logs()}")
            time.sleep(_POLL_S)
        raise CogServerError(
            f"the Cog server at {self.url} was {last} after {timeout:.0f}s, not "
            f"{' or '.join(sorted(wanted))}: " + " | ".join(self.recent_logs()[-10:])
        )

    def _setup_logs(self) -> str:
        try:
            return str(self.health().get("setup", {}).get("logs", ""))[-2000:]
        except (requests.RequestException, ValueError):
            return ""

    def stop(self) -> None:
        """SIGTERM the process group (coglet shuts down gracefully), SIGKILL it if it lingers."""
        if self._stopped:
            return
        self._stopped = True
        process = self._process
        if process is not None and process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT_S)
        if process is not None:
            # The worker may outlive coglet's main process for a moment: end the group.
            self._signal_group(process, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT_S)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(process.pid, sig)

    def __enter__(self) -> Self:
        if self._process is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def readable_log_line(line: str) -> str:
    """One of coglet's JSON log lines as `LEVEL message prediction_id=...` (else as is)."""
    try:
        record = json.loads(line)
        fields = record["fields"]
        message = str(fields["message"])
    except (ValueError, KeyError, TypeError):
        return line
    extra = " ".join(f"{k}={fields[k]}" for k in ("prediction_id", "error") if k in fields)
    return f"{record.get('level', 'INFO'):<7} {message} {extra}".rstrip()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the real Cog server with the fake model.")
    parser.add_argument("--port", type=int, default=0, help="0 = a free port")
    parser.add_argument("--step-delay", type=float, default=None, help="seconds per step")
    args = parser.parse_args(argv)
    server = CogServer(port=args.port, step_delay_s=args.step_delay)
    server.start()
    print(json.dumps({"url": server.url, "status": server.status()}), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
