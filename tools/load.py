"""Load test (`make load`): C concurrent clients submit and poll over HTTP for S seconds.

On an in-process local stack (loopback only) with two stand-in image endpoints: each
client submits an image task, polls its status until it ends, and submits the next, until
the time is up. The queue is sized so the run reaches it: past QueueCapacity waiting tasks
submit answers 503 (designed back-pressure), past a user's rate or share 429.

Reports submit and status latency (p50/p95/p99), every answer by status code, errors (any
other 4xx/5xx or a failed connection: must be 0), and the queue at capacity (deepest
queue seen, 503s, tasks ended). Bounded: C clients, S seconds, one request in flight per
client. Writes docs/load.md (and --json) with the machine and the date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "local"))
sys.path.insert(0, str(REPO / "layers" / "common"))

from gpuqueue_local.stack import RunningStack, StackOptions, start_stack  # noqa: E402
from local_run import machine, register_users, use_local_aws  # noqa: E402

QUEUE_CAPACITY = 40
ENDPOINTS = 2
SLOTS = 2
LATENCY_SECONDS = 2.0  # a quick GPU: the queue fills when 50 clients keep submitting
POLL_SECONDS = 1.0
USERS = 10  # clients share users, as an app's users share a stack
DESIGNED = {429, 503}  # rate/share limits and the full queue: back-pressure, not errors


@dataclass
class LoadReport:
    clients: int
    seconds: float
    submits: int = 0
    polls: int = 0
    tasks_done: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    submit_ms: dict[str, float] = field(default_factory=dict)
    status_ms: dict[str, float] = field(default_factory=dict)
    deepest_queue: int = 0
    queue_capacity: int = QUEUE_CAPACITY
    full_queue_answers: int = 0

    def lines(self) -> list[str]:
        return [
            f"{self.clients} clients for {self.seconds:.0f} s: {self.submits} submits, "
            f"{self.polls} status polls, {self.tasks_done} tasks done",
            f"submit ms {self.submit_ms}",
            f"status ms {self.status_ms}",
            f"answers {self.codes}; errors {len(self.errors)}",
            f"queue: deepest {self.deepest_queue} of {self.queue_capacity}; "
            f"{self.full_queue_answers} submits answered 503 (queue full)",
        ]


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

    return {
        "p50": at(0.5),
        "p95": at(0.95),
        "p99": at(0.99),
        "max": round(ordered[-1] * 1000, 1),
        "mean": round(statistics.fmean(ordered) * 1000, 1),
    }


def start_load_stack() -> RunningStack:
    return start_stack(
        StackOptions(
            port=0,
            image_servers=ENDPOINTS,
            image_latency_s=LATENCY_SECONDS,
            image_capacity=SLOTS,
            schedule_speedup=10.0,
            parameters={
                "WorkerPoolSize": str(ENDPOINTS * SLOTS),
                "QueueCapacity": str(QUEUE_CAPACITY),
                "SubmitRatePerSecond": "5",
                "SubmitBurst": "20",
                # The run fills the queue with 10 fresh users: no per-user share of it, no
                # new-account limit (their own tests are tests/integration/test_admission.py).
                "UserQueueSharePercent": "100",
                "NewAccountHours": "0",
            },
            demo_user=False,
            quiet=True,
            speech_servers=0,
            s3_events=False,
            warm_all=True,  # the figures are for warm functions
        )
    )


class _Recorder:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.submit_s: list[float] = []
        self.status_s: list[float] = []
        self.codes: Counter[str] = Counter()
        self.errors: list[str] = []
        self.done = 0

    def record(self, kind: str, seconds: float, code: int | str, body: str = "") -> None:
        with self._lock:
            (self.submit_s if kind == "submit" else self.status_s).append(seconds)
            self.codes[f"{kind} {code}"] += 1
            if isinstance(code, str) or (code >= 400 and code not in DESIGNED):
                self.errors.append(f"{kind} {code} {body[:200]}")


def _client(api: str, token: str, index: int, until: float, recorder: _Recorder) -> None:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {token}"
    n = 0
    while time.monotonic() < until:
        n += 1
        started = time.monotonic()
        try:
            answer = session.post(
                f"{api}/api/v1/image/async",
                json={"prompt": f"load {index}-{n}", "width": 64, "height": 64},
                timeout=30,
            )
        except requests.RequestException as error:
            recorder.record("submit", time.monotonic() - started, type(error).__name__)
            continue
        recorder.record("submit", time.monotonic() - started, answer.status_code, answer.text)
        if answer.status_code != 202:
            retry = float(answer.headers.get("Retry-After", "1"))
            time.sleep(min(retry, 5.0, max(0.0, until - time.monotonic())))
            continue
        task_id = answer.json()["task_id"]
        while time.monotonic() < until:
            time.sleep(POLL_SECONDS)
            started = time.monotonic()
            try:
                status = session.get(f"{api}/api/v1/tasks/{task_id}", timeout=30)
            except requests.RequestException as error:
                recorder.record("status", time.monotonic() - started, type(error).__name__)
                continue
            recorder.record("status", time.monotonic() - started, status.status_code, status.text)
            if status.status_code == 200 and status.json()["status"] in ("DONE", "FAILED"):
                recorder.done += 1
                break


def run_load(clients: int, seconds: float) -> LoadReport:
    stack = start_load_stack()
    try:
        # Warm as many workers as the local runtime runs at once (Lambda would scale out
        # the same way under steady load), so the figures are not cold starts.
        for name in ("SubmitFunction", "TasksFunction"):
            runtime = stack.functions[name]
            runtime.warm(runtime.concurrency)
        tokens = register_users(stack.api_url, "load", USERS)
        recorder = _Recorder()
        deepest = 0
        until = time.monotonic() + seconds
        with ThreadPoolExecutor(max_workers=clients) as pool:
            for i in range(clients):
                pool.submit(_client, stack.api_url, tokens[i % USERS], i, until, recorder)
            while time.monotonic() < until:
                stats = requests.get(
                    f"{stack.api_url}/api/v1/system/stats",
                    headers={"Authorization": f"Bearer {tokens[0]}"},
                    timeout=30,
                )
                if stats.ok:
                    deepest = max(deepest, int(stats.json()["queue_length"]))
                time.sleep(2.0)
        codes = dict(sorted(recorder.codes.items()))
        return LoadReport(
            clients=clients,
            seconds=seconds,
            submits=len(recorder.submit_s),
            polls=len(recorder.status_s),
            tasks_done=recorder.done,
            codes=codes,
            errors=recorder.errors[:20],
            submit_ms=_percentiles(recorder.submit_s),
            status_ms=_percentiles(recorder.status_s),
            deepest_queue=deepest,
            full_queue_answers=recorder.codes.get("submit 503", 0),
        )
    finally:
        stack.stop()


def markdown(report: LoadReport) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows = "\n".join(
        f"| {name} | {f.get('p50')} | {f.get('p95')} | {f.get('p99')} | {f.get('max')} |"
        for name, f in (("submit", report.submit_ms), ("status", report.status_ms))
    )
    codes = "\n".join(f"| {code} | {count} |" for code, count in report.codes.items())
    accepted = report.codes.get("submit 202", 0)
    return f"""# Load test

Generated by `make load` ({when}; {machine()}). The local stack in one process on moto, so
the figures measure this machine's control plane (moto, the local Lambda runtime) under
{report.clients} clients, not AWS: read them against each other, not as cloud latencies.

Scenario: {report.clients} clients for {report.seconds:.0f} s, each submitting an image task,
polling its status every {POLL_SECONDS:.0f} s until it ends, then submitting the next; {ENDPOINTS}
stand-in endpoints x {SLOTS} slots at {LATENCY_SECONDS:.0f} s per image (the GPUs take
{ENDPOINTS * SLOTS / LATENCY_SECONDS:.1f} tasks/s); QueueCapacity {report.queue_capacity}; per-user
rate 5/s, burst 20; {USERS} users.

| request | p50 ms | p95 ms | p99 ms | max ms |
|---|---|---|---|---|
{rows}

| answer | count |
|---|---|
{codes}

- Requests: {report.submits} submits ({accepted} accepted), {report.polls} status polls;
  {report.tasks_done} tasks seen done by their client within the run (the GPUs' rate is the
  bound; the rest were still queued or running when it ended).
- Errors (any answer but 2xx and the designed 429/503, or a failed connection):
  **{len(report.errors)}**.
- Queue at capacity: deepest queue {report.deepest_queue} of {report.queue_capacity};
  {report.full_queue_answers} submits answered 503 `QUEUE_FULL` with `Retry-After` (the
  clients waited and tried again). The capacity check reads SQS's approximate depth before
  the send, so submits racing at the limit can overshoot it by the number in flight at once.
- Latency tails: a submit is 6 AWS requests (rate limit, share, capacity check, write,
  send); here each waits for one of the local runtime's 10 workers per function and for the
  one moto process that serves every request of the run, which is where the p95/p99 go.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--markdown", type=Path, help="write the report here")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    use_local_aws()
    report = run_load(args.clients, args.seconds)
    for line in report.lines():
        print(line, flush=True)
    if args.markdown:
        args.markdown.write_text(markdown(report))
    if args.json:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
