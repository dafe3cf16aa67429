"""Fault suite (`make chaos`): N tasks through a fleet that misbehaves in every way at once.

On an in-process local stack with three stand-in image endpoints (2 registered slots each):

- endpoint 0 answers 500 to 10 % of calls (seeded);
- endpoint 1 is killed (its process gone, the port refusing) once 30 % of tasks ended;
- endpoint 2 hangs every call past the task timeout;
- the dispatcher's workers are killed mid-invocation (abrupt process exit, as a Lambda
  runtime crash) several times during the run.

Then it checks what a user and an operator must be able to rely on:

- every task ends DONE, or FAILED with its error recorded: none stuck, none lost;
- every DONE task has exactly one image object (a repeated run overwrites, never adds);
- no task had more GPU calls than MaxAttempts;
- every message left in a dead-letter queue belongs to a task that ended;
- no endpoint ever had more calls in flight than its registered slots.

Bounded: N tasks and a deadline. Prints the figures, writes them as JSON with --json, and
exits 1 if any check fails. `make test` runs a small size (tests/e2e/test_chaos.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "local"))
sys.path.insert(0, str(REPO / "layers" / "common"))

from gpuqueue.fleet.endpoint_registry import EndpointRegistry  # noqa: E402
from gpuqueue.models import TaskKind  # noqa: E402
from gpuqueue.store.image_store import result_key  # noqa: E402
from gpuqueue_local.stack import RunningStack, StackOptions, start_stack  # noqa: E402
from local_run import (  # noqa: E402
    machine,
    read_tasks,
    register_users,
    submit_image,
    use_local_aws,
)

SLOTS = 2  # registered per endpoint
MAX_ATTEMPTS = 3
# Below the template's minimum (10 s) through the function's environment, as the local
# stack compresses its other clocks: a hung call costs 3 s of a slot, not 10.
TASK_TIMEOUT_SECONDS = 3
LATENCY_SECONDS = 0.3
FAILURE_RATE = 0.1
KILL_ENDPOINT_AT = 0.3  # share of tasks ended when endpoint 1 is killed
CRASH_DISPATCHER_AT = (0.15, 0.4, 0.65)  # shares of tasks ended at each dispatcher crash
USERS = 4
SUBMITTERS = 4
FINAL = ("DONE", "FAILED", "CANCELED", "EXPIRED")


@dataclass
class ChaosReport:
    tasks: int
    seconds: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    stuck: list[str] = field(default_factory=list)
    failed_without_error: list[str] = field(default_factory=list)
    done_without_one_image: list[str] = field(default_factory=list)
    over_max_attempts: dict[str, int] = field(default_factory=dict)
    gpu_calls: int = 0
    max_calls_per_task: int = 0
    dispatcher_crashes: int = 0
    workers_killed: int = 0
    endpoint_killed: bool = False
    max_in_flight: list[int] = field(default_factory=list)
    dead_letters: int = 0
    dead_letters_unaccounted: list[str] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        found = []
        if self.stuck:
            found.append(f"{len(self.stuck)} tasks not ended")
        if self.failed_without_error:
            found.append(f"{len(self.failed_without_error)} FAILED tasks without an error")
        if self.done_without_one_image:
            found.append(f"{len(self.done_without_one_image)} DONE tasks without one image")
        if self.over_max_attempts:
            found.append(f"{len(self.over_max_attempts)} tasks past {MAX_ATTEMPTS} GPU calls")
        if self.dead_letters_unaccounted:
            found.append(f"{len(self.dead_letters_unaccounted)} dead letters for open tasks")
        if any(peak > SLOTS for peak in self.max_in_flight):
            found.append(f"an endpoint above its {SLOTS} slots: {self.max_in_flight}")
        if self.dispatcher_crashes < len(CRASH_DISPATCHER_AT) or not self.endpoint_killed:
            found.append("not every fault was injected")
        return found

    def lines(self) -> list[str]:
        return [
            f"tasks {self.tasks} in {self.seconds:.0f} s: {self.statuses}",
            f"faults: 10% 500s on endpoint 0, endpoint 1 killed: {self.endpoint_killed}, "
            f"endpoint 2 hangs past {TASK_TIMEOUT_SECONDS} s, dispatcher crashed "
            f"{self.dispatcher_crashes}x ({self.workers_killed} workers killed)",
            f"GPU calls {self.gpu_calls} ({self.gpu_calls / max(1, self.tasks):.2f} per task, "
            f"at most {self.max_calls_per_task} for one task; limit {MAX_ATTEMPTS})",
            f"peak calls in flight per endpoint {self.max_in_flight} (slots {SLOTS} each)",
            f"dead letters {self.dead_letters}, unaccounted {len(self.dead_letters_unaccounted)}",
            f"errors recorded: {self.errors}",
            "result: " + ("PASS" if not self.failures else "FAIL - " + "; ".join(self.failures)),
        ]


def start_chaos_stack(tasks: int) -> RunningStack:
    return start_stack(
        StackOptions(
            port=0,
            image_servers=3,
            image_latency_s=LATENCY_SECONDS,
            # Checker and reaper every 3 s, health stale after 4.5 s (compressed clocks).
            schedule_speedup=20.0,
            parameters={
                "WorkerPoolSize": str(3 * SLOTS + 1),
                "QueueCapacity": str(max(100, tasks)),
                "MaxAttempts": str(MAX_ATTEMPTS),
                "MaxActiveTasksPerUser": "1000",
                # One user submits every task: no per-user share, no new-account limit.
                "UserQueueSharePercent": "100",
                "NewAccountHours": "0",
                "SubmitBurst": "1000",
                "SubmitRatePerSecond": "1000",
                # A task queued this long with no claim gets its message re-sent (a crash
                # between receive and claim leaves it invisible for the 18-min visibility).
                "ReaperRequeueAfterSeconds": "5",
            },
            # A dead worker's lease is taken back as soon as it lapses.
            # The waits between tries shortened like the clocks (cloud: 2 s doubling to 60 s,
            # 10 s with no healthy endpoint, 2 s with no free slot).
            function_env={
                "REAPER_LEASE_GRACE_SECONDS": "1",
                "TASK_TIMEOUT_SECONDS": str(TASK_TIMEOUT_SECONDS),
                "RETRY_BASE_DELAY_SECONDS": "0.5",
                "RETRY_MAX_DELAY_SECONDS": "4",
                "NO_ENDPOINT_DELAY_SECONDS": "2",
                "NO_SLOT_DELAY_SECONDS": "1",
            },
            demo_user=False,
            quiet=True,
            speech_servers=0,
            s3_events=False,
        )
    )


def _dead_letter_task_ids(stack: RunningStack) -> list[str]:
    """Task ids of the messages still in the dead-letter queues (looked at, not consumed)."""
    sqs = boto3.client("sqs")
    found: list[str] = []
    for name in ("TaskDeadLetterQueue", "PriorityDeadLetterQueue"):
        url = stack.stack.ref(name)
        for _ in range(20):  # bounded: 10 messages a receive
            messages = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=30
            ).get("Messages", [])
            if not messages:
                break
            found += [str(json.loads(m["Body"]).get("task_id")) for m in messages]
    return found


def run_chaos(tasks: int, deadline_seconds: float, *, progress: bool = False) -> ChaosReport:
    report = ChaosReport(tasks=tasks)
    began = time.monotonic()
    stack = start_chaos_stack(tasks)
    try:
        registry = EndpointRegistry(
            boto3.resource("dynamodb").Table(stack.stack.ref("EndpointsTable"))
        )
        failing, killed, hanging = stack.image_servers
        failing.knobs.failure_rate = FAILURE_RATE
        failing.knobs.failure_seed = 7
        hanging.knobs.hang = True
        for endpoint in registry.endpoints(TaskKind.IMAGE):
            registry.put(endpoint.model_copy(update={"capacity": SLOTS}))
        tokens = register_users(stack.api_url, "chaos", USERS)
        table = boto3.resource("dynamodb").Table(stack.stack.ref("TasksTable"))

        def submit(i: int) -> str:
            return submit_image(stack.api_url, tokens[i % USERS], f"chaos task {i}")

        with ThreadPoolExecutor(max_workers=SUBMITTERS) as pool:
            ids = list(pool.map(submit, range(tasks)))
        prompts = {task_id: f"chaos task {i}" for i, task_id in enumerate(ids)}

        crashes_due = list(CRASH_DISPATCHER_AT)
        next_progress = time.monotonic()
        deadline = time.monotonic() + deadline_seconds
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            rows = read_tasks(table, ids, ("status",))
            ended = sum(1 for r in rows if r["status"] in FINAL)
            if crashes_due and ended >= crashes_due[0] * tasks:
                crashes_due.pop(0)
                report.workers_killed += stack.functions["DispatcherFunction"].crash_workers()
                report.dispatcher_crashes += 1
            if not report.endpoint_killed and ended >= KILL_ENDPOINT_AT * tasks:
                threading.Thread(target=killed.stop, daemon=True).start()
                report.endpoint_killed = True
            if ended == tasks:
                break
            if progress and time.monotonic() >= next_progress:
                next_progress += 5.0
                states = dict(Counter(str(r["status"]) for r in rows))
                print(f"{time.monotonic() - began:5.0f} s: {states}", flush=True)
            time.sleep(0.5)
        report.seconds = time.monotonic() - began
        _check(report, stack, read_tasks(table, ids), prompts)
    finally:
        hanging.knobs.hang = False
        stack.stop()
    return report


def _check(
    report: ChaosReport,
    stack: RunningStack,
    rows: list[dict[str, Any]],
    prompts: dict[str, str],
) -> None:
    report.statuses = dict(Counter(str(r["status"]) for r in rows))
    report.stuck = [str(r["task_id"]) for r in rows if r["status"] not in FINAL]
    report.stuck += sorted(set(prompts) - {str(r["task_id"]) for r in rows})
    report.failed_without_error = [
        str(r["task_id"]) for r in rows if r["status"] == "FAILED" and not r.get("error")
    ]
    # The kinds of errors, without the attempt number and endpoint ids that make each unique.
    kinds = (
        re.sub(r"attempt \d+ on |image-[0-9a-f]+:? ?", "", str(r["error"]))[:80]
        for r in rows
        if r["status"] == "FAILED"
    )
    report.errors = dict(Counter(kinds).most_common(5))

    s3 = boto3.client("s3")
    bucket = stack.stack.ref("ImagesBucket")
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="results/"):
        keys += [str(o["Key"]) for o in page.get("Contents", [])]
    per_key = Counter(keys)
    report.done_without_one_image = [
        str(r["task_id"])
        for r in rows
        if r["status"] == "DONE" and per_key[result_key(str(r["task_id"]))] != 1
    ]

    stats = [server.stats() for server in stack.image_servers]
    calls = Counter(prompt for s in stats for prompt in s["prompts"])
    per_task = {task_id: calls[prompt] for task_id, prompt in prompts.items()}
    report.gpu_calls = sum(per_task.values())
    report.max_calls_per_task = max(per_task.values(), default=0)
    report.over_max_attempts = {t: n for t, n in per_task.items() if n > MAX_ATTEMPTS}
    report.max_in_flight = [int(s["max_in_flight"]) for s in stats]

    dead = _dead_letter_task_ids(stack)
    report.dead_letters = len(dead)
    status = {str(r["task_id"]): str(r["status"]) for r in rows}
    report.dead_letters_unaccounted = [t for t in dead if status.get(t) not in FINAL]


def markdown(report: ChaosReport) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    checks = [
        ("every task ended DONE or FAILED (none stuck)", not report.stuck),
        ("every FAILED task has its error recorded", not report.failed_without_error),
        ("every DONE task has exactly one image object", not report.done_without_one_image),
        (f"no task had more than {MAX_ATTEMPTS} GPU calls", not report.over_max_attempts),
        ("every dead letter belongs to an ended task", not report.dead_letters_unaccounted),
        (
            f"no endpoint above its {SLOTS} slots (peaks {report.max_in_flight})",
            all(peak <= SLOTS for peak in report.max_in_flight),
        ),
    ]
    rows = "\n".join(f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in checks)
    lines = "\n".join(f"    {line}" for line in report.lines())
    return f"""# Fault suite

Generated by `make chaos` ({when}; {machine()}).

{report.tasks} image tasks from {USERS} users through three stand-in endpoints ({SLOTS}
registered slots each, {LATENCY_SECONDS} s per image) while: endpoint 0 answers 500 to
{FAILURE_RATE:.0%} of calls; endpoint 1 is killed once {KILL_ENDPOINT_AT:.0%} of the tasks ended;
endpoint 2 hangs every call past the task timeout ({TASK_TIMEOUT_SECONDS} s here); the
dispatcher's workers are all killed mid-invocation when {
        ", ".join(f"{c:.0%}" for c in CRASH_DISPATCHER_AT)
    } of the tasks ended. Clocks compressed for the run: checker and reaper
every 3 s, a QUEUED task re-sent after 5 s without a claim, a dead worker's lease taken back
1 s after it ends (in the cloud: 60 s, 900 s and 60 s), retries after 0.5 s doubling to 4 s
(2 s to 60 s), 2 s with no healthy endpoint (10 s).

| check | held |
|---|---|
{rows}

{lines}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds for the run")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--markdown", type=Path, help="write the report here")
    parser.add_argument("--progress", action="store_true", help="task states every 5 s")
    args = parser.parse_args(argv)
    use_local_aws()
    report = run_chaos(args.tasks, args.deadline, progress=args.progress)
    for line in report.lines():
        print(line, flush=True)
    if args.json:
        args.json.write_text(json.dumps(asdict(report) | {"failures": report.failures}, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(report))
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
