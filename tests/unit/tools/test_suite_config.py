"""The suite's own configuration does what the team relies on: run as `make test` runs it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def _run_with_the_suites_config(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_sample.py").write_text(textwrap.dedent(source))
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(tmp_path),
            "-p",
            "no:xdist",
            "-q",
            str(tmp_path / "test_sample.py"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_an_exception_in_a_tests_thread_fails_that_test(tmp_path):
    run = _run_with_the_suites_config(
        tmp_path,
        """
        import threading

        def test_a_worker_thread_crashes():
            def work():
                raise RuntimeError("the dispatcher crashed")
            worker = threading.Thread(target=work)
            worker.start()
            worker.join()

        def test_a_quiet_thread():
            worker = threading.Thread(target=lambda: None)
            worker.start()
            worker.join()
        """,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 passed" in run.stdout, run.stdout
    assert "the dispatcher crashed" in run.stdout
