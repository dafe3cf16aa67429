"""What every stand-in server does the same way: serve in a background thread, stop
cleanly (waking hanging handlers first), and take knob changes from tests."""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from http.server import ThreadingHTTPServer
from typing import Generic, Self, TypeVar

from gpuqueue_local.standins.fault_knobs import FaultKnobs, validate_knob

K = TypeVar("K", bound=FaultKnobs)


class BackgroundServer(Generic[K]):
    """Subclasses set `knobs`, `_httpd`, `_host` and call `_init_serving()` in `__init__`."""

    knobs: K
    _httpd: ThreadingHTTPServer
    _host: str
    name = "stand-in"

    def _init_serving(self) -> None:
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._rng_seed = self.knobs.failure_seed
        self._rng = random.Random(self._rng_seed)
        self._refused = 0  # calls answered 401 (the credential knob)

    def _record_refused(self) -> None:
        with self._lock:
            self._refused += 1

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self.port}"

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _before_start(self) -> None:
        """A hook run just before serving starts (e.g. warm a model in the background)."""

    def start(self) -> None:
        """Serve in a background daemon thread."""
        if self._thread is not None or self._stopped:
            raise RuntimeError(f"{type(self).__name__} can only be started once")
        self._before_start()
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # so shutdown() returns quickly
            name=f"{self.name}-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; wakes hanging/sleeping handlers first so nothing blocks. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._stop_event.set()
        if self._thread is not None:
            # shutdown() blocks until serve_forever exits; only call it if that loop runs.
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> Self:
        if self._thread is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def set_knobs(self, changes: Mapping[str, object]) -> K:
        """Validate and apply a subset of knobs (all-or-nothing); returns the knobs."""
        validated = {name: validate_knob(name, value) for name, value in changes.items()}
        with self._lock:
            for name, value in validated.items():
                setattr(self.knobs, name, value)
            if "failure_seed" in validated:
                # Re-seed even if unchanged so a test can restart a known failure sequence.
                self._rng_seed = self.knobs.failure_seed
                self._rng = random.Random(self._rng_seed)
        return self.knobs
