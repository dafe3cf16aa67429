"""Fleet benchmark (`make bench`): how close dispatch gets to the GPUs' own limit.

On the local stack, with stand-in endpoints of known latency and capacity, push N tasks
(from several users) and measure, per dispatch strategy: makespan, achieved throughput,
the ideal throughput sum(capacity / latency), their ratio ("fleet efficiency") and the
p50/p95 queue wait; then the same with one endpoint killed mid-run (failed tasks must be
0); and the control plane's own ceiling (zero-latency stand-ins), so the efficiency
figure is read against what moto and the local runtime can carry at all.

Every run is bounded: N tasks, and a deadline per run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "local"))
sys.path.insert(0, str(REPO / "layers" / "common"))

from gpuqueue.fleet.endpoint_registry import EndpointRegistry  # noqa: E402
from gpuqueue.models import TaskKind  # noqa: E402
from gpuqueue_local.lambda_runtime import FunctionRuntime  # noqa: E402
from gpuqueue_local.stack import RunningStack, StackOptions, start_stack  # noqa: E402
from local_run import read_tasks, register_users, submit_image, use_local_aws  # noqa: E402

# The default scenario: two fast endpoints and one 3x slower, 4 slots each (2.33 tasks/s,
# under the local control plane's ~3-4 tasks/s ceiling).
LATENCIES = (4.0, 4.0, 12.0)
CAPACITY = 4
# Enough users that consistent hashing (weights 3:3:1) gives every endpoint some homes.
USERS = 24
# Operators weight endpoints by throughput (capacity / latency): 3:3:1 here.
WEIGHTS = (3, 3, 1)
RUN_DEADLINE_SECONDS = 150.0  # per 100 tasks
SETTLE_SECONDS = 30.0  # for the last invocations to end after the last task
SUBMITTERS = 4  # clients pushing the tasks, one warm submit worker each (6 were slower here)
# Zero-latency tasks each deployment of the dispatcher runs before it is measured, so every
# container has served an invocation (its clients built), as in a fleet that has been busy.
WARM_UP_TASKS = 12
# The control plane's ceiling (zero-latency stand-ins) is measured on this many tasks.
CEILING_TASKS = 40
# The second heterogeneous fleet (issue 16's targets): three speeds, none a multiple of
# another's share of the work; run with LONG_TASKS tasks, so one run is both the second
# scenario and the long one (optimal makespan 123 s for 300 tasks).
SECOND_LATENCIES = (3.0, 6.0, 9.0)
# The second fleet's run: this many tasks (BENCH_LONG_TASKS).
LONG_TASKS = 300
# The run with an endpoint killed at 30 %: none may fail (a count, not a speed).
KILLED_TASKS = 30
# Printed as the killed-endpoint run starts (bench_report starts the request counts then).
KILLED_RUN_STARTS = "killed-endpoint run starts"
# The strategies compared besides least-loaded (BENCH_STRATEGIES=all; least-loaded alone
# by default, which keeps `make bench` within its 6 minutes).
ALL_STRATEGIES = "round-robin,user-hash,weighted,least-loaded"
# GPU calls per dispatcher invocation (CallsPerWorker, the template's default): the pool is
# sized to the fleet's slots, WorkerPoolSize x CallsPerWorker = 12.
CALLS_PER_WORKER = 4


def pool_size(slots: int) -> int:
    """Invocations whose calls cover every slot (SQS's MaximumConcurrency is 2 at least)."""
    return max(2, math.ceil(slots / CALLS_PER_WORKER))


@dataclass
class RunResult:
    label: str
    tasks: int
    submit_s: float
    done: int
    failed: int
    makespan_s: float
    throughput: float
    ideal: float | None
    wait_p50_s: float
    wait_p95_s: float
    max_in_flight: list[int]
    capacity: list[int]
    utilisation: list[float]
    optimal_makespan_s: float | None = None
    # Dispatcher invocations' summed durations (what Lambda bills) and the GPUs' summed busy
    # slot-seconds over the run: their ratio is the calls one billed second carries.
    dispatcher_billed_s: float = 0.0
    gpu_busy_s: float = 0.0
    # Where GPU time went: seconds from the start until every slot had its first call, and
    # the idle time between one call's end and the next call's start on an endpoint.
    all_busy_after_s: float | None = None
    handoff_gap_p50_ms: float | None = None
    handoff_gap_p95_ms: float | None = None

    @property
    def calls_per_billed_second(self) -> float | None:
        return self.gpu_busy_s / self.dispatcher_billed_s if self.dispatcher_billed_s else None

    @property
    def efficiency(self) -> float | None:
        return None if not self.ideal else self.throughput / self.ideal

    @property
    def makespan_ratio(self) -> float | None:
        """Measured makespan over the optimal one (1.00: no GPU time lost to dispatch)."""
        if not self.optimal_makespan_s:
            return None
        return self.makespan_s / self.optimal_makespan_s

    def line(self) -> str:
        efficiency = f"efficiency {self.efficiency:.2f} " if self.efficiency is not None else ""
        ideal = f"ideal {self.ideal:.2f}/s " if self.ideal else ""
        optimal = (
            f"(optimal {self.optimal_makespan_s:.1f}s, x{self.makespan_ratio:.3f}) "
            if self.makespan_ratio is not None
            else ""
        )
        return (
            f"{self.label}: {efficiency}makespan {self.makespan_s:.1f}s {optimal}"
            f"throughput {self.throughput:.2f}/s {ideal}"
            f"wait p50 {self.wait_p50_s:.1f}s p95 {self.wait_p95_s:.1f}s "
            f"done {self.done}/{self.tasks} failed {self.failed} submit {self.submit_s:.1f}s "
            f"peak in-flight {self.max_in_flight} (capacity {self.capacity}) "
            f"slot utilisation {[round(u, 2) for u in self.utilisation]} "
            f"all slots busy after {self.all_busy_after_s}s "
            f"hand-off gap p50/p95 {self.handoff_gap_p50_ms}/{self.handoff_gap_p95_ms} ms"
        )


def optimal_makespan(tasks: int, latencies: tuple[float, ...], capacity: int) -> float:
    """The least T at which the endpoints, each slot busy from 0 without a gap, can have
    finished `tasks` identical tasks: sum of capacity * floor(T / latency) >= tasks. Only
    multiples of a latency can be it."""
    candidates = sorted({latency * k for latency in latencies for k in range(1, tasks + 1)})
    for t in candidates:
        if sum(capacity * int(t / latency + 1e-9) for latency in latencies) >= tasks:
            return t
    raise ValueError("no endpoint")


def first_full(changes: list[list[float]], capacity: int, started: float) -> float | None:
    """Seconds from `started` until the endpoint first had a call on every slot."""
    return next((at - started for at, n in changes if n >= capacity), None)


def handoff_gaps(changes: list[list[float]]) -> list[float]:
    """Seconds each slot stood idle between a call's end and the next call's start, on one
    endpoint (its in-flight count over time): a call ending opens a gap, the next start
    closes the oldest one. Calls that ended with no next call (the run's end) are not gaps."""
    gaps: list[float] = []
    opened: list[float] = []
    for (at, n), (_, before) in zip(changes[1:], changes, strict=False):
        if n < before:
            opened.append(at)
        elif opened:
            gaps.append(at - opened.pop(0))
    return gaps


def _parse(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() if ts else 0.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def start_bench_stack(
    tasks: int, endpoints: int, capacity: int, strategy: str, *, most_tasks: int | None = None
) -> RunningStack:
    return start_stack(
        StackOptions(
            port=0,
            image_servers=endpoints,
            image_latency_s=0.0,
            schedule_speedup=10.0,
            parameters={
                "WorkerPoolSize": str(pool_size(capacity * endpoints)),
                "CallsPerWorker": str(CALLS_PER_WORKER),
                # Room for a run's tasks and the previous run's stragglers: the bound is
                # exact now, so a full lane refuses the 101st.
                "QueueCapacity": str(max(100, 2 * max(tasks, most_tasks or 0))),
                # A few fresh users submit every task: no per-user share, no new-account limit.
                "UserQueueSharePercent": "100",
                "NewAccountHours": "0",
                "DispatchStrategy": strategy,
            },
            demo_user=False,
            quiet=True,
            # Nothing else on moto's one core: no speech stand-in, no S3 upload poller.
            speech_servers=0,
            s3_events=False,
        )
    )


def use_strategy(stack: RunningStack, strategy: str) -> None:
    """Redeploy the dispatcher with another DispatchStrategy: fresh, warm workers."""
    old = stack.functions["DispatcherFunction"]
    spec = dataclasses.replace(old.spec, env={**old.spec.env, "DISPATCH_STRATEGY": strategy})
    new = FunctionRuntime(spec, old.base_env, log=old.log, max_concurrency=old.max_concurrency)
    new.warm(new.concurrency)
    for source in stack.sources:
        if source.function is old:
            source.function = new
    stack.functions["DispatcherFunction"] = new
    old.stop()


def run(
    stack: RunningStack,
    tokens: list[str],
    label: str,
    *,
    tasks: int,
    latencies: tuple[float, ...],
    capacity: int,
    kill_after: float | None = None,
    ideal_known: bool = True,
) -> RunResult:
    for server in stack.image_servers:
        server.reset_stats()
    billed_before = stack.functions["DispatcherFunction"].billed_seconds
    result = _measure(
        stack,
        tokens,
        label,
        tasks=tasks,
        latencies=latencies,
        capacity=capacity,
        kill_after=kill_after,
        ideal_known=ideal_known,
    )
    # Invocations still finishing their last writes are counted when they end: wait for
    # none to be running, bounded.
    dispatcher = stack.functions["DispatcherFunction"]
    settle_by = time.monotonic() + SETTLE_SECONDS
    while dispatcher.in_flight and time.monotonic() < settle_by:
        time.sleep(0.1)
    billed = dispatcher.billed_seconds - billed_before
    return dataclasses.replace(result, dispatcher_billed_s=billed)


def _measure(
    stack: RunningStack,
    tokens: list[str],
    label: str,
    *,
    tasks: int,
    latencies: tuple[float, ...],
    capacity: int,
    kill_after: float | None,
    ideal_known: bool,
) -> RunResult:
    registry = EndpointRegistry(boto3.resource("dynamodb").Table(stack.stack.ref("EndpointsTable")))
    for server, latency, weight in zip(stack.image_servers, latencies, WEIGHTS, strict=True):
        server.knobs.latency_s = latency
        server.knobs.capacity = capacity  # the stand-in refuses (429) beyond it
        endpoint = next(e for e in registry.endpoints(TaskKind.IMAGE) if e.url == server.url)
        registry.put(endpoint.model_copy(update={"capacity": capacity, "weight": weight}))
    table = boto3.resource("dynamodb").Table(stack.stack.ref("TasksTable"))

    def submit(i: int) -> str:
        return submit_image(stack.api_url, tokens[i % len(tokens)], f"bench task {i}")

    # Queue everything first with the trigger paused (a poll under way hands its message
    # straight back), so the figure measures dispatch, not how fast the local control
    # plane takes submissions.
    for source in stack.sources:
        source.pause()
    submit_started = time.time()
    with ThreadPoolExecutor(max_workers=SUBMITTERS) as pool:
        ids = list(pool.map(submit, range(tasks)))
    submitted = time.time() - submit_started
    started = time.time()
    for source in stack.sources:
        source.resume()

    killed = False
    deadline = started + RUN_DEADLINE_SECONDS * max(1.0, tasks / 100)
    rows: list[dict[str, Any]] = []
    while time.time() < deadline:
        rows = read_tasks(table, ids, ("status",))
        finished = [r for r in rows if r["status"] in ("DONE", "FAILED", "CANCELED", "EXPIRED")]
        if kill_after is not None and not killed and len(finished) >= kill_after * tasks:
            # Killed mid-run: the process is gone, its port refuses connections.
            threading.Thread(target=stack.image_servers[0].stop, daemon=True).start()
            killed = True
        if len(finished) == tasks:
            break
        time.sleep(0.5)
    rows = read_tasks(table, ids)  # whole rows once: their times
    done = [r for r in rows if r["status"] == "DONE"]
    failed = [r for r in rows if r["status"] == "FAILED"]
    end = max((_parse(str(r["updated_at"])) for r in done + failed), default=time.time())
    makespan = end - started
    waits = [
        _parse(str(r["started_at"])) - _parse(str(r["created_at"]))
        for r in rows
        if r.get("started_at")
    ]
    ideal = sum(capacity / latency for latency in latencies) if ideal_known else None
    optimal = optimal_makespan(tasks, latencies, capacity) if ideal_known else None
    stats = [server.stats() for server in stack.image_servers]
    fulls = [first_full(s["in_flight_changes"], capacity, started) for s in stats]
    gaps = sorted(g for s in stats for g in handoff_gaps(s["in_flight_changes"]))
    return RunResult(
        label=label,
        tasks=tasks,
        submit_s=submitted,
        done=len(done),
        failed=len(failed),
        makespan_s=makespan,
        throughput=len(done) / makespan if makespan > 0 else 0.0,
        ideal=ideal,
        wait_p50_s=statistics.median(waits) if waits else 0.0,
        wait_p95_s=_percentile(waits, 0.95),
        max_in_flight=[s["max_in_flight"] for s in stats],
        capacity=[capacity] * len(latencies),
        # Share of the run each endpoint's slots spent generating.
        utilisation=[
            s["busy_slot_seconds"] / (capacity * makespan) if makespan > 0 else 0.0 for s in stats
        ],
        optimal_makespan_s=optimal,
        gpu_busy_s=sum(s["busy_slot_seconds"] for s in stats),
        all_busy_after_s=(
            round(max(f for f in fulls if f is not None), 2)
            if kill_after is None and all(f is not None for f in fulls)
            else None
        ),
        handoff_gap_p50_ms=round(1000 * _percentile(gaps, 0.5)) if gaps else None,
        handoff_gap_p95_ms=round(1000 * _percentile(gaps, 0.95)) if gaps else None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=int(os.environ.get("BENCH_TASKS", "100")))
    parser.add_argument(
        "--strategies",
        # least-loaded last: the ceiling and the killed-endpoint runs reuse its workers,
        # so the dispatcher is redeployed (~10 s of worker start-up) only three times.
        default=os.environ.get("BENCH_STRATEGIES", "least-loaded"),
        help="comma-separated, or all",
    )
    parser.add_argument(
        "--long-tasks",
        type=int,
        default=int(os.environ.get("BENCH_LONG_TASKS", str(LONG_TASKS))),
        help="least-loaded on the second fleet with this many tasks",
    )
    parser.add_argument("--killed-tasks", type=int, default=KILLED_TASKS)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    use_local_aws()

    ideal = sum(CAPACITY / latency for latency in LATENCIES)
    print(
        f"scenario: {args.tasks} tasks from {USERS} users; endpoints latency {LATENCIES} s, "
        f"{CAPACITY} slots and weights {WEIGHTS}, {pool_size(CAPACITY * len(LATENCIES))} "
        f"dispatcher invocations x {CALLS_PER_WORKER} calls; ideal {ideal:.2f} tasks/s",
        flush=True,
    )
    began = time.monotonic()
    strategies = (ALL_STRATEGIES if args.strategies == "all" else args.strategies).split(",")
    results: list[RunResult] = []
    stack = start_bench_stack(
        args.tasks, len(LATENCIES), CAPACITY, strategies[0], most_tasks=args.long_tasks
    )
    try:
        stack.functions["SubmitFunction"].warm(SUBMITTERS - 1)
        tokens = register_users(stack.api_url, "bench", USERS)
        common = {"tasks": args.tasks, "capacity": CAPACITY}
        # First, on the fresh stack: the ceiling is also the first deployment's warm-up.
        ceiling = run(
            stack,
            tokens,
            f"control-plane ceiling (zero-latency stand-ins), {CEILING_TASKS} tasks",
            latencies=(0.0,) * len(LATENCIES),
            ideal_known=False,
            tasks=CEILING_TASKS,
            capacity=CAPACITY,
        )
        print(ceiling.line(), flush=True)
        current = strategies[0]
        warm = True
        for strategy in [*strategies, "least-loaded"]:
            if strategy != current:
                use_strategy(stack, strategy)
                current = strategy
                warm = False
            if strategy in strategies and not any(r.label == strategy for r in results):
                if not warm:
                    run(
                        stack,
                        tokens,
                        "warm-up",
                        latencies=(0.0,) * len(LATENCIES),
                        ideal_known=False,
                        tasks=WARM_UP_TASKS,
                        capacity=CAPACITY,
                    )
                    warm = True
                results.append(run(stack, tokens, strategy, latencies=LATENCIES, **common))
                print(results[-1].line(), flush=True)
        results.append(ceiling)
        second = run(
            stack,
            tokens,
            f"least-loaded, second fleet {SECOND_LATENCIES} s, {args.long_tasks} tasks",
            latencies=SECOND_LATENCIES,
            tasks=args.long_tasks,
            capacity=CAPACITY,
        )
        results.append(second)
        print(second.line(), flush=True)
        # The request counts (bench_report) run beside this one: it counts failures, not time.
        print(KILLED_RUN_STARTS, flush=True)
        killed = run(
            stack,
            tokens,
            f"least-loaded, one endpoint killed at 30%, {args.killed_tasks} tasks",
            latencies=LATENCIES,
            kill_after=0.3,
            ideal_known=False,
            tasks=args.killed_tasks,
            capacity=CAPACITY,
        )
        results.append(killed)
        print(killed.line(), flush=True)
        # What sizes the dispatchers' MemorySize: their largest Max Memory Used.
        dispatcher_memory_mb = stack.functions["DispatcherFunction"].peak_memory_mb
        print(f"dispatcher max memory used: {dispatcher_memory_mb} MB", flush=True)
    finally:
        stack.stop()
    print(f"bench took {time.monotonic() - began:.0f} s", flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "runs": [
                        r.__dict__
                        | {
                            "efficiency": r.efficiency,
                            "makespan_ratio": r.makespan_ratio,
                            "calls_per_billed_second": r.calls_per_billed_second,
                        }
                        for r in results
                    ],
                    "dispatcher_max_memory_mb": dispatcher_memory_mb,
                },
                indent=2,
            )
        )
    return 1 if killed.failed else 0


if __name__ == "__main__":
    sys.exit(main())
