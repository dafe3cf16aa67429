"""The cold import bench's verdict: every function against `import boto3` alone."""

from __future__ import annotations

from pathlib import Path

import pytest

import bench_imports
from bench_imports import ImportTimes


def test_each_function_is_reported_against_boto3_and_the_worst_decides():
    times = ImportTimes(
        boto3_ms=120.0,
        functions={"docs": 150.0, "submit": 200.0},
        ratios={"docs": 1.25, "submit": 1.67},
    )
    assert times.worst_ratio == 1.67
    assert times.as_json() == {
        "boto3_ms": 120.0,
        "functions": {"docs": {"ms": 150.0, "ratio": 1.25}, "submit": {"ms": 200.0, "ratio": 1.67}},
        "worst_ratio": 1.67,
        "target_ratio": 1.5,
        "library_floors": {},
    }


def test_a_function_is_compared_with_the_boto3_import_next_to_it(monkeypatch, tmp_path):
    # The machine slows down threefold now and then, for a pair at a time (its other work):
    # the ratios stay what they are, the medians too.
    for name in ("docs", "submit"):
        (tmp_path / "functions" / name).mkdir(parents=True)
        (tmp_path / "functions" / name / f"{name}_handler.py").write_text("")
    (tmp_path / "layers" / "common" / "gpuqueue").mkdir(parents=True)
    (tmp_path / "layers" / "common" / "gpuqueue" / "models.py").write_text("X = 1\n")
    monkeypatch.setattr(bench_imports, "REPO", tmp_path)
    # Each round: docs, submit, then the two library floors, each after its own boto3 import.
    speed = iter([1, 1, 3, 3, 1, 1, 3, 3, 1, 1, 1, 1, 3, 3, 1, 1, 3, 3, 1, 1, 1, 1, 1, 1])
    microseconds = {
        "boto3": 100_000,
        "docs_handler": 120_000,
        "submit_handler": 200_000,
        "floor_events": 150_000,
        "floor_http": 180_000,
    }

    def fake_import(module: str, path: list[Path], lambda_env: dict[str, str]) -> int:
        if path == [Path(lambda_env["LAMBDA_TASK_ROOT"])]:
            # The floors (and their boto3): the libraries alone, no layer, no function folder.
            if module != "boto3":
                assert (path[0] / f"{module}.py").read_text() == bench_imports.FLOORS[module[6:]]
        else:
            # The function and the layer as the build ships them: copies, compiled.
            function_dir, layer = (path if module.endswith("_handler") else [None, *path])[-2:]
            assert layer.name == "layer"
            assert list((layer / "gpuqueue" / "__pycache__").glob("models.*.pyc"))
            if function_dir is not None:
                assert function_dir != tmp_path / "functions" / function_dir.name
                assert list((function_dir / "__pycache__").glob(f"{module}.*.pyc"))
                assert lambda_env["LAMBDA_TASK_ROOT"] == str(function_dir)
        return microseconds[module] * next(speed)

    monkeypatch.setattr(bench_imports, "import_microseconds", fake_import)
    times = bench_imports.measure(repeat=3)
    assert times.ratios == {"docs": 1.2, "submit": 2.0}
    assert times.functions == {"docs": 120.0, "submit": 200.0}
    assert times.boto3_ms == 100.0
    assert times.worst_ratio == 2.0
    assert times.floors == {"http": 1.8, "events": 1.5}
    with pytest.raises(KeyError):
        times.ratio("checker")
