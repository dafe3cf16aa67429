"""The local stack: template.yaml run on one machine, no AWS account and no Docker.

moto server (the AWS APIs) -> provisioning from the template -> a worker pool per function
-> the HTTP API gateway with the JWT authorizer, the SQS event source mappings, the
schedules and the S3 -> EventBridge rules the template declares -> stand-in GPU endpoints
(images) and speech endpoints (PocketSphinx), and, as an option, the real Cog server
(`--cog-server`: a `cog` image endpoint of capacity 1).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import requests

from gpuqueue_local.dynamodb_streams import DynamoDbStreamSource
from gpuqueue_local.emulator_iam import EmulatorIam
from gpuqueue_local.event_source_mapping import SqsEventSource
from gpuqueue_local.gateway import ApiGateway, JwtAuthorizer, Route, fetch_ok, jwks_url
from gpuqueue_local.lambda_runtime import FunctionRuntime, FunctionSpec, InvocationLog
from gpuqueue_local.moto_iam import AUDIT_FILE_ENV
from gpuqueue_local.moto_server import AUDIT_DIR_ENV, IAM_SWITCH_ENV
from gpuqueue_local.provision import LocalStack, provision
from gpuqueue_local.s3_events import (
    DEFAULT_POLL_INTERVAL_S,
    S3EventBridge,
    eventbridge_buckets,
    template_rules,
)
from gpuqueue_local.scheduler import Schedule, rate_seconds
from gpuqueue_local.standins.cog_runner import CogServer, readable_log_line
from gpuqueue_local.standins.comfyui_server import DEFAULT_CHECKPOINT, ComfyUIKnobs, ComfyUIServer
from gpuqueue_local.standins.image_server import ImageServer, ImageServerKnobs
from gpuqueue_local.standins.speech_server import SpeechServer
from gpuqueue_local.template import REPO_ROOT, function_property, load_template, resources_of_type
from gpuqueue_local.websocket_gateway import WebSocketGateway, websocket_api

HOST = "127.0.0.1"
DEMO_USER = "demo"
DEMO_PASSWORD = "try-gpuqueue-1"  # noqa: S105 - the documented local demo account
# An operator: member of the template's AdminGroup, so it may use /api/v1/admin.
ADMIN_USER = "admin"
ADMIN_PASSWORD = "operate-gpuqueue-1"  # noqa: S105 - the documented local operator account
ADMIN_GROUP = "admin"
# Same template, same Cognito ids on every start (and in events/env.local.json).
MOTO_DETERMINISTIC_IDS = {
    "MOTO_COGNITO_IDP_USER_POOL_ID_STRATEGY": "HASH",
    "MOTO_COGNITO_IDP_USER_POOL_CLIENT_ID_STRATEGY": "HASH",
}
# Ports events/env.local.json expects for `sam local invoke` (make up UP_ARGS=--docker-ports).
DOCKER_MOTO_PORT = 5000
IMAGE_PORT_BASE_FOR_DOCKER = 8001
SPEECH_PORT_BASE_FOR_DOCKER = 8101
# The template parameters the stand-ins' URLs go into (comma-separated).
IMAGE_URLS_PARAMETER = "ImageEndpointUrls"
# The JSON list of endpoints the URL list cannot declare: stand-ins registered with another
# protocol than openai, and the Cog server (each entry names its protocol).
IMAGE_ENDPOINTS_PARAMETER = "ImageEndpoints"
IMAGE_STANDIN_PROTOCOLS = ("openai", "a1111")
COG_ENDPOINT_ID = "image-cog-local"
SPEECH_URLS_PARAMETER = "SpeechEndpointUrls"
# Every client of the local stack comes from 127.0.0.1: per-source limits sized for one
# address on the internet would make the e2e suite, `make load` and the bench one client.
# `--param` still sets them (the per-username limit stays at the template's default).
LOCAL_PARAMETERS = {
    "LoginSourceFailureBurst": "100000",
    "LoginSourceFailureRefillSeconds": "1",
    "RegisterSourceBurst": "100000",
    "RegisterSourceRefillSeconds": "1",
}
# Lambda scales an SQS mapping without MaximumConcurrency to 1,000; locally we stop earlier.
LOCAL_MAX_CONCURRENCY = 32
# The shortest health-check period a speed-up compresses to (see local_function_env).
MIN_HEALTH_PERIOD_SECONDS = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class StackOptions:
    port: int = 3000
    moto_port: int = 0
    ws_port: int = 0  # the WebSocket API (0 = a free port); its management API: a free port
    image_servers: int = 2
    image_latency_s: float = 1.0
    image_capacity: int = 0
    image_port_base: int = 0  # 0 = free ports
    # The wire protocol the image stand-ins are registered with: they speak the OpenAI
    # images API and A1111's (txt2img, progress, interrupt) alike.
    image_protocol: str = "openai"
    # Stand-in ComfyUI servers, registered as comfyui image endpoints running ComfyUI's
    # default txt2img graph; a prompt samples for image_latency_s.
    comfyui_servers: int = 0
    speech_servers: int = 1
    speech_port_base: int = 0  # 0 = free ports
    # The real Cog server (.venv-cog) as a `cog` image endpoint of capacity 1; its model's
    # seconds per step (None: the model's default, 0.1 s).
    cog_server: bool = False
    cog_step_delay_s: float | None = None
    cog_callback: bool = False  # the Cog endpoint in callback mode (`callback: true`)
    # Each invocation's function, start and end (epoch seconds), one JSON line each.
    invocation_log: Path | None = None
    s3_events: bool = True  # emulate the template's S3 -> EventBridge rules
    s3_poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    schedule_speedup: float = 1.0
    parameters: dict[str, str] = field(default_factory=dict)
    function_env: dict[str, str] = field(default_factory=dict)
    stack_name: str = "gpuqueue-local"
    region: str = "us-east-1"
    demo_user: bool = True
    state_file: Path | None = None
    quiet: bool = False
    raw_logs: bool = False
    warm_all: bool = False  # a warm worker for every function, not only event-driven ones
    # Each function runs with only its role's permissions, enforced by moto (off: moto's
    # default, every caller may do anything).
    iam: bool = True


class LogPrinter:
    """Function logs with the function's name as prefix; Powertools JSON made readable."""

    def __init__(self, *, quiet: bool = False, raw: bool = False) -> None:
        self._lock = threading.Lock()
        self._quiet = quiet
        self._raw = raw

    def system(self, message: str) -> None:
        self._emit(f"[local] {message}")

    def function(self, name: str, line: str) -> None:
        if not self._raw and line.startswith("{"):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict) and "_aws" in record:
                # An EMF metrics blob: show the figures, not the envelope.
                names = [
                    m["Name"]
                    for d in record["_aws"].get("CloudWatchMetrics", [])
                    for m in d.get("Metrics", [])
                ]
                line = "METRIC  " + " ".join(f"{n}={record.get(n)}" for n in names)
            elif isinstance(record, dict) and "message" in record:
                keys = ("task_id", "endpoint_id", "attempt", "error", "reason", "delay_seconds")
                extra = " ".join(f"{k}={record[k]}" for k in keys if k in record)
                line = f"{record.get('level', 'INFO'):<7} {record['message']} {extra}".rstrip()
        self._emit(f"[{name}] {line}")

    def _emit(self, text: str) -> None:
        if self._quiet:
            return
        with self._lock:
            print(text, flush=True)


def _audit_file(port: int) -> dict[str, str]:
    """Where this stack's moto records its authorization decisions, if a run collects them."""
    folder = os.environ.get(AUDIT_DIR_ENV)
    if not folder:
        return {}
    return {AUDIT_FILE_ENV: str(Path(folder) / f"stack-{os.getpid()}-{port}.jsonl")}


class MotoServer:
    def __init__(self, port: int, *, iam: bool = True) -> None:
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        self._process = subprocess.Popen(
            # moto as strict as AWS: atomic conditional writes, IAM per caller (moto_server).
            [sys.executable, "-m", "gpuqueue_local.moto_server", "-H", HOST, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={
                **os.environ,
                **MOTO_DETERMINISTIC_IDS,
                IAM_SWITCH_ENV: "on" if iam else "off",
                **_audit_file(self.port),
                "PYTHONPATH": os.pathsep.join(
                    [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
                ),
            },
        )

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self._process.returncode}")
            if fetch_ok(f"{self.url}/moto-api/", timeout=1.0):
                return
            time.sleep(0.1)
        raise TimeoutError("moto server did not start")

    def stop(self) -> None:
        self._process.terminate()
        try:
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()


def _int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def function_specs(
    stack: LocalStack, extra_env: dict[str, str], local_urls: dict[str, str] | None = None
) -> dict[str, FunctionSpec]:
    """`local_urls`: env vars the template resolves to AWS URLs that have a local stand-in
    (see `local_aws_urls`), set only for the functions that declare them."""
    template = stack.template
    layers = resources_of_type(template, "AWS::Serverless::LayerVersion")
    specs = {}
    for logical_id in stack.functions():
        props = template["Resources"][logical_id]["Properties"]
        layer_dirs = []
        for layer in function_property(template, logical_id, "Layers") or []:
            name = layer.get("Ref") if isinstance(layer, dict) else None
            if name in layers:
                layer_dirs.append(REPO_ROOT / layers[name]["Properties"]["ContentUri"])
        reserved = props.get("ReservedConcurrentExecutions")
        specs[logical_id] = FunctionSpec(
            logical_id=logical_id,
            handler=props["Handler"],
            code_dir=REPO_ROOT / props["CodeUri"],
            layer_dirs=tuple(layer_dirs),
            env={
                **_with_local_urls(stack.function_env(logical_id), local_urls),
                **extra_env,
                **_role_keys(stack, logical_id),
            },
            timeout_seconds=float(function_property(template, logical_id, "Timeout") or 3),
            memory_mb=int(
                stack.resolver.resolve(function_property(template, logical_id, "MemorySize") or 128)
            ),
            reserved_concurrency=_int(stack.resolver.resolve(reserved)) if reserved else None,
        )
    return specs


def _role_keys(stack: LocalStack, logical_id: str) -> dict[str, str]:
    """The function's execution role's keys (Lambda's session credentials); none without IAM."""
    identity = stack.identities.get(logical_id)
    return identity.environment() if identity else {}


def _with_local_urls(env: dict[str, str], local_urls: dict[str, str] | None) -> dict[str, str]:
    return {**env, **{k: v for k, v in (local_urls or {}).items() if k in env}}


def local_aws_urls(
    stack: LocalStack,
    moto_url: str,
    websocket: WebSocketGateway | None,
    api_url: str | None = None,
) -> dict[str, str]:
    """The one place AWS URLs in function env vars become local ones: the user pool's JWKS
    (served by moto), the WebSocket API's URL and management endpoint (the local
    gateway's), and the HTTP API's URL GPU servers call back (the local gateway's)."""
    urls = {}
    if api_url is not None:
        urls["GPU_CALLBACK_BASE_URL"] = api_url
    if "UserPool" in stack.resolver.refs:
        urls["JWKS_URL"] = jwks_url(moto_url, stack.ref("UserPool"))
    if websocket is not None:
        urls["WEBSOCKET_URL"] = websocket.url
        urls["WEBSOCKET_MANAGEMENT_URL"] = websocket.management_url
    return urls


def _events(template: dict[str, Any], logical_id: str, kind: str) -> list[dict[str, Any]]:
    events = template["Resources"][logical_id]["Properties"].get("Events", {})
    return [e.get("Properties", {}) for e in events.values() if e.get("Type") == kind]


def http_routes(stack: LocalStack, moto_url: str) -> list[Route]:
    template = stack.template
    apis = resources_of_type(template, "AWS::Serverless::HttpApi")
    routes = []
    for logical_id in stack.functions():
        for props in _events(template, logical_id, "HttpApi"):
            api_id = (props.get("ApiId") or {}).get("Ref")
            api = apis.get(api_id, {}).get("Properties", {}) if api_id else {}
            auth = api.get("Auth", {})
            event_auth = props.get("Auth", {})
            name = event_auth.get("Authorizer", auth.get("DefaultAuthorizer"))
            authorizer = None
            if name and name != "NONE":
                spec = auth["Authorizers"][name]
                jwt_config = stack.resolver.resolve(spec["JwtConfiguration"])
                pool_id = str(jwt_config["issuer"]).rsplit("/", 1)[-1]
                authorizer = JwtAuthorizer(
                    issuer=str(jwt_config["issuer"]),
                    audience=tuple(str(a) for a in jwt_config.get("audience", [])),
                    scopes=tuple(spec.get("AuthorizationScopes", [])),
                    jwks_url=jwks_url(moto_url, pool_id),
                )
            method = str(props.get("Method", "ANY")).upper()
            routes.append(
                Route(
                    method="ANY" if method in ("ANY", "X-AMAZON-APIGATEWAY-ANY-METHOD") else method,
                    path=str(props.get("Path", "$default")),
                    function=logical_id,
                    authorizer=authorizer,
                    scopes=tuple(event_auth.get("AuthorizationScopes", [])),
                )
            )
    return routes


def _queue_logical_id(stack: LocalStack, queue_ref: Any) -> str:
    if isinstance(queue_ref, dict) and "Fn::GetAtt" in queue_ref:
        target = queue_ref["Fn::GetAtt"]
        return str(target[0] if isinstance(target, list) else str(target).split(".")[0])
    raise ValueError(f"unsupported SQS event Queue value: {queue_ref!r}")


def sqs_event_sources(
    stack: LocalStack, functions: dict[str, FunctionRuntime], log: LogPrinter, region: str
) -> list[SqsEventSource]:
    sources = []
    for logical_id in stack.functions():
        runtime = functions[logical_id]
        for props in _events(stack.template, logical_id, "SQS"):
            queue = _queue_logical_id(stack, props["Queue"])
            scaling = stack.resolver.resolve(props.get("ScalingConfig", {}))
            maximum = _int(scaling.get("MaximumConcurrency")) or LOCAL_MAX_CONCURRENCY
            sources.append(
                SqsEventSource(
                    function=runtime,
                    queue_url=stack.ref(queue),
                    queue_arn=stack.resolver.get_att(queue, "Arn"),
                    batch_size=int(stack.resolver.resolve(props.get("BatchSize", 10))),
                    batching_window_seconds=float(
                        stack.resolver.resolve(props.get("MaximumBatchingWindowInSeconds", 0))
                    ),
                    # MaximumConcurrency, bounded by reserved concurrency.
                    concurrency=min(maximum, runtime.concurrency),
                    region=region,
                    log=_prefixed(log, logical_id),
                    credentials=_role_keys(stack, logical_id),
                )
            )
    return sources


def stream_event_sources(
    stack: LocalStack, functions: dict[str, FunctionRuntime], log: LogPrinter, region: str
) -> list[DynamoDbStreamSource]:
    """The template's `Type: DynamoDB` events (Stream: !GetAtt Table.StreamArn), not started."""
    sources = []
    for logical_id in stack.functions():
        for props in _events(stack.template, logical_id, "DynamoDB"):
            resolved = stack.resolver.resolve(props)
            if str(resolved.get("Enabled", True)).lower() == "false":
                continue
            sources.append(
                DynamoDbStreamSource.from_event_properties(
                    resolved,
                    functions[logical_id],
                    function_name=logical_id,
                    region=region,
                    log=_prefixed(log, logical_id),
                    credentials=_role_keys(stack, logical_id),
                )
            )
    return sources


def _prefixed(log: LogPrinter, name: str) -> Callable[[str], None]:
    def emit(message: str) -> None:
        log.function(name, f"[esm] {message}")

    return emit


# Event sources that invoke a function on their own (pollers, streams, schedules).
_EVENT_DRIVEN_TYPES = frozenset({"SQS", "DynamoDB", "Schedule", "ScheduleV2"})


def _event_driven(stack: LocalStack, logical_id: str) -> bool:
    events = stack.template["Resources"][logical_id]["Properties"].get("Events") or {}
    return any(event.get("Type") in _EVENT_DRIVEN_TYPES for event in events.values())


def scheduled_rules(
    stack: LocalStack, functions: dict[str, FunctionRuntime], log: LogPrinter, speedup: float
) -> list[Schedule]:
    schedules = []
    for logical_id in stack.functions():
        events = stack.template["Resources"][logical_id]["Properties"].get("Events", {})
        for event_name, event in events.items():
            if event.get("Type") not in ("Schedule", "ScheduleV2"):
                continue
            props = event.get("Properties", {})
            if props.get("Enabled") is False or props.get("State") == "DISABLED":
                continue
            expression = props.get("Schedule") or props.get("ScheduleExpression")
            schedules.append(
                Schedule(
                    function=functions[logical_id],
                    rule_name=f"{stack.name}-{logical_id}{event_name}",
                    period_seconds=rate_seconds(str(expression)),
                    speedup=speedup,
                    log=log.system,
                )
            )
    return schedules


@dataclass
class RunningStack:
    options: StackOptions
    log: LogPrinter
    moto: MotoServer
    stack: LocalStack
    image_servers: list[ImageServer]
    functions: dict[str, FunctionRuntime]
    gateway: ApiGateway
    sources: list[SqsEventSource]
    schedules: list[Schedule]
    api_url: str
    speech_servers: list[SpeechServer] = field(default_factory=list)
    cog_server: CogServer | None = None
    comfyui_servers: list[ComfyUIServer] = field(default_factory=list)
    s3_events: S3EventBridge | None = None
    stream_sources: list[DynamoDbStreamSource] = field(default_factory=list)
    websocket: WebSocketGateway | None = None
    demo_token: str | None = None
    admin_token: str | None = None
    _servers: list[Any] = field(default_factory=list)
    _ready: threading.Event = field(default_factory=threading.Event)

    def state(self) -> dict[str, Any]:
        return {
            "api_url": self.api_url,
            "moto_url": self.moto.url,
            "stack_name": self.stack.name,
            "region": self.stack.region,
            "outputs": {
                **self.stack.outputs(),
                "ApiUrl": self.api_url,
                **self._websocket_outputs(),
            },
            "websocket_url": self.websocket.url if self.websocket else None,
            "websocket_management_url": self.websocket.management_url if self.websocket else None,
            "resources": dict(self.stack.resolver.refs),
            "image_servers": [s.url for s in self.image_servers],
            "image_protocol": self.options.image_protocol,
            "speech_servers": [s.url for s in self.speech_servers],
            "cog_server": self.cog_server.url if self.cog_server else None,
            "comfyui_servers": [s.url for s in self.comfyui_servers],
            "demo_user": {
                "username": DEMO_USER,
                "password": DEMO_PASSWORD,
                "token": self.demo_token,
            },
            "admin_user": {
                "username": ADMIN_USER,
                "password": ADMIN_PASSWORD,
                "token": self.admin_token,
            },
            "functions": sorted(self.functions),
        }

    def __post_init__(self) -> None:
        """The gateways answer 503 until the stack is ready."""
        self.gateway.ready = self._ready.is_set
        if self.websocket is not None:
            self.websocket.functions = self.functions
            self.websocket.ready = self._ready.is_set

    def _websocket_outputs(self) -> dict[str, str]:
        return {"WebSocketUrl": self.websocket.url} if self.websocket else {}

    def start_event_sources(self) -> None:
        """The SQS event source mappings, then the DynamoDB Streams ones."""
        for source in self.sources:
            source.start()
        for stream_source in self.stream_sources:
            stream_source.start()

    def stop(self) -> None:
        for schedule in self.schedules:
            schedule.stop()
        # Nothing new is invoked, then the workers go (an invocation under way ends at once,
        # as in a deleted stack), then the pollers are joined: a stop takes no longer than
        # its slowest poll, not the sum of every invocation under way.
        for source in self.sources:
            source.stopping()
        for stream_source in self.stream_sources:
            stream_source.stopping()
        for runtime in self.functions.values():
            runtime.stop()
        for source in self.sources:
            source.stop()
        for stream_source in self.stream_sources:
            stream_source.stop()
        if self.s3_events is not None:
            self.s3_events.stop()
        for server in self._servers:
            server.shutdown()
        if self.websocket is not None:
            self.websocket.stop()
        for runtime in self.functions.values():
            runtime.stop()
        self._stop_gpu_servers()
        self.moto.stop()

    def _stop_gpu_servers(self) -> None:
        for image_server in self.image_servers:
            image_server.stop()
        for speech_server in self.speech_servers:
            speech_server.stop()
        for comfyui_server in self.comfyui_servers:
            comfyui_server.stop()
        if self.cog_server is not None:
            self.cog_server.stop()


def _start_image_servers(options: StackOptions) -> list[ImageServer]:
    servers = []
    for index in range(options.image_servers):
        server = ImageServer(
            port=options.image_port_base + index if options.image_port_base else 0,
            knobs=ImageServerKnobs(
                latency_s=options.image_latency_s, capacity=options.image_capacity
            ),
        )
        server.start()
        servers.append(server)
    return servers


def _start_comfyui_servers(options: StackOptions) -> list[ComfyUIServer]:
    servers = []
    for _ in range(options.comfyui_servers):
        server = ComfyUIServer(knobs=ComfyUIKnobs(latency_s=options.image_latency_s))
        server.start()
        servers.append(server)
    return servers


def _start_speech_servers(options: StackOptions) -> list[SpeechServer]:
    servers = []
    for index in range(options.speech_servers):
        # Serves at once; the recogniser loads its model (~0.5 s) in a background thread.
        server = SpeechServer(
            port=options.speech_port_base + index if options.speech_port_base else 0
        )
        server.start()
        servers.append(server)
    return servers


def _start_cog_server(options: StackOptions, log: LogPrinter) -> CogServer | None:
    """The real Cog server, READY (a second or so), or None when not asked for."""
    if not options.cog_server:
        return None
    server = CogServer(
        step_delay_s=options.cog_step_delay_s,
        log=lambda line: log.function("cog", readable_log_line(line)),
    )
    server.start()
    log.system(f"Cog server (coglet) ready on {server.url}")
    return server


def _endpoint_parameters(
    template: dict[str, Any],
    image_servers: list[ImageServer],
    speech_servers: list[SpeechServer],
    *,
    image_protocol: str = "openai",
    cog_server: CogServer | None = None,
    comfyui_servers: list[ComfyUIServer] | None = None,
    cog_callback: bool = False,
) -> dict[str, str]:
    """The stand-ins' URLs as the template parameters the checker registers them from.

    SpeechEndpointUrls only when the template declares it: an older template has no speech
    fleet, and its stand-ins then run unregistered. The Cog server goes in ImageEndpoints,
    with its protocol and its one slot.
    """
    declared: list[dict[str, Any]] = []
    if image_protocol == "openai":
        parameters = {IMAGE_URLS_PARAMETER: ",".join(s.url for s in image_servers)}
    else:
        # The URL list is protocol openai only; the JSON list names each one's protocol.
        declared = [{"url": s.url, "protocol": image_protocol} for s in image_servers]
        parameters = {IMAGE_URLS_PARAMETER: ""}
    if cog_server is not None:
        cog_entry: dict[str, Any] = {
            "id": COG_ENDPOINT_ID,
            "url": cog_server.url,
            "protocol": "cog",
            "capacity": 1,
        }
        if cog_callback:
            cog_entry["callback"] = True
        declared.append(cog_entry)
    # One prompt at a time on a ComfyUI: capacity 1 keeps the queue ours (gpu-servers.md).
    declared += [
        {
            "id": f"comfyui-{index}",
            "url": server.url,
            "protocol": "comfyui",
            "workflow": {"checkpoint": DEFAULT_CHECKPOINT},
        }
        for index, server in enumerate(comfyui_servers or [])
    ]
    if declared:
        parameters[IMAGE_ENDPOINTS_PARAMETER] = json.dumps(declared)
    if speech_servers and SPEECH_URLS_PARAMETER in template.get("Parameters", {}):
        parameters[SPEECH_URLS_PARAMETER] = ",".join(s.url for s in speech_servers)
    return parameters


def s3_event_bridge(
    stack: LocalStack,
    functions: dict[str, FunctionRuntime],
    log: LogPrinter,
    *,
    interval_s: float = DEFAULT_POLL_INTERVAL_S,
    endpoint_url: str | None = None,
) -> S3EventBridge | None:
    """The template's S3 "Object Created" EventBridge rules, emulated (None when none)."""
    rules = template_rules(stack, functions)
    if not rules:
        return None
    return S3EventBridge(
        rules=rules,
        region=stack.region,
        interval_s=interval_s,
        endpoint_url=endpoint_url,
        enabled_buckets=eventbridge_buckets(stack),
        log=log.system,
        function_log=log.function,
    )


def _start_websocket_gateway(
    stack: LocalStack, options: StackOptions, log: LogPrinter
) -> WebSocketGateway | None:
    """The template's WebSocket API, listening (its functions are attached later)."""
    api = websocket_api(stack.template)
    if api is None:
        return None
    websocket = WebSocketGateway(
        api,
        log=log.system,
        api_id=stack.ref(api.logical_id),
        region=stack.region,
        iam=EmulatorIam(stack.identities) if stack.identities else None,
    )
    websocket.start(HOST, options.ws_port)
    return websocket


def _write_atomically(path: Path, text: str) -> None:
    """A reader polling for the file never sees it half written."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def local_function_env(options: StackOptions, stack: LocalStack) -> dict[str, str]:
    """What the local stack adds to every function's environment (`--env` wins)."""
    env = dict(options.function_env)
    # Webhook receivers on this machine (http, loopback) are fine locally; in the cloud the
    # SSRF guard refuses them (the flag is not a template parameter, so it cannot be set there).
    env.setdefault("WEBHOOK_ALLOW_LOOPBACK", "true")
    speedup = options.schedule_speedup
    if speedup != 1:
        # Compress the health-check clock with the schedules, so staleness keeps its meaning;
        # webhook retries (30 s base) likewise. Not below MIN_HEALTH_PERIOD_SECONDS: a health
        # row is fresh for 3 periods, and a loaded 2-core machine delays a checker run by
        # seconds (at 1.5 s a period, a healthy endpoint went stale mid-test: 503).
        period = float(stack.resolver.parameters.get("HealthCheckPeriodSeconds", 30))
        compressed = max(period / speedup, MIN_HEALTH_PERIOD_SECONDS)
        env.setdefault("HEALTH_CHECK_PERIOD_SECONDS", str(compressed))
        env.setdefault("SCHEDULE_PERIOD_SECONDS", str(60 / speedup))
        env.setdefault("WEBHOOK_RETRY_BASE_SECONDS", str(30 / speedup))
    return env


def start_stack(options: StackOptions) -> RunningStack:
    """The stack, up: moto and the GPU stand-ins; the template provisioned into moto; the
    functions' runtimes warming while the gateways start listening (they answer 503 until
    ready); then the schedules, the stand-ins registered, the event sources and the demo users."""
    started = time.monotonic()
    log = LogPrinter(quiet=options.quiet, raw=options.raw_logs)
    moto = MotoServer(options.moto_port, iam=options.iam)
    image_servers = _start_image_servers(options)
    speech_servers = _start_speech_servers(options)
    cog_server = _start_cog_server(options, log)
    comfyui_servers = _start_comfyui_servers(options)
    moto.wait_ready()
    _use_moto(moto, options.region)

    template = load_template()
    endpoint_parameters = _endpoint_parameters(
        template,
        image_servers,
        speech_servers,
        image_protocol=options.image_protocol,
        cog_server=cog_server,
        comfyui_servers=comfyui_servers,
        cog_callback=options.cog_callback,
    )
    speech_registered = SPEECH_URLS_PARAMETER in endpoint_parameters
    stack = _provision_into_moto(options, template, endpoint_parameters, moto, log)
    if speech_servers and not speech_registered:
        log.system(f"the template has no {SPEECH_URLS_PARAMETER}: speech stand-ins unregistered")

    websocket = _start_websocket_gateway(stack, options, log)
    # Known before the functions start: GPU servers in callback mode are told to call it.
    api_port = options.port or free_port()
    api_url = f"http://{HOST}:{api_port}"
    functions = _function_runtimes(options, stack, moto, websocket, log, api_url=api_url)
    sources = sqs_event_sources(stack, functions, log, options.region)
    warmers = _start_warming(options, stack, functions, sources)
    gateway = ApiGateway(routes=http_routes(stack, moto.url), functions=functions)
    http_server = gateway.serve(HOST, api_port)
    running = RunningStack(
        options=options,
        log=log,
        moto=moto,
        stack=stack,
        image_servers=image_servers,
        functions=functions,
        gateway=gateway,
        sources=sources,
        schedules=scheduled_rules(stack, functions, log, options.schedule_speedup),
        api_url=api_url,
        speech_servers=speech_servers,
        cog_server=cog_server,
        comfyui_servers=comfyui_servers,
        s3_events=(
            s3_event_bridge(
                stack, functions, log, interval_s=options.s3_poll_interval_s, endpoint_url=moto.url
            )
            if options.s3_events
            else None
        ),
        stream_sources=stream_event_sources(stack, functions, log, options.region),
        websocket=websocket,
        _servers=[http_server],
    )

    for thread in warmers:
        thread.join(timeout=60)
    for schedule in running.schedules:
        schedule.start(fire_now=True)
    _register_stand_ins(running, speech_registered=speech_registered)
    running.start_event_sources()
    if running.s3_events is not None:
        running.s3_events.start()
    if options.demo_user:
        running.demo_token = _demo_token(running.api_url)
        running.admin_token = _admin_token(running.api_url, stack)
    running._ready.set()
    if options.state_file:
        _write_atomically(options.state_file, json.dumps(running.state(), indent=2))
    log.system(f"ready in {time.monotonic() - started:.1f}s")
    return running


def _use_moto(moto: MotoServer, region: str) -> None:
    """This process's own AWS calls (provisioning, readiness, the demo users) go to moto."""
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": moto.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": region,
        }
    )


def _provision_into_moto(
    options: StackOptions,
    template: dict[str, Any],
    endpoint_parameters: dict[str, str],
    moto: MotoServer,
    log: LogPrinter,
) -> LocalStack:
    """The template's resources, created in moto. Parameters: the local defaults the template
    declares, then the stand-ins' URLs, then `--param` (each wins over the one before)."""
    stack = provision(
        stack_name=options.stack_name,
        region=options.region,
        parameters={
            **{k: v for k, v in LOCAL_PARAMETERS.items() if k in template.get("Parameters", {})},
            **endpoint_parameters,
            **options.parameters,
        },
        template=template,
        identities=options.iam,
    )
    log.system(f"moto on {moto.url}; provisioned {len(stack.resolver.refs)} resources")
    return stack


def _function_runtimes(
    options: StackOptions,
    stack: LocalStack,
    moto: MotoServer,
    websocket: WebSocketGateway | None,
    log: LogPrinter,
    *,
    api_url: str | None = None,
) -> dict[str, FunctionRuntime]:
    """A runtime per function of the template, its environment as Lambda's plus moto's URL."""
    base_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),  # noqa: S108 - only a fallback HOME
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO_ROOT / "local"),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": options.region,
        "AWS_REGION": options.region,
        "AWS_ENDPOINT_URL": moto.url,
        "POWERTOOLS_TRACE_DISABLED": "true",  # no X-Ray daemon locally
    }
    extra_env = local_function_env(options, stack)
    specs = function_specs(stack, extra_env, local_aws_urls(stack, moto.url, websocket, api_url))
    record = InvocationLog(options.invocation_log) if options.invocation_log else None
    return {
        name: FunctionRuntime(
            spec,
            base_env,
            log=log.function,
            max_concurrency=LOCAL_MAX_CONCURRENCY,
            on_invocation=record,
        )
        for name, spec in specs.items()
    }


def _start_warming(
    options: StackOptions,
    stack: LocalStack,
    functions: dict[str, FunctionRuntime],
    sources: list[SqsEventSource],
) -> list[threading.Thread]:
    """Threads starting each function's warm workers (the stack is ready once they are done).

    Queue consumers get a warm worker per concurrent batch (Lambda keeps them warm under
    steady load); every other function starts with one.
    Functions only requests reach (HTTP, WebSocket, S3 events) start cold, as on Lambda:
    each costs a second of imports, and a stack is ready sooner without the ones a run
    never calls (`--warm-all` warms them too).
    """
    warm_counts = {
        name: 1 if options.warm_all or _event_driven(stack, name) else 0 for name in functions
    }
    for source in sources:
        name = source.function.spec.logical_id
        warm_counts[name] = max(warm_counts[name], source.concurrency)
    warmers = [
        threading.Thread(target=functions[name].warm, args=(count,), daemon=True)
        for name, count in warm_counts.items()
    ]
    for thread in warmers:
        thread.start()
    return warmers


def _register_stand_ins(running: RunningStack, *, speech_registered: bool) -> None:
    """Wait (a while) for the first health check to find the stand-ins routable, then give the
    image ones their capacity."""
    expected = {
        "image": len(running.image_servers)
        + len(running.comfyui_servers)
        + (running.cog_server is not None),
        "speech": len(running.speech_servers) * speech_registered,
    }
    if not _wait_for_endpoints(running.stack, expected):
        running.log.system(f"not all stand-ins are healthy yet (wanted {expected}); going on")
    if running.options.image_capacity:
        _register_capacity(running.stack, "image", running.options.image_capacity)


def _wait_for_endpoints(stack: LocalStack, expected: dict[str, int], timeout: float = 20.0) -> bool:
    """Ready means the first health check has registered the stand-ins as routable.

    `expected` is the number of healthy endpoint rows wanted per kind ("image", "speech").
    The checker's run may go on probing (twice a minute); readiness does not wait for that.
    """
    table = boto3.resource("dynamodb").Table(stack.ref("EndpointsTable"))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = table.scan().get("Items", [])  # a handful of rows; local only
        healthy: dict[str, int] = {}
        for row in rows:
            if row.get("healthy") is True and row.get("row_type", "endpoint") == "endpoint":
                kind = str(row.get("kind", "image"))
                healthy[kind] = healthy.get(kind, 0) + 1
        if all(healthy.get(kind, 0) >= count for kind, count in expected.items()):
            return True
        time.sleep(0.1)
    return False


def _register_capacity(stack: LocalStack, kind: str, capacity: int) -> None:
    """Tell the registry the stand-ins' capacity (declared endpoints start at 1 slot; an
    operator sets the real figure, as `gpuqueue endpoints put --capacity` does)."""
    table = boto3.resource("dynamodb").Table(stack.ref("EndpointsTable"))
    for row in table.scan().get("Items", []):  # a handful of rows; local only
        if (
            row.get("row_type", "endpoint") == "endpoint"
            and row.get("kind") == kind
            and row.get("protocol") != "cog"  # Cog's one slot is what it declared
        ):
            table.update_item(
                Key={"endpoint_id": row["endpoint_id"]},
                UpdateExpression="SET #c = :c",
                ExpressionAttributeNames={"#c": "capacity"},
                ExpressionAttributeValues={":c": capacity},
            )


def _demo_token(api_url: str, username: str = DEMO_USER, password: str = DEMO_PASSWORD) -> str:
    credentials = {"username": username, "password": password}
    for route in ("/register", "/login"):
        response = requests.post(f"{api_url}{route}", json=credentials, timeout=30)
        if response.ok:
            return str(response.json()["token"])
    raise RuntimeError(
        f"could not create the user {username}: {response.status_code} {response.text}"
    )


def _admin_token(api_url: str, stack: LocalStack) -> str:
    """The operator: registered through the API, put in the admin group, logged in again."""
    _demo_token(api_url, ADMIN_USER, ADMIN_PASSWORD)
    cognito = boto3.client("cognito-idp", region_name=stack.region)  # AWS_ENDPOINT_URL: moto
    cognito.admin_add_user_to_group(
        UserPoolId=stack.ref("UserPool"), Username=ADMIN_USER, GroupName=ADMIN_GROUP
    )
    # A token carries the groups its user had at login: the first one has none.
    response = requests.post(
        f"{api_url}/login",
        json={"username": ADMIN_USER, "password": ADMIN_PASSWORD},
        timeout=30,
    )
    if not response.ok:
        raise RuntimeError(f"could not log the admin in: {response.status_code} {response.text}")
    return str(response.json()["token"])


def banner(running: RunningStack) -> str:
    token = running.demo_token or "<run: gpuqueue login>"
    admin_token = running.admin_token or "<run: gpuqueue login -u admin>"
    api = running.api_url
    speech: list[str] = []
    if running.speech_servers and any(
        r.path == "/api/v1/speech/transcribe" for r in running.gateway.routes
    ):
        speech = [
            f'  curl -s -X POST {api}/api/v1/speech/transcribe -H "Authorization: Bearer $TOKEN" '
            "-F file=@hello.wav",
            f"  .venv/bin/gpuqueue --api-url {api} transcribe hello.wav",
        ]
    # Finished tasks pushed over WebSocket: connect with the token in the query string.
    push = [f"  push           {running.websocket.url}?token=$TOKEN"] if running.websocket else []
    return "\n".join(
        [
            "",
            "gpuqueue is running locally (Ctrl-C stops everything)",
            f"  API            {api}",
            f"  demo user      {DEMO_USER} / {DEMO_PASSWORD}",
            f"  token          {token}",
            f"  admin user     {ADMIN_USER} / {ADMIN_PASSWORD} (group admin: /api/v1/admin)",
            f"  GPU stand-ins  {', '.join(s.url for s in running.image_servers) or 'none'}",
            f"  speech         {', '.join(s.url for s in running.speech_servers) or 'none'}",
            *([f"  Cog server     {running.cog_server.url}"] if running.cog_server else []),
            f"  AWS (moto)     {running.moto.url}",
            *push,
            "",
            "Try it:",
            f"  export TOKEN={token}",
            f'  curl -s -X POST {api}/api/v1/image/async -H "Authorization: Bearer $TOKEN" '
            "-H 'Content-Type: application/json' -d '{\"prompt\": \"a red fox in the snow\"}'",
            f"  .venv/bin/gpuqueue --api-url {api} login -u {DEMO_USER} -p {DEMO_PASSWORD}",
            f'  .venv/bin/gpuqueue --api-url {api} generate "a red fox" --wait -o fox.png',
            *speech,
            f"  export ADMIN_TOKEN={admin_token}",
            f"  .venv/bin/gpuqueue --api-url {api} --token $ADMIN_TOKEN endpoints list",
            "",
        ]
    )


def wait_forever(stop: Callable[[], bool]) -> None:
    while not stop():
        time.sleep(0.5)
