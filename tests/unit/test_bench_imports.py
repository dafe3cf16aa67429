"""The cold import bench's verdict: every function against `import boto3` alone."""

from __future__ import annotations

from bench_imports import ImportTimes


def test_each_function_is_reported_against_boto3_and_the_worst_decides():
    times = ImportTimes(boto3_ms=120.0, functions={"docs": 150.0, "submit": 200.0})
    assert times.ratio("docs") == 1.25
    assert times.worst_ratio == 1.67
    assert times.as_json() == {
        "boto3_ms": 120.0,
        "functions": {"docs": {"ms": 150.0, "ratio": 1.25}, "submit": {"ms": 200.0, "ratio": 1.67}},
        "worst_ratio": 1.67,
        "target_ratio": 1.5,
    }
