"""Cold import time of each function's handler module (part of `make bench`).

A Lambda cold start pays for importing the handler and everything it pulls in. Each module
is imported in a fresh interpreter with `python -X importtime`, on the path the function
has in Lambda (its folder and the layer); the figure is the module's cumulative import
time as Python reports it, the median of `--repeat` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_LINE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(\S+)")


def import_microseconds(function_dir: Path) -> int:
    """Cumulative microseconds to import `<name>_handler` in a fresh interpreter."""
    module = f"{function_dir.name}_handler"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(function_dir), str(REPO / "layers" / "common")]),
        "AWS_DEFAULT_REGION": "us-east-1",
        "POWERTOOLS_SERVICE_NAME": "gpuqueue",
    }
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for match in _LINE.finditer(done.stderr):
        if match.group(3) == module:
            return int(match.group(2))
    raise RuntimeError(f"no import time reported for {module}")


def measure(repeat: int) -> dict[str, float]:
    """Median cold import time in milliseconds, per function folder."""
    figures = {}
    for function_dir in sorted(p for p in (REPO / "functions").iterdir() if p.is_dir()):
        if not (function_dir / f"{function_dir.name}_handler.py").exists():
            continue
        samples = [import_microseconds(function_dir) for _ in range(repeat)]
        figures[function_dir.name] = round(statistics.median(samples) / 1000, 1)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
