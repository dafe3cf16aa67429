"""Integration harness: handlers in-process against a moto server built from template.yaml."""

from __future__ import annotations

import base64
import contextlib
import functools
import importlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol, cast
from urllib.parse import urlencode

import boto3
import pytest
import requests
from moto.server import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    ThreadedMotoServer,
    create_backend_app,
)
from werkzeug.serving import make_server

import function_credentials
from gpuqueue import aws_clients
from gpuqueue_local import moto_atomic, moto_cognito, moto_iam
from gpuqueue_local.dynamodb_streams import StreamReader, streams_client
from gpuqueue_local.event_sources import (
    dynamodb_stream_event,
    filter_records,
    settle_batch,
    sqs_event,
)
from gpuqueue_local.moto_server import AUDIT_DIR_ENV
from gpuqueue_local.provision import LocalStack, provision
from gpuqueue_local.standins.image_server import ImageServer, ImageServerKnobs
from gpuqueue_local.standins.speech_server import SpeechServer, SpeechServerKnobs
from gpuqueue_local.template import load_template
from gpuqueue_testing import FakeLambdaContext, User, load_event
from template_functions import (
    FUNCTION_BY_HANDLER_MODULE,
    HANDLER_MODULE_BY_FUNCTION,
    HANDLER_MODULES,
    SEPARATE_ENV,
    sqs_consumer,
)

LANE_QUEUES = {"normal": "TaskQueue", "high": "PriorityQueue"}


class _UntracedRequestHandler(MotoRequestHandler):
    def handle(self) -> None:
        # Each request runs on its own thread, which coverage would trace: moto is not ours
        # to measure, and tracing its frames doubled the integration tests' time.
        sys.settrace(None)
        super().handle()


class UntracedMotoServer(ThreadedMotoServer):
    """moto in this process (the IAM listeners need it here), its request threads untraced."""

    def _server_entry(self) -> None:
        app = DomainDispatcherApplication(create_backend_app)
        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=_UntracedRequestHandler
        )
        self._server_ready_event.set()
        # Stopping waits out one poll: 0.5 s by default, every session (a mutant's run too).
        self._server.serve_forever(poll_interval=0.05)


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per moto call otherwise
    moto_atomic.install()  # conditional writes atomic, as in DynamoDB
    moto_cognito.install()  # passwords up to Cognito's 256 characters
    moto_iam.install()  # each function only what its role grants, as on AWS
    audit_dir = os.environ.get(AUDIT_DIR_ENV)
    if audit_dir:  # every decision, for the least-privilege report (docs/permissions.md)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        moto_iam.add_listener(moto_iam.AuditFile(f"{audit_dir}/integration-{worker}.jsonl"))
    function_credentials.install()  # handlers here sign with their function's keys
    server = UntracedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@functools.cache
def _operator_session() -> boto3.Session:
    # One per process: a new Session loads the service models again (~0.3 s a test).
    return boto3.Session(
        aws_access_key_id=moto_iam.ADMIN_ACCESS_KEY_ID,
        aws_secret_access_key=moto_iam.ADMIN_SECRET_ACCESS_KEY,
        region_name="us-east-1",
    )


@functools.cache
def _operator_dynamodb(moto_url: str) -> Any:
    return _operator_session().resource("dynamodb", endpoint_url=moto_url)


@pytest.fixture
def operator_dynamodb_client(moto_url: str) -> Any:
    """A plain DynamoDB client signing as the operator (not a function)."""
    moto_iam.seed_admin()
    return _operator_session().client("dynamodb", endpoint_url=moto_url)


@pytest.fixture
def template_table(
    moto_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[str], Any]]:
    """Makes a fresh, empty table from template.yaml's definition of a logical id: one table and
    no stack, for tests of the domain classes on their own. Deleted after the test."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    created: list[Any] = []
    # The operator's own session (never the process's default one, whose keys another test
    # may have changed) and its key re-seeded: these tests are about the table, not IAM.
    moto_iam.seed_admin()
    dynamodb = _operator_dynamodb(moto_url)

    def make(logical_id: str) -> Any:
        props = load_template()["Resources"][logical_id]["Properties"]
        indexes = {k: v for k, v in props.items() if k == "GlobalSecondaryIndexes"}
        table = dynamodb.create_table(
            TableName=f"{logical_id}-{uuid.uuid4().hex[:8]}",
            AttributeDefinitions=props["AttributeDefinitions"],
            KeySchema=props["KeySchema"],
            BillingMode="PAY_PER_REQUEST",
            **indexes,
        )
        created.append(table)
        return table

    yield make
    for table in created:
        table.delete()


@pytest.fixture(autouse=True)
def operator_identity() -> None:
    """Each test starts signing as the operator: a function's keys a thread was left with
    would name an IAM user the next stack's reset removed (InvalidClientTokenId)."""
    function_credentials.act_as_operator()


@pytest.fixture(autouse=True)
def refused_calls(request: pytest.FixtureRequest) -> Iterator[list[moto_iam.Decision]]:
    """Fails a test in which moto refused a function's call (AccessDenied): its role lacks a
    grant it needs on AWS. A test that provokes a refusal on purpose takes this fixture and
    empties the list once it has checked it."""
    refused: list[moto_iam.Decision] = []

    def listen(decision: moto_iam.Decision) -> None:
        if not decision.allowed:
            refused.append(decision)

    moto_iam.add_listener(listen)
    yield refused
    moto_iam.remove_listener(listen)
    if refused:
        calls = "; ".join(f"{d.principal}: {d.action} on {d.resource}" for d in refused)
        pytest.fail(f"AWS would refuse these calls (the role lacks the grant): {calls}")


class _Cached(Protocol):
    def cache_clear(self) -> None: ...


def _clear_caches(module: ModuleType) -> None:
    """Forgets what the module's functools.cache'd functions (marked by their cache_info and
    cache_clear) built on a first call: a container's clients and settings."""
    for value in vars(module).values():
        if callable(value) and not isinstance(value, type) and hasattr(value, "cache_info"):
            cast(_Cached, value).cache_clear()


def _reset_handler_caches() -> None:
    aws_clients.reset()
    for name in HANDLER_MODULES:
        _clear_caches(importlib.import_module(name))


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Harness:
    """One provisioned stack plus ways to call its functions like API Gateway and the ESM do."""

    stack: LocalStack
    image_servers: list[ImageServer] = field(default_factory=list)
    speech_servers: list[SpeechServer] = field(default_factory=list)
    # The tasks table's stream, read from the stack's start (TRIM_HORIZON).
    task_stream: StreamReader | None = None

    # --- identities: a handler runs with its function's role -----------------------------

    def function_of(self, module: str) -> str:
        """The template's function whose handler lives in `module` (the normal lane's for
        the dispatcher, which two functions share)."""
        if module not in FUNCTION_BY_HANDLER_MODULE:
            raise KeyError(f"no function in template.yaml has its handler in {module}")
        return FUNCTION_BY_HANDLER_MODULE[module]

    @contextlib.contextmanager
    def acting_as(self, logical_id: str) -> Iterator[None]:
        """This thread's AWS calls sign with the function's keys (its role's permissions)."""
        identity = self.stack.identities[logical_id]
        with function_credentials.acting_as(identity.access_key_id, identity.secret_access_key):
            yield

    # --- API Gateway (payload format 2.0, the JWT authorizer's claims) -------------------

    def call(
        self,
        module: str,
        method: str,
        path: str,
        *,
        route: str | None = None,
        body: Any = None,
        raw_body: str | None = None,
        binary_body: bytes | None = None,
        query: dict[str, str] | None = None,
        path_params: dict[str, str] | None = None,
        user: User | None = None,
        headers: dict[str, str] | None = None,
        source_ip: str | None = None,
    ) -> Response:
        sample = "auth_login" if user is None else "submit_image"
        event = load_event(sample)
        event["routeKey"] = event["requestContext"]["routeKey"] = f"{method} {route or path}"
        event["rawPath"] = event["requestContext"]["http"]["path"] = path
        event["requestContext"]["http"]["method"] = method
        event["rawQueryString"] = urlencode(query or {})
        event.pop("queryStringParameters", None)
        if query:
            event["queryStringParameters"] = query
        event.pop("pathParameters", None)
        if path_params:
            event["pathParameters"] = path_params
        event.pop("body", None)
        event["isBase64Encoded"] = False
        if binary_body is not None:
            # API Gateway hands a binary payload to Lambda base64-encoded.
            event["body"] = base64.b64encode(binary_body).decode()
            event["isBase64Encoded"] = True
        elif raw_body is not None:
            event["body"] = raw_body
        elif body is not None:
            event["body"] = json.dumps(body)
        event["headers"].update(headers or {})
        if source_ip is not None:
            event["requestContext"]["http"]["sourceIp"] = source_ip
        if user is not None:
            claims = event["requestContext"]["authorizer"]["jwt"]["claims"]
            claims.update({"sub": user.sub, "username": user.username})
            if user.groups:
                claims["cognito:groups"] = "[" + " ".join(user.groups) + "]"
        handler = importlib.import_module(module).lambda_handler
        with self.acting_as(self.function_of(module)):
            result = handler(event, FakeLambdaContext(function_name=module))
        body_text = result.get("body") or ""
        if result.get("isBase64Encoded"):
            body_text = base64.b64decode(body_text).decode()
        return Response(
            status=int(result["statusCode"]),
            headers={k.lower(): v for k, v in (result.get("headers") or {}).items()},
            body=body_text,
        )

    def audio_uploaded(self, key: str, size: int) -> dict[str, Any]:
        """S3's "Object Created" for `key`, as EventBridge hands it to UploadFunction."""
        event = load_event("upload_audio_uploaded")
        bucket = self.stack.ref("ImagesBucket")
        event["resources"] = [f"arn:aws:s3:::{bucket}"]
        event["detail"]["bucket"]["name"] = bucket
        event["detail"]["object"].update({"key": key, "size": size})
        handler = importlib.import_module("upload_handler").lambda_handler
        with self.acting_as("UploadFunction"):
            result: dict[str, Any] = handler(event, FakeLambdaContext(function_name="upload"))
        return result

    def submit(self, user: User, body: dict[str, Any] | None = None) -> Response:
        return self.call(
            "submit_handler",
            "POST",
            "/api/v1/image/async",
            body=body if body is not None else {"prompt": "a red fox", "width": 128, "height": 96},
            user=user,
        )

    def cancel(self, user: User, task_id: str) -> Response:
        return self.call(
            "tasks_handler",
            "DELETE",
            f"/api/v1/tasks/{task_id}",
            route="/api/v1/tasks/{task_id}",
            path_params={"task_id": task_id},
            user=user,
        )

    def get_task(self, user: User, task_id: str, headers: dict[str, str] | None = None) -> Response:
        return self.call(
            "tasks_handler",
            "GET",
            f"/api/v1/tasks/{task_id}",
            route="/api/v1/tasks/{task_id}",
            path_params={"task_id": task_id},
            user=user,
            headers=headers,
        )

    def task_row(self, task_id: str) -> dict[str, Any]:
        table = boto3.resource("dynamodb").Table(self.stack.ref("TasksTable"))
        item: dict[str, Any] = table.get_item(Key={"task_id": task_id})["Item"]
        return item

    # --- Scheduler and SQS event source mapping ----------------------------------------

    def run_checker(self) -> dict[str, Any]:
        handler = importlib.import_module("checker_handler").lambda_handler
        with self.acting_as("CheckerFunction"):
            result: dict[str, Any] = handler(
                load_event("checker_schedule"), FakeLambdaContext("checker")
            )
        return result

    def run_reaper(self) -> dict[str, int]:
        handler = importlib.import_module("reaper_handler").lambda_handler
        with self.acting_as("ReaperFunction"):
            result: dict[str, int] = handler(
                load_event("reaper_schedule"), FakeLambdaContext("reaper")
            )
        return result

    def queue_url(self, lane: str = "normal") -> str:
        return self.stack.ref(LANE_QUEUES[lane])

    def receive(self, max_messages: int = 1, *, lane: str = "normal") -> list[Any]:
        sqs = boto3.client("sqs")
        return list(
            sqs.receive_message(
                QueueUrl=self.queue_url(lane),
                MaxNumberOfMessages=max_messages,
                WaitTimeSeconds=0,
                AttributeNames=["All"],
            ).get("Messages", [])
        )

    def deliver(
        self, messages: list[Any], *, timeout_seconds: float = 180.0, lane: str = "normal"
    ) -> list[str]:
        """Invoke the lane's dispatcher with these messages and settle them as the ESM would."""
        queue = LANE_QUEUES[lane]
        event = sqs_event(
            messages, queue_arn=self.stack.resolver.get_att(queue, "Arn"), region="us-east-1"
        )
        function = sqs_consumer(queue)
        module = importlib.import_module(HANDLER_MODULE_BY_FUNCTION[function])
        context = FakeLambdaContext("dispatcher", timeout_seconds=timeout_seconds)
        with self.acting_as(function):
            if function not in SEPARATE_ENV:
                response = module.lambda_handler(event, context)
            else:
                # The priority lane's function: the same code with its own environment.
                with pytest.MonkeyPatch.context() as patch:
                    for name, value in self.stack.function_env(function).items():
                        patch.setenv(name, value)
                    _clear_caches(module)
                    try:
                        response = module.lambda_handler(event, context)
                    finally:
                        _clear_caches(module)
            # The event source mapping deletes what succeeded with the function's role.
            return settle_batch(boto3.client("sqs"), self.queue_url(lane), messages, response)

    def call_sqs_function(self, module: str, queue: str, messages: list[Any]) -> dict[str, Any]:
        """Invoke a queue consumer with these messages (from the queue `queue`, a logical id)
        and settle them as the ESM would; its partial batch response."""
        event = sqs_event(
            messages, queue_arn=self.stack.resolver.get_att(queue, "Arn"), region="us-east-1"
        )
        handler = importlib.import_module(module).lambda_handler
        with self.acting_as(self.function_of(module)):
            response: dict[str, Any] = handler(event, FakeLambdaContext(module))
            settle_batch(boto3.client("sqs"), self.stack.ref(queue), messages, response)
        return response

    def pump_task_events(self) -> int:
        """Hand TaskEventsFunction the tasks-stream records written since the last pump,
        filtered by the template's FilterCriteria, as its event source mapping would.
        Returns the number of records delivered."""
        if self.task_stream is None:
            arn = self.stack.resolver.get_att("TasksTable", "StreamArn")
            self.task_stream = StreamReader(streams_client(), arn, "TRIM_HORIZON")
        records = self.task_stream.read()
        props = self.stack.template["Resources"]["TaskEventsFunction"]["Properties"]
        filters = props["Events"]["TaskTransitions"]["Properties"].get("FilterCriteria")
        arn = self.task_stream.stream_arn
        passed = filter_records(filters, records, stream_arn=arn, region="us-east-1")
        if passed:
            handler = importlib.import_module("task_events_handler").lambda_handler
            with self.acting_as("TaskEventsFunction"):
                response = handler(
                    dynamodb_stream_event(passed, arn, "us-east-1"),
                    FakeLambdaContext("task_events"),
                )
            assert not response.get("batchItemFailures"), response
        return len(passed)

    def deliver_webhooks(self, *, max_invocations: int = 30) -> int:
        """Run WebhookFunction on the webhook queue's messages until none is left visible
        (retries come back at once in tests: WEBHOOK_RETRY_BASE_SECONDS=0). Bounded."""
        sqs = boto3.client("sqs")
        url = self.stack.ref("WebhookQueue")
        invocations = 0
        while invocations < max_invocations:
            messages = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=1, WaitTimeSeconds=0, AttributeNames=["All"]
            ).get("Messages", [])
            if not messages:
                return invocations
            self.call_sqs_function("webhook_handler", "WebhookQueue", messages)
            invocations += 1
        raise AssertionError(f"webhook queue not drained after {invocations} invocations")

    def finish_and_notify(self) -> None:
        """Dispatch everything queued, then let the stream and the webhook queue catch up."""
        self.drain()
        self.pump_task_events()
        self.deliver_webhooks()

    def active_tasks(self, user: User) -> set[str]:
        """The task ids counted against the user's active-task share."""
        table = boto3.resource("dynamodb").Table(self.stack.ref("LimitsTable"))
        item = table.get_item(Key={"pk": f"active#{user.sub}"}).get("Item") or {}
        return {str(t) for t in item.get("active", set())}

    def drain(self, *, max_invocations: int = 50, deadline_seconds: float = 90.0) -> int:
        """Poll and dispatch until the queue has nothing visible or in flight (bounded)."""
        invocations = 0
        deadline = time.monotonic() + deadline_seconds
        while invocations < max_invocations and time.monotonic() < deadline:
            messages = self.receive()
            if messages:
                self.deliver(messages)
                invocations += 1
                continue
            attrs = boto3.client("sqs").get_queue_attributes(
                QueueUrl=self.queue_url(), AttributeNames=["All"]
            )["Attributes"]
            if all(
                int(attrs[k]) == 0
                for k in (
                    "ApproximateNumberOfMessages",
                    "ApproximateNumberOfMessagesNotVisible",
                    "ApproximateNumberOfMessagesDelayed",
                )
            ):
                return invocations
            time.sleep(0.05)  # a retry delay is running out; poll again
        raise AssertionError(f"queue not drained after {invocations} invocations")


@pytest.fixture
def make_stack(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Harness]]:
    servers: list[ImageServer] = []
    speech_servers: list[SpeechServer] = []

    def make(
        *,
        endpoints: list[ImageServerKnobs] | None = None,
        speech: list[SpeechServerKnobs] | None = None,
        parameters: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        stack_name: str | None = None,
    ) -> Harness:
        requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
        monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
        for knobs in endpoints if endpoints is not None else [ImageServerKnobs()]:
            server = ImageServer(knobs=knobs)
            server.start()
            servers.append(server)
        started_speech = []
        for speech_knobs in speech or []:
            speech_server = SpeechServer(knobs=speech_knobs)
            speech_server.start()
            speech_servers.append(speech_server)
            started_speech.append(speech_server)
        params = {
            "ImageEndpointUrls": ",".join(s.url for s in servers),
            "SpeechEndpointUrls": ",".join(s.url for s in started_speech),
            **(parameters or {}),
        }
        # A test may name the stack: names under <stack>/gpu/ depend on it.
        name = stack_name or f"it-{uuid.uuid4().hex[:6]}"
        # moto runs in this process: the functions' IAM users are written to its backend
        # directly (the same users and keys, ~50 fewer requests a stack).
        stack = provision(stack_name=name, parameters=params, iam=moto_iam.InProcessIam())
        merged: dict[str, tuple[str, str]] = {}
        for function in stack.functions():
            if function in SEPARATE_ENV:
                continue
            for name, value in stack.function_env(function).items():
                if name in merged and merged[name][1] != value:
                    raise AssertionError(
                        f"{function} and {merged[name][0]} disagree on {name}: the harness "
                        "runs their handler modules in one process with one environment"
                    )
                merged[name] = (function, value)
                monkeypatch.setenv(name, value)
        # Retries come back at once in tests; production backs off (template defaults).
        monkeypatch.setenv("RETRY_BASE_DELAY_SECONDS", "0")
        monkeypatch.setenv("NO_ENDPOINT_DELAY_SECONDS", "0")
        monkeypatch.setenv("NO_SLOT_DELAY_SECONDS", "0")
        # One probe round per checker run (production probes twice a minute).
        monkeypatch.setenv("SCHEDULE_PERIOD_SECONDS", "30")
        # Webhook receivers in tests listen on 127.0.0.1 (the local stack's flag); a failed
        # delivery comes back at once.
        monkeypatch.setenv("WEBHOOK_ALLOW_LOOPBACK", "true")
        monkeypatch.setenv("WEBHOOK_RETRY_BASE_SECONDS", "0")
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        _reset_handler_caches()
        return Harness(stack=stack, image_servers=list(servers), speech_servers=started_speech)

    yield make
    for server in servers:
        server.stop()
    for speech_server in speech_servers:
        speech_server.stop()
    _reset_handler_caches()


@pytest.fixture
def alice() -> User:
    return User(sub=str(uuid.uuid4()), username="alice")


@pytest.fixture
def bob() -> User:
    return User(sub=str(uuid.uuid4()), username="bob")


@pytest.fixture
def operator() -> User:
    """A member of the Cognito group `admin` (the template's AdminGroup)."""
    return User(sub=str(uuid.uuid4()), username="ops", groups=("admin",))


@pytest.fixture
def vip() -> User:
    """A member of the Cognito group `vip` (the template's VipGroup): the priority lane."""
    return User(sub=str(uuid.uuid4()), username="vip", groups=("vip",))
