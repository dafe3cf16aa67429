"""`make bench`'s pieces on a tiny run: the request counts it reports are real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cost_model
from bench_imports import ImportTimes
from bench_report import benchmarks_markdown

REPO = Path(__file__).resolve().parents[2]


def test_request_bench_counts_each_phase_and_scans_only_the_fleet(tmp_path):
    out = tmp_path / "requests.json"
    subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "bench_requests.py"),
            "--tasks",
            "2",
            "--latency-calls",
            "3",
            "--load-tasks",
            "4",
            "--json",
            str(out),
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )
    figures = json.loads(out.read_text())
    phases = figures["requests_per_task"]
    assert phases["submit"]["dynamodb:PutItem"] == 1.0
    assert phases["submit"]["sqs:SendMessage"] == 1.0
    assert phases["dispatch"]["s3:PutObject"] == 1.0
    assert phases["status_poll"] == {"dynamodb:GetItem": 1.0}
    assert figures["webhooks_received"] == figures["webhook_tasks"] == 1
    # No table of tasks or users is ever scanned: only the dispatcher scans, for its
    # consistent read of the fleet (the endpoints table's few rows).
    for phase, ops in phases.items():
        if phase != "dispatch":
            assert not any(op.endswith(":Scan") for op in ops), phase
    for call in ("submit_latency", "status_latency"):
        latency = figures[call]
        assert 0 < latency["p50_ms"] <= latency["p99_ms"]
        assert 0 <= latency["aws_share"] <= 1

    # Under load: every task done by one invocation, none read before its claim (the claim
    # returns it): not the tasks a worker takes after its call, nor each worker's first.
    load = figures["under_load"]
    assert (load["tasks"], load["done"], load["invocations"]) == (4, 4, 1)
    assert load["mapping_requests_per_task"] == 0.5
    assert "dynamodb:GetItem" not in load["requests_per_task"]["dispatch"]
    assert load["requests_per_task"]["dispatch"]["s3:PutObject"] == 1.0

    imports = ImportTimes(boto3_ms=350.0, functions={"submit": 700.0}, ratios={"submit": 2.0})
    report = benchmarks_markdown(figures, imports, {}, "today")
    assert "billed requests per image task under load" in report
    assert "| submit | 700.0 | 2.00 |" in report
    assert "Worst: 2.00 x `import boto3`; the target is\n1.5 x: this misses it." in report
    # Billed requests of the submit phase, as counted: the rate token and the share (one
    # write), the lane's ticket (which is the capacity bound), the task row, the message.
    assert "| submit | 4 |" in report
    cost = cost_model.per_million(figures)
    shared = cost_model.per_million(figures, calls_per_billed_second=4.0)
    waiting = [line.dollars_per_million for line in cost["lines"] if "GB-s" in line.what]
    waiting_shared = [line.dollars_per_million for line in shared["lines"] if "GB-s" in line.what]
    # Four calls per billed second: the dispatcher's wait (most of the line) costs a quarter.
    assert waiting[0] / 4 < waiting_shared[0] < waiting[0] / 3
    assert cost["total"] > 0
    assert 0 < cost["share_of_gpu"] < 1
    assert cost["seed_polling"] > cost["webhook"] > cost["push"]


def test_progress_costs_its_writes_records_and_pushes_and_batching_shrinks_the_records() -> None:
    quiet = cost_model.progress_cost()
    busy = cost_model.progress_cost({"under_load": {"stream_invocations_per_task": 0.02}})

    # A 12 s generation, one write per 2 s: six writes, six records, six pushes.
    assert quiet["writes"] == 6
    assert quiet["stream_quiet"] == busy["stream_quiet"] > busy["stream_busy"] * 50
    assert quiet["dynamodb"] > quiet["push"] > quiet["query"]
    assert "| **quiet, one client watching** |" in cost_model.progress_markdown()
