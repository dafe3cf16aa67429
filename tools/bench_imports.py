"""Cold import time of each function's handler module against `import boto3` alone (part of
`make bench`).

A Lambda cold start pays for importing the handler and everything it pulls in. Each module
is imported in a fresh interpreter with `python -X importtime`, on the path the function
has in Lambda (its folder and the layer) and with the environment Lambda gives it as far as
imports read it (`LAMBDA_TASK_ROOT`: Powertools' tracer is on there, as in the deployed
functions, and patches the libraries X-Ray traces); the figure is the module's cumulative
import time as Python reports it, the median of `--repeat` runs. `import boto3` alone,
which every function needs, is measured the same way right before each handler: a
function's ratio is the median of its ratios to the boto3 import next to it, so a machine
slowing down (other work on it) moves both sides. The ratio is what the target (<= 1.5 for
every function) is about; the milliseconds move with the machine.

The layer and each function are measured as the build ships them: copied and compiled to
bytecode (tools/build_artifacts.py compiles with the runtime's Python; Lambda's code is
read-only, so without it every cold start would compile them again). The libraries come from
the dev venv, compiled at install.

The libraries every function stands on are measured the same way on their own, with none of
our code (`FLOORS`): boto3, pydantic-settings, Powertools' logger, metrics and tracer (patching
what ours patch), and Powertools' event handler with its OpenAPI validation (the HTTP
functions) or its batch processor (the event-driven ones). That is the floor a function's
ratio cannot go under while it is built on them.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import py_compile
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASELINE = "boto3"
TARGET_RATIO = 1.5
# What every function imports before any code of ours, as the module a floor is measured as.
_OBSERVED = (
    "import boto3, pydantic_settings\n"
    "from aws_lambda_powertools import Logger, Metrics, Tracer\n"
    "Logger(); Metrics(); Tracer(patch_modules=('botocore', 'requests'))\n"
)
FLOORS = {
    "http": _OBSERVED + "import aws_lambda_powertools.event_handler.openapi.params\n",
    "events": _OBSERVED + "import aws_lambda_powertools.utilities.batch\n",
}
_LINE = re.compile(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|\s*(\S+)")


@dataclass(frozen=True)
class ImportTimes:
    """Median cumulative import times in milliseconds."""

    boto3_ms: float
    functions: dict[str, float]
    # Median of each function's ratio to the boto3 import measured right before it.
    ratios: dict[str, float]
    # The libraries alone (FLOORS): the ratio no function built on them can go under.
    floors: dict[str, float] = field(default_factory=dict)

    def ratio(self, function: str) -> float:
        return self.ratios[function]

    @property
    def worst_ratio(self) -> float:
        return max(self.ratio(name) for name in self.functions)

    def as_json(self) -> dict[str, Any]:
        return {
            "boto3_ms": self.boto3_ms,
            "functions": {
                name: {"ms": ms, "ratio": self.ratio(name)}
                for name, ms in sorted(self.functions.items())
            },
            "worst_ratio": self.worst_ratio,
            "target_ratio": TARGET_RATIO,
            "library_floors": dict(sorted(self.floors.items())),
        }


def import_microseconds(module: str, path: list[Path], lambda_env: dict[str, str]) -> int:
    """Cumulative microseconds to import `module` in a fresh interpreter."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(p) for p in path),
        "AWS_DEFAULT_REGION": "us-east-1",
        "POWERTOOLS_SERVICE_NAME": "gpuqueue",
        **lambda_env,
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


def function_dirs() -> list[Path]:
    return sorted(
        p
        for p in (REPO / "functions").iterdir()
        if p.is_dir() and (p / f"{p.name}_handler.py").exists()
    )


def lambda_env(function_dir: Path) -> dict[str, str]:
    return {"LAMBDA_TASK_ROOT": str(function_dir), "AWS_LAMBDA_FUNCTION_NAME": function_dir.name}


def compiled_copy(source: Path, destination: Path) -> Path:
    """`source` copied without its caches and compiled as the build compiles it."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    invalidation = py_compile.PycInvalidationMode.UNCHECKED_HASH
    if not compileall.compile_dir(destination, quiet=1, invalidation_mode=invalidation):
        raise RuntimeError(f"compiling {source} failed")
    return destination


def measure(repeat: int) -> ImportTimes:
    """Median cold import times of `import boto3` and of every function's handler, and the
    libraries' floors' ratios."""
    sources = function_dirs()
    baseline: list[int] = []
    samples: dict[str, list[int]] = {d.name: [] for d in sources}
    ratios: dict[str, list[float]] = {d.name: [] for d in sources}
    floor_ratios: dict[str, list[float]] = {name: [] for name in FLOORS}
    with tempfile.TemporaryDirectory() as scratch:
        built = Path(scratch) / "built"
        layer = compiled_copy(REPO / "layers" / "common", built / "layer")
        dirs = [compiled_copy(d, built / "functions" / d.name) for d in sources]
        floor_dir = Path(scratch) / "floors"
        floor_dir.mkdir()
        for name, code in FLOORS.items():
            (floor_dir / f"floor_{name}.py").write_text(code)
        floor_env = {"LAMBDA_TASK_ROOT": str(floor_dir), "AWS_LAMBDA_FUNCTION_NAME": "floor"}
        for _ in range(repeat):
            for d in dirs:
                boto3_us = import_microseconds(BASELINE, [layer], lambda_env(d))
                handler_us = import_microseconds(f"{d.name}_handler", [d, layer], lambda_env(d))
                baseline.append(boto3_us)
                samples[d.name].append(handler_us)
                ratios[d.name].append(handler_us / boto3_us)
            for name in FLOORS:
                boto3_us = import_microseconds(BASELINE, [floor_dir], floor_env)
                floor_us = import_microseconds(f"floor_{name}", [floor_dir], floor_env)
                floor_ratios[name].append(floor_us / boto3_us)
    return ImportTimes(
        boto3_ms=round(statistics.median(baseline) / 1000, 1),
        functions={name: round(statistics.median(s) / 1000, 1) for name, s in samples.items()},
        ratios={name: round(statistics.median(r), 2) for name, r in ratios.items()},
        floors={name: round(statistics.median(r), 2) for name, r in floor_ratios.items()},
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.repeat).as_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
