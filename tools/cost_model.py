"""Cost per million image tasks, from the AWS requests the bench counted (docs/cost.md).

Prices: AWS's public price lists for us-east-1 (on-demand, no free tier), as of PRICES_AS_OF;
check them before relying on the figures. GPU time is left out of the total and shown apart:
the point is what the queue costs next to the GPU it feeds.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "local"))

from gpuqueue_local.template import load_template

PRICES_AS_OF = "2025-12 (AWS price lists, us-east-1)"
PRICE = {
    "apigw_http_per_request": 1.00 / 1e6,  # HTTP API, first 300 M a month
    "apigw_ws_per_message": 1.00 / 1e6,  # WebSocket API messages
    "lambda_per_request": 0.20 / 1e6,
    "lambda_per_gb_second_arm64": 0.0000133334,
    "dynamodb_per_wru": 0.625 / 1e6,  # on-demand (after the Nov 2024 reduction)
    "dynamodb_per_rru": 0.125 / 1e6,
    "sqs_per_request": 0.40 / 1e6,  # standard queue
    "s3_per_put": 0.005 / 1000,
    "s3_per_get": 0.0004 / 1000,
    "s3_per_gb_month": 0.023,
    "logs_per_gb_ingested": 0.50,
    "xray_per_trace": 5.00 / 1e6,
    "secrets_per_call": 0.05 / 10_000,
    "gpu_per_hour": 1.006,  # g5.xlarge (1 x NVIDIA A10G), on-demand
}
GPU_NAME = "g5.xlarge (NVIDIA A10G), on-demand"

# Assumptions the bench cannot measure on moto, named in the report.
MEMORY_GB = 0.5  # the other functions' MemorySize (template Globals)
GENERATION_SECONDS = 12.0  # the dispatcher waits for the GPU: billed Lambda time
HANDLER_SECONDS = {"submit": 0.08, "dispatch_overhead": 0.3, "task_events": 0.1, "poll": 0.05}
TASK_WRITE_WRU = 3  # a tasks-table write also writes its two indexes (by-user ALL, by-reap)
IMAGE_MB = 1.5  # a 1024x1024 PNG
# The dispatcher's consistent fleet read scans the endpoints table: ~300 bytes a row, 1 RRU
# per 4 KB strongly consistent; 2 for the bench's fleet (3 endpoints, 12 slots, every kind).
FLEET_SCAN_RRU = 2
LOG_KB_PER_TASK = 4.0  # ~6 JSON log lines and ~6 EMF blobs
TRACES_PER_TASK = 3
XRAY_SAMPLED = 0.05  # X-Ray's default rule past the first request each second
POLLS_SEED_CLIENT = 15  # the seed's client: one status call a second for a 15 s task
ESM_SQS_REQUESTS = 2  # the event source mapping's receive and delete, billed to us
STREAM_INVOCATIONS = 2  # two stream records pass the filter per task (left the line, ended)
# Progress (issue 19): the dispatcher writes the GPU's step at most every 2 s
# (dispatch/task_watch.py), so a generation of GENERATION_SECONDS makes this many writes;
# each passes the stream filter and is pushed (tests/integration/test_push.py counts 8
# records for a task with 6 progress writes, 2 without).
PROGRESS_WRITE_INTERVAL_SECONDS = 2.0


# Cog callback mode (issue 19), measured against the real Cog server (coglet 0.23.1) by
# tests/e2e/test_cog_callback_e2e.py: a 12 s generation (120 steps) sent 26 webhooks: its
# start, a `logs` one about every 0.5 s (Cog's own throttle, not configurable), completed.
CALLBACK_WEBHOOKS_PER_TASK = 26
# A callback: a read, a conditional write (52-89 ms a warm one on the local stack).
CALLBACK_HANDLER_SECONDS = 0.1
CALLBACK_LOG_KB = 1.0  # one or two log lines a webhook
# The detached dispatcher: its usual overhead and Cog's 202 (0.28-1.0 s measured on the
# loaded 2-core local stack).
DETACHED_DISPATCH_SECONDS = HANDLER_SECONDS["dispatch_overhead"] + 0.05


def callback_costs(*, sync_dispatcher_dollars: float) -> dict[str, float]:
    """Per 1 M tasks: the dispatcher's wait in sync mode against callback mode's short
    dispatcher invocation and its webhooks (each: an API request, an invocation, a task
    read, a progress write refused by its 2 s bound (1 WRU) or made (3), a log line)."""
    m = 1e6
    webhook = (
        PRICE["apigw_http_per_request"]
        + PRICE["lambda_per_request"]
        + MEMORY_GB * CALLBACK_HANDLER_SECONDS * PRICE["lambda_per_gb_second_arm64"]
        + PRICE["dynamodb_per_rru"]
        + PRICE["dynamodb_per_wru"]
        + CALLBACK_LOG_KB / 1024 / 1024 * PRICE["logs_per_gb_ingested"]
    )
    progress_writes = GENERATION_SECONDS / 2.0  # at most one per 2 s, 2 WRU more each
    detached = (
        dispatcher_memory_gb() * DETACHED_DISPATCH_SECONDS * PRICE["lambda_per_gb_second_arm64"]
    )
    with_progress = (
        detached
        + CALLBACK_WEBHOOKS_PER_TASK * webhook
        + progress_writes * (TASK_WRITE_WRU - 1) * PRICE["dynamodb_per_wru"]
    )
    return {
        "sync": sync_dispatcher_dollars,
        "webhook": webhook * m,
        "detached": detached * m,
        "with_progress": with_progress * m,
        "completed_only": (detached + webhook) * m,
        "sync_one_call": dispatcher_memory_gb()
        * (GENERATION_SECONDS + HANDLER_SECONDS["dispatch_overhead"])
        * PRICE["lambda_per_gb_second_arm64"]
        * m,
    }


def callback_markdown(*, sync_dispatcher_dollars: float) -> str:
    c = callback_costs(sync_dispatcher_dollars=sync_dispatcher_dollars)
    gpu = PRICE["gpu_per_hour"] * GENERATION_SECONDS / 3600 * 1e6
    sync_seconds = GENERATION_SECONDS + HANDLER_SECONDS["dispatch_overhead"]
    rows = [
        ("sync, as measured", "the dispatcher waits (the table above)", c["sync"]),
        (
            "sync, one call per invocation",
            f"{dispatcher_memory_gb() * 1024:.0f} MB for {sync_seconds:.1f} s",
            c["sync_one_call"],
        ),
        (
            "callback, with progress",
            f"a {DETACHED_DISPATCH_SECONDS:.2f} s dispatcher (${c['detached']:,.2f}) + "
            f"{CALLBACK_WEBHOOKS_PER_TASK} webhooks (${c['webhook']:,.2f} per million) + "
            "a progress write every 2 s",
            c["with_progress"],
        ),
        ("callback, `completed` only", "the same dispatcher + 1 webhook", c["completed_only"]),
    ]
    table = "\n".join(f"| {mode} | {what} | ${dollars:,.2f} |" for mode, what, dollars in rows)
    share = c["with_progress"] / gpu
    return f"""
## Cog callback mode against sync mode

A Cog endpoint with `callback: true` (issue 19) is started with a webhook and the
dispatcher returns at once: no Lambda waits on the GPU. Its cost moves from the dispatcher's
wait to the webhooks Cog sends, one request through API Gateway and one callback
invocation each. Per 1 M tasks, for the {GENERATION_SECONDS:.0f} s generation above:

| mode | what is billed | per 1 M tasks |
|---|---|---|
{table}

Measured: {CALLBACK_WEBHOOKS_PER_TASK} webhooks for a 12 s, 120-step generation against the
real Cog server (`start`, a `logs` webhook about every 0.5 s while the model's tqdm bar
moves, `completed`; tests/e2e/test_cog_callback_e2e.py prints it). The count grows with the
generation's length (about 2 a second), not with its steps. A webhook: an HTTP API request,
an invocation ({MEMORY_GB} GB, {CALLBACK_HANDLER_SECONDS} s assumed warm), a strongly
consistent task read (1 RRU), a progress write (refused by its 2 s bound: 1 WRU; written:
{TASK_WRITE_WRU}), {CALLBACK_LOG_KB:.0f} KB of logs. The `completed` webhook also stores the
PNG (the same S3 PUT as sync mode: not counted twice).

So callback mode **with progress costs more** than a shared sync dispatcher: Cog's `logs`
events are throttled to 0.5 s by Cog and cannot be slowed, and each is a paid request and
invocation. Without progress (`completed` only) it costs less than the dispatcher's wait,
and with progress it is {share:.1%} of the GPU's ${gpu:,.0f}. What it buys is not money:
no dispatcher concurrency is held for GPU time (`WorkerPoolSize` bounds the calls starting,
not the calls running). The cheap row is an endpoint option: `"callback_progress": false`
(`gpuqueue endpoints put --no-callback-progress`) asks Cog for its `completed` webhook
only: no progress, and a cancel takes effect only when the prediction ends (the GPU runs
to the end; no image is stored).
"""


def dispatcher_memory_gb() -> float:
    """The dispatcher's MemorySize in template.yaml (the source of truth), in GB."""
    template = load_template()
    props = template["Resources"]["DispatcherFunction"]["Properties"]
    mb = props.get("MemorySize", template["Globals"]["Function"]["MemorySize"])
    if isinstance(mb, dict):  # a Ref to a parameter: its default
        mb = template["Parameters"][mb["Ref"]]["Default"]
    return float(mb) / 1024


def image_retention_days() -> int:
    """How long an image is kept: ImageRetentionDays' default in template.yaml."""
    return int(load_template()["Parameters"]["ImageRetentionDays"]["Default"])


@dataclass(frozen=True)
class Line:
    service: str
    what: str
    dollars_per_million: float


def _dynamodb(requests: dict[str, float], *, tasks_table_writes: float) -> tuple[float, float]:
    """(WRU, RRU) per task for these counted requests."""
    writes = sum(n for op, n in requests.items() if op.split(":")[1] in {"PutItem", "UpdateItem"})
    reads = sum(
        n for op, n in requests.items() if op.split(":")[1] in {"GetItem", "Query", "BatchGetItem"}
    ) + FLEET_SCAN_RRU * sum(n for op, n in requests.items() if op == "dynamodb:Scan")
    other_writes = max(0.0, writes - tasks_table_writes)
    return tasks_table_writes * TASK_WRITE_WRU + other_writes, reads


def _count(requests: dict[str, float], prefix: str) -> float:
    return sum(n for op, n in requests.items() if op.startswith(prefix))


def per_million(
    bench: dict[str, Any], *, calls_per_billed_second: float | None = None
) -> dict[str, Any]:
    """The cost lines for one million image tasks, from bench_requests' figures and, when
    the fleet bench measured it, how many GPU calls one billed dispatcher second carried
    (several calls per invocation); without it, one."""
    # Under load (tasks queued at once, as a busy fleet sees them) when measured: workers
    # take their next tasks themselves, and the mapping delivers only some of the messages.
    load = bench.get("under_load")
    phases: dict[str, dict[str, float]] = (load or bench)["requests_per_task"]
    mapping_sqs = load["mapping_requests_per_task"] if load else ESM_SQS_REQUESTS
    core: dict[str, float] = {}
    for phase in ("submit", "dispatch", "task_events"):
        for op, n in phases.get(phase, {}).items():
            core[op] = core.get(op, 0.0) + n
    # Tasks-table writes per task: create, claim, complete (the rest are other tables).
    wru, rru = _dynamodb(core, tasks_table_writes=3)
    m = 1e6
    days = image_retention_days()
    dispatcher_gb = dispatcher_memory_gb()
    stream_invocations = load["stream_invocations_per_task"] if load else STREAM_INVOCATIONS
    dispatch_invocations = load["dispatcher_invocations_per_task"] if load else 1.0
    sharing = max(1.0, calls_per_billed_second or 1.0)
    # Measured, the ratio of GPU-busy to billed dispatcher seconds already holds the
    # dispatcher's own time (its writes, receives, waits and idle tail); assumed, add it.
    dispatcher_seconds = (
        GENERATION_SECONDS / sharing
        if calls_per_billed_second
        else GENERATION_SECONDS + HANDLER_SECONDS["dispatch_overhead"]
    )
    gb_s = (
        MEMORY_GB
        * (HANDLER_SECONDS["submit"] + stream_invocations * HANDLER_SECONDS["task_events"])
        + dispatcher_gb * dispatcher_seconds
    )
    invocations = 1 + dispatch_invocations + stream_invocations
    sqs = _count(core, "sqs:") + mapping_sqs
    lines = [
        Line("API Gateway", "1 HTTP request (submit)", PRICE["apigw_http_per_request"] * m),
        Line(
            "Lambda",
            f"{invocations:.2f} invocations (submit 1, dispatch {dispatch_invocations:g}, "
            f"stream batches {stream_invocations:g})",
            invocations * PRICE["lambda_per_request"] * m,
        ),
        Line(
            "Lambda",
            f"{gb_s:.2f} GB-s: the dispatcher ({dispatcher_gb * 1024:.0f} MB) waits "
            f"{GENERATION_SECONDS:.0f} s for the GPU, {sharing:.2f} calls per billed second",
            gb_s * PRICE["lambda_per_gb_second_arm64"] * m,
        ),
        Line(
            "DynamoDB",
            f"{wru:.1f} WRU ({TASK_WRITE_WRU} per tasks-table write, indexes included)",
            wru * PRICE["dynamodb_per_wru"] * m,
        ),
        Line("DynamoDB", f"{rru:.1f} RRU", rru * PRICE["dynamodb_per_rru"] * m),
        Line(
            "SQS",
            f"{sqs:.1f} requests ({mapping_sqs:g} by the event source mapping)",
            sqs * PRICE["sqs_per_request"] * m,
        ),
        Line(
            "S3",
            "1 PUT (the image) + 1 GET (the download)",
            (PRICE["s3_per_put"] + PRICE["s3_per_get"]) * m,
        ),
        Line(
            "S3",
            f"storage: {IMAGE_MB} MB for {days} day{'s' if days != 1 else ''} (ImageRetentionDays)",
            IMAGE_MB / 1024 * PRICE["s3_per_gb_month"] * days / 30 * m,
        ),
        Line(
            "CloudWatch Logs",
            f"{LOG_KB_PER_TASK:.0f} KB ingested (logs and EMF metrics)",
            LOG_KB_PER_TASK / 1024 / 1024 * PRICE["logs_per_gb_ingested"] * m,
        ),
        Line(
            "X-Ray",
            f"{TRACES_PER_TASK} traces, {XRAY_SAMPLED:.0%} sampled",
            TRACES_PER_TASK * XRAY_SAMPLED * PRICE["xray_per_trace"] * m,
        ),
    ]
    poll_reads = sum(phases.get("status_poll", {}).values())
    one_poll = (
        PRICE["apigw_http_per_request"]
        + PRICE["lambda_per_request"]
        + MEMORY_GB * HANDLER_SECONDS["poll"] * PRICE["lambda_per_gb_second_arm64"]
        + poll_reads * PRICE["dynamodb_per_rru"]
    ) * m
    hook = phases.get("webhook", {})
    hook_wru, hook_rru = _dynamodb(hook, tasks_table_writes=_count(hook, "dynamodb:UpdateItem"))
    webhook = (
        (1 + ESM_SQS_REQUESTS) * PRICE["sqs_per_request"]
        + PRICE["lambda_per_request"]
        + MEMORY_GB * 0.2 * PRICE["lambda_per_gb_second_arm64"]
        + hook_wru * PRICE["dynamodb_per_wru"]
        + hook_rru * PRICE["dynamodb_per_rru"]
        + _count(hook, "secretsmanager:") * PRICE["secrets_per_call"]
    ) * m
    push = (PRICE["apigw_ws_per_message"] + PRICE["dynamodb_per_rru"]) * m
    total = sum(line.dollars_per_million for line in lines)
    gpu = PRICE["gpu_per_hour"] * GENERATION_SECONDS / 3600 * m
    return {
        "lines": lines,
        "total": total,
        "gpu": gpu,
        "share_of_gpu": total / gpu,
        "one_poll": one_poll,
        "seed_polling": one_poll * POLLS_SEED_CLIENT,
        "webhook": webhook,
        "push": push,
    }


def progress_cost(bench: dict[str, Any] | None = None) -> dict[str, float]:
    """What a task's progress costs per million tasks: its writes, the stream records that
    pass the filter (an invocation each when quiet; under load the batches aggregate them
    as they do the other records), and a push each to one open connection (a query of the
    owner's connections either way)."""
    writes = GENERATION_SECONDS / PROGRESS_WRITE_INTERVAL_SECONDS
    m = 1e6
    one_invocation = (
        PRICE["lambda_per_request"]
        + MEMORY_GB * HANDLER_SECONDS["task_events"] * PRICE["lambda_per_gb_second_arm64"]
    )
    load = (bench or {}).get("under_load")
    per_record = (
        load["stream_invocations_per_task"] / STREAM_INVOCATIONS if load else 1.0
    )  # invocations per passing record under load
    return {
        "writes": writes,
        "dynamodb": writes * TASK_WRITE_WRU * PRICE["dynamodb_per_wru"] * m,
        "stream_quiet": writes * one_invocation * m,
        "stream_busy": writes * per_record * one_invocation * m,
        "busy_invocations": writes * per_record,
        "query": writes * PRICE["dynamodb_per_rru"] * m,
        "push": writes * (PRICE["apigw_ws_per_message"] + PRICE["dynamodb_per_rru"]) * m,
    }


def progress_markdown(bench: dict[str, Any] | None = None) -> str:
    cost = progress_cost(bench)
    writes = f"{cost['writes']:.0f}"
    quiet = cost["dynamodb"] + cost["stream_quiet"] + cost["push"]
    stream = (
        f"| the stream records: an invocation each when quiet / batched under load "
        f"({cost['busy_invocations']:.2f} invocations) "
        f"| ${cost['stream_quiet']:,.2f} / ${cost['stream_busy']:,.2f} |"
    )
    pushes = (
        f"| the pushes to one open connection (a message and a query each; with none, "
        f"the query: ${cost['query']:,.2f}) | ${cost['push']:,.2f} |"
    )
    return f"""**Progress while it runs** (per 1 M tasks): a {GENERATION_SECONDS:.0f} s generation
reports its GPU's step at most every {PROGRESS_WRITE_INTERVAL_SECONDS:.0f} s: {writes} writes,
{writes} more stream records through the filter (a task had 2) and a push each.

| what | extra cost |
|---|---|
| the writes ({writes} x {TASK_WRITE_WRU} WRU) | ${cost["dynamodb"]:,.2f} |
{stream}
{pushes}
| **quiet, one client watching** | **${quiet:,.2f}** |

The writes cost most: the {PROGRESS_WRITE_INTERVAL_SECONDS:.0f} s bound keeps them at {writes}. \
Only progress writes and
a cancel asked pass the filter among a running task's writes (a claim and a next attempt
clear progress), so new leases and other attempts add nothing. Protocols that report no
steps (OpenAI-compatible) cost none of this; it is not in the total above."""


# The totals before, for the figures above to be read against (the same model).
PREVIOUS_COST = """Before: $114.51 when issue 16 was filed (the waiting dispatch path, the
dispatcher at 512 MB); $43.76 on 2026-12-07 03:57 (one-step hand-off, 384 MB, images kept
7 days, 10.72 requests per task under load); $35.68 on 2026-12-07 06:57 (images kept 1 day,
the dispatcher still at 384 MB: $17.70 of it waiting on the GPU)."""


def _dispatcher_wait(cost: dict[str, Any]) -> float:
    """The table's line for the dispatcher's GB-seconds (its wait on the GPU)."""
    return float(next(line.dollars_per_million for line in cost["lines"] if "GB-s" in line.what))


def markdown(
    bench: dict[str, Any],
    *,
    date: str,
    calls_per_billed_second: float | None = None,
    dispatcher_max_memory_mb: float | None = None,
) -> str:
    cost = per_million(bench, calls_per_billed_second=calls_per_billed_second)
    measured = (
        f"; `make bench` measured {dispatcher_max_memory_mb:.0f} MB Max Memory Used"
        if dispatcher_max_memory_mb
        else ""
    )
    memory_text = (
        f"The dispatcher runs at {dispatcher_memory_gb() * 1024:.0f} MB (DispatcherMemorySize's "
        f"default{measured}): its runtime and the answers being decoded, which reserve room "
        "as they arrive; the audio is streamed. It was 384 MB (two copies of the longest "
        "audio) and 512 MB before that."
    )
    prefer_wait = MEMORY_GB * 15 * PRICE["lambda_per_gb_second_arm64"] * 1e6
    polling = f"${cost['seed_polling']:,.2f} ({POLLS_SEED_CLIENT} x ${cost['one_poll']:,.2f})"
    rows = "\n".join(
        f"| {line.service} | {line.what} | ${line.dollars_per_million:,.2f} |"
        for line in cost["lines"]
    )
    sharing_text = (
        f"{calls_per_billed_second:.2f} GPU calls per billed dispatcher second, least-loaded"
        if calls_per_billed_second
        else "not measured here: one assumed"
    )
    return f"""# Cost model

Generated by `make bench` on {date} from the AWS requests counted per task
(docs/benchmarks.md) and AWS prices as of {PRICES_AS_OF}: re-run it after a change, check
the prices before relying on them. Cost per **1 million image tasks**, GPU time excluded.

| service | per task | per 1 M tasks |
|---|---|---|
{rows}
| **total** | | **${cost["total"]:,.2f}** |

{PREVIOUS_COST}

**Against the GPU**: a {GENERATION_SECONDS:.0f} s generation on a {GPU_NAME} at
${PRICE["gpu_per_hour"]}/h costs ${cost["gpu"]:,.0f} per million images; the queue around it
is **{cost["share_of_gpu"]:.1%}** of that. The dispatcher's Lambda time is spent waiting
for the GPU's answer (a synchronous call); one invocation runs several calls at once
(`CallsPerWorker`), so a billed second carries as many calls as `make bench`'s fleet run
measured ({sharing_text}); an endpoint that called back would remove the wait, at the price
of a callback route. {memory_text}

**How clients wait changes it** (per 1 M tasks):

| client | extra cost |
|---|---|
| polls once a second for 15 s (the seed's client) | {polling}: API, Lambda, a read each |
| a webhook per task | ${cost["webhook"]:,.2f}: queue send, delivery Lambda, log write |
| push over WebSocket | ${cost["push"]:,.2f}: a message, a query; + connection minutes |
| `Prefer: wait=15` on submit | ~${prefer_wait:,.2f}: the submit Lambda stays up 15 s |

{progress_markdown(bench)}

Assumptions (not measurable on moto): {MEMORY_GB} GB functions on arm64; handler times
{HANDLER_SECONDS}; {TASK_WRITE_WRU} WRU per tasks-table write (the table and its two
indexes); {IMAGE_MB} MB images kept {image_retention_days()} day(s) (each more day
${IMAGE_MB / 1024 * PRICE["s3_per_gb_month"] / 30 * 1e6:,.2f}); {LOG_KB_PER_TASK:.0f} KB of logs
per task; X-Ray's default sampling; stream and dispatcher invocations per task as measured
under load (the stream's batches aggregate their writes). Fixed monthly costs (custom
metrics $0.30 each, alarms $0.10 each, the dashboard $3, Secrets Manager $0.40) are not per
task and are left out.
{callback_markdown(sync_dispatcher_dollars=_dispatcher_wait(cost))}"""
