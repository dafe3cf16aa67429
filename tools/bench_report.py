"""`make bench`: every figure in one run, written to docs/benchmarks.md and docs/cost.md.

1. AWS requests per task by service and phase, submit and status handler latency, and our
   time against the time of our own AWS calls (bench_requests.py, in-process on moto);
2. cold import time of each function module (bench_imports.py);
3. fleet efficiency per dispatch strategy on the local stack (bench_fleet.py; skipped with
   --no-fleet).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import bench_fleet  # noqa: E402
import bench_imports  # noqa: E402
import bench_requests  # noqa: E402
import cost_model  # noqa: E402
from local_run import machine, use_local_aws  # noqa: E402

# Requests our code makes per image task before any status poll; the target is <= 8.
TARGET_REQUESTS = 8
BILLED_SERVICES = ("dynamodb", "sqs", "s3", "secretsmanager")


def _fleet_and_requests(
    fleet_tasks: int, tasks: int, latency_calls: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fleet runs (bench_fleet.py, a process of its own) and the request counts: the
    counts run beside the fleet's last run, the killed-endpoint one (it counts failures, not
    time; the counts are counts), and the handler latencies after it, on an idle machine."""
    fleet_done = threading.Event()
    figures: dict[str, Any] = {}

    def count_requests() -> None:
        try:
            figures["requests"] = bench_requests.measure(
                tasks, latency_calls, before_latency=fleet_done.wait
            )
        except BaseException as error:  # re-raised by the main thread
            figures["error"] = error

    counting = threading.Thread(target=count_requests, name="request-counts")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "fleet.json"
        command = [
            sys.executable,
            str(REPO / "tools" / "bench_fleet.py"),
            "--tasks",
            str(fleet_tasks),
            "--json",
            str(out),
        ]
        with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as fleet_run:
            assert fleet_run.stdout is not None
            for line in fleet_run.stdout:
                print(line, end="", flush=True)
                if line.strip() == bench_fleet.KILLED_RUN_STARTS and counting.ident is None:
                    counting.start()
            fleet_run.wait(timeout=1800)
        fleet_done.set()
        if counting.ident is None:  # the fleet never reached its last run
            counting.start()
        counting.join()
        fleet = dict(json.loads(out.read_text())) if out.exists() else {}
    if "error" in figures:
        raise figures["error"]
    return fleet, figures["requests"]


def _requests_table(requests: dict[str, Any]) -> tuple[str, float]:
    rows = []
    before_polls = 0.0
    for phase in ("submit", "dispatch", "task_events", "status_poll", "webhook"):
        ops = requests["requests_per_task"].get(phase, {})
        billed = sum(n for op, n in ops.items() if op.split(":")[0] in BILLED_SERVICES)
        if phase in ("submit", "dispatch", "task_events"):
            before_polls += billed
        detail = ", ".join(f"{op} {n:g}" for op, n in ops.items())
        rows.append(f"| {phase} | {billed:g} | {detail} |")
    return "\n".join(rows), before_polls


def _load_table(requests: dict[str, Any]) -> tuple[str, float]:
    load = requests.get("under_load")
    if not load:
        return "", 0.0
    rows = []
    total = 0.0
    for phase, ops in load["requests_per_task"].items():
        billed = sum(n for op, n in ops.items() if op.split(":")[0] in BILLED_SERVICES)
        total += billed
        detail = ", ".join(f"{op} {n:g}" for op, n in ops.items())
        rows.append(f"| {phase} | {billed:g} | {detail} |")
    mapping = load["mapping_requests_per_task"]
    total += mapping
    rows.append(
        f"| the event source mapping | {mapping:g} | sqs:ReceiveMessage + sqs:DeleteMessage for "
        f"each of the {load['invocations']} messages it delivered |"
    )
    return "\n".join(rows), round(total, 2)


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _latency_row(label: str, figures: dict[str, float]) -> str:
    return (
        f"| {label} | {figures['p50_ms']} | {figures['p95_ms']} | {figures['p99_ms']} | "
        f"{figures['our_ms_per_call']} | {figures['aws_ms_per_call']} | "
        f"{figures['aws_share']:.0%} |"
    )


# Requests per task under load before this protocol's last changes (`make bench`,
# 2026-12-07 03:57), kept beside the new ones.
PREVIOUS_REQUESTS = (
    "Before (2026-12-07 03:57, one zero-latency stand-in of one slot): 10.72 (submit 5, "
    "dispatch 5.6, the stream 0.1, the mapping 0.02); when issue 16 was filed, 20.5 a task "
    "one at a time with the mapping's."
)

# The figures before issue 16's dispatch protocol (the waiting path: a freed slot's next
# task polled for it), from `make bench` on 2026-12-06 and issue 4's last run, kept beside
# the new ones.
PREVIOUS_FLEET = """Before the one-step hand-off (`make bench`, 2026-12-06): least-loaded
48.2 s on the default scenario, 1.095 x optimal (issue 4: 53.8 s, 1.22 x); the second fleet
(3, 6, 9) s at 100 tasks 45.8 s, 1.090 x; the default scenario at 300 tasks 142.7 s, 1.081 x;
round-robin 1.155 x, weighted 1.157 x, user-hash 1.538 x. `make bench` took 11.4 min with
every strategy compared; it now compares them with `BENCH_STRATEGIES=all`."""

FLEET_HEADER = (
    "| run | done | failed | makespan s | optimal s | makespan / optimal | tasks/s | efficiency"
    " | queue wait p50 / p95 s | peak in-flight | GPU calls per billed dispatcher second"
    " | every slot busy after s | hand-off gap p50 / p95 ms |"
    "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _blank(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def benchmarks_markdown(
    requests: dict[str, Any],
    imports: bench_imports.ImportTimes,
    fleet_run: dict[str, Any],
    date: str,
    seconds: float | None = None,
) -> str:
    fleet: list[dict[str, Any]] = fleet_run.get("runs", [])
    table, before_polls = _requests_table(requests)
    load_table, load_total = _load_table(requests)
    load = requests.get("under_load") or {}
    load_verdict = "meets" if load_total <= TARGET_REQUESTS else "misses"
    load_part = (
        f"{load.get('tasks')} tasks queued at once on the fleet bench's fleet (3 zero-latency "
        "stand-ins x 4 slots), then dispatched as the event source mapping would (one message "
        "per invocation; its workers take the rest themselves, one receive for the workers "
        "due together, the slot's lease written only when readers would misjudge it); "
        f"{load.get('done')} DONE.\n\n| phase | billed requests | by operation |\n"
        f"|---|---|---|\n{load_table}\n\n**{load_total:g} billed requests per image task "
        f"under load, the mapping's included; the target is {TARGET_REQUESTS}: this "
        f"{load_verdict} it.** {PREVIOUS_REQUESTS}"
        if load_table
        else "Not measured."
    )
    verdict = "meets" if before_polls <= TARGET_REQUESTS else "misses"
    imports_rows = "\n".join(
        f"| {name} | {ms} | {imports.ratio(name):.2f} |"
        for name, ms in sorted(imports.functions.items())
    )
    imports_verdict = "meets" if imports.worst_ratio <= bench_imports.TARGET_RATIO else "misses"
    floor_rows = "".join(
        f"\n| *the libraries alone, {name}* | | {ratio:.2f} |"
        for name, ratio in sorted(imports.floors.items())
    )
    fleet_rows = "\n".join(
        f"| {r['label']} | {r['done']}/{r['tasks']} | {r['failed']} | {r['makespan_s']:.1f} | "
        f"{r.get('optimal_makespan_s') or ''} | {_ratio(r.get('makespan_ratio'))} | "
        f"{r['throughput']:.2f} | {_percent(r.get('efficiency'))} | "
        f"{r['wait_p50_s']:.1f} / {r['wait_p95_s']:.1f} | {r['max_in_flight']} | "
        f"{_ratio(r.get('calls_per_billed_second'))} | {_blank(r.get('all_busy_after_s'))} | "
        f"{_blank(r.get('handoff_gap_p50_ms'))} / {_blank(r.get('handoff_gap_p95_ms'))} |"
        for r in fleet
    )
    memory = fleet_run.get("dispatcher_max_memory_mb")
    fleet_part = (
        f"{FLEET_HEADER}\n{fleet_rows}\n\n{PREVIOUS_FLEET}\n\n"
        "Optimal makespan: the least T with sum(capacity * floor(T / latency)) >= tasks (every "
        "slot busy from the start, no gap); the target is makespan <= 1.05 x optimal. Where "
        "the rest went: the time until every slot had its first call (the burst's start: "
        "moto's latency under the whole burst at once), and the idle time between a call's "
        "end and the next call on an endpoint (the hand-off). "
        f"Dispatcher Max Memory Used (the largest of any invocation, as Lambda reports it): "
        f"{memory} MB."
        if fleet
        else "Not run this time (`make bench` without `BENCH_FLEET=0` runs it)."
    )
    took = f", in {seconds / 60:.1f} min (the target is 6)" if seconds else ""
    return f"""# Benchmarks

Written by `make bench` on {date}, on {machine()}{took}. Figures from moto and the local stack
on this machine: compare them with each other and over time, not with AWS's latencies.

## AWS requests per image task

Counted with a botocore `before-call` hook on the handlers' clients, {requests["tasks"]}
tasks ({requests["webhook_tasks"]} with a webhook; {requests["webhooks_received"]} deliveries
received). Billed = DynamoDB, SQS, S3 and Secrets Manager requests our code makes; the
event source mapping's own receive and delete (2 SQS requests per message) come on top
(docs/cost.md counts them).

| phase | billed requests | by operation |
|---|---|---|
{table}

**{before_polls:g} billed requests per image task before polls; the target is
{TARGET_REQUESTS}: this {verdict} it.** Beyond the seed's minimum (task write, send, read,
claim, image, complete: 6) come the features: the rate limit and the per-user share (1
write on submit, the token and the share on one row; 1 on release), the queue position
ticket, which is also the exact queue-capacity bound, and the departure (1 write each, 1
read), the GPU slot lease and release (2 writes, 1 fleet read: a strongly consistent scan
of the small endpoints table, one page; a slot kept across calls writes its lease only now
and then), the push-connections lookup (1 query), the stats' last-hour outcome counter (1
write). Each is one request; no table of tasks or users is ever scanned. The stream's
writes (releases, departures, counters, push lookups) are per batch, not per task: one at
a time they cost a task each, under load a fraction.

### Under load

{load_part}

## Handler latency (in-process, moto)

| call | p50 ms | p95 ms | p99 ms | our ms / call | AWS calls ms / call | AWS share |
|---|---|---|---|---|---|---|
{_latency_row("submit", requests["submit_latency"])}
{_latency_row("status", requests["status_latency"])}

"Our ms" is the handler's wall time minus the time inside its own AWS calls (validation,
Powertools, serialisation). Latency over HTTP on the local stack, under 50 concurrent
clients: [load.md](load.md) (`make load`).

## Cold import per function

`python -X importtime`, cumulative for `<name>_handler`, median of 3 fresh interpreters with
Lambda's `LAMBDA_TASK_ROOT` (tracing on, as deployed), the layer and the function compiled to
bytecode as `make build` ships them (Lambda's code is read-only: without it every cold start
compiles them again); `import boto3` alone is measured the
same way right before each (median {imports.boto3_ms} ms) and a function's ratio is the median
of its ratios to that import, so the machine's load moves both sides:

| function | import ms | x boto3 |
|---|---|---|
{imports_rows}{floor_rows}

**Worst: {imports.worst_ratio:.2f} x `import boto3`; the target is
{bench_imports.TARGET_RATIO} x: this {imports_verdict} it.** The last rows are the libraries
every function stands on, imported on their own with none of our code (boto3,
pydantic-settings, Powertools' logger, metrics and tracer, and its event handler with OpenAPI
validation for the HTTP functions or its batch processor for the event-driven ones,
`bench_imports.FLOORS`): what every function imports before a line of ours. Medians of three
are noisy here (a function a little under its floor is that noise); the CPU-time check in
issue 18's note agrees: the libraries alone take 2.2-2.5 x boto3.

## Fleet efficiency per dispatch strategy

{fleet_part}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--latency-calls", type=int, default=50)
    parser.add_argument(
        "--fleet-tasks", type=int, default=int(os.environ.get("BENCH_TASKS", "100"))
    )
    parser.add_argument("--no-fleet", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    use_local_aws()
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    began = time.monotonic()
    imports = bench_imports.measure(repeat=3)
    print(json.dumps({"cold_import": imports.as_json()}, indent=2), flush=True)
    if args.no_fleet:
        fleet: dict[str, Any] = {}
        requests = bench_requests.measure(args.tasks, args.latency_calls)
    else:
        fleet, requests = _fleet_and_requests(args.fleet_tasks, args.tasks, args.latency_calls)
    print(json.dumps(requests, indent=2), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.md").write_text(
        benchmarks_markdown(requests, imports, fleet, date, time.monotonic() - began)
    )
    least_loaded = next(
        (r for r in fleet.get("runs", []) if r.get("label") == "least-loaded"), None
    )
    (args.out / "cost.md").write_text(
        cost_model.markdown(
            requests,
            date=date,
            calls_per_billed_second=(least_loaded or {}).get("calls_per_billed_second"),
            dispatcher_max_memory_mb=fleet.get("dispatcher_max_memory_mb"),
        )
    )
    print(f"wrote {args.out / 'benchmarks.md'} and {args.out / 'cost.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
