"""Real GPU servers: endpoints declared with protocol, capacity and credentials in the stack
parameters (or through the admin API), keys in Secrets Manager or SSM Parameter Store, and
stand-ins that refuse calls without the key. Handlers in-process on moto."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest

from gpuqueue.fleet.endpoint_registry import EndpointRegistry
from gpuqueue.models import CircuitState, Endpoint, TaskKind
from gpuqueue_local.standins.image_server import ImageServer, ImageServerKnobs
from gpuqueue_local.standins.speech_server import SpeechServer, SpeechServerKnobs
from gpuqueue_local.template import RuleViolation

KEY = "gpu-key-3f9d1c7e55"
NEW_KEY = "gpu-key-rotated-81aa40"
WRONG_KEY = "gpu-key-wrong-000000"
ADMIN_ITEM = "/api/v1/admin/endpoints/{endpoint_id}"


@pytest.fixture
def stack_name() -> str:
    return f"itc-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def image_server() -> Iterator[Callable[..., ImageServer]]:
    started: list[ImageServer] = []

    def start(**knobs: Any) -> ImageServer:
        server = ImageServer(knobs=ImageServerKnobs(**knobs))
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def output(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> Iterator[Callable[[], str]]:
    """Everything our functions print or log, at DEBUG (more than Lambda's INFO): their
    JSON lines on stdout and the log records themselves."""
    caplog.set_level(logging.DEBUG, logger="gpuqueue")
    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "gpuqueue"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [(logger, logger.level) for logger in loggers]
    handlers = [
        (h, h.stream)
        for h in logging.getLogger("gpuqueue").handlers
        if isinstance(h, logging.StreamHandler)
    ]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    for handler, _ in handlers:
        handler.stream = sys.stdout  # Powertools' handler keeps the stdout it first saw

    def read() -> str:
        captured = capsys.readouterr()
        records = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
        return "\n".join((captured.out, captured.err, caplog.text, records))

    yield read
    for logger, level in levels:
        logger.setLevel(level)
    for handler, stream in handlers:
        handler.stream = stream


def create_secret(name: str, value: str) -> None:
    boto3.client("secretsmanager").create_secret(Name=name, SecretString=value)


def put_secret(name: str, value: str) -> None:
    boto3.client("secretsmanager").put_secret_value(SecretId=name, SecretString=value)


def registry(h: Any) -> EndpointRegistry:
    return EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))


def row(h: Any, endpoint_id: str) -> Endpoint:
    found = registry(h).get(endpoint_id)
    assert found is not None, endpoint_id
    return found


def bearer(secret: str) -> dict[str, str]:
    return {"type": "bearer", "secret": secret}


def declared_stack(
    make_stack: Callable[..., Any],
    stack_name: str,
    image: list[dict[str, Any]] | None = None,
    speech: list[dict[str, Any]] | None = None,
) -> Any:
    parameters = {"ImageEndpoints": json.dumps(image or [])}
    if speech is not None:
        parameters["SpeechEndpoints"] = json.dumps(speech)
    return make_stack(endpoints=[], parameters=parameters, stack_name=stack_name)


def redeploy_checker(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """A deploy that changes the checker's parameters: new values, a new container."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    checker = importlib.import_module("checker_handler")
    checker.settings.cache_clear()
    checker.checker.cache_clear()


def admin_put(h: Any, user: Any, endpoint_id: str, body: dict[str, Any]) -> Any:
    return h.call(
        "admin_handler",
        "PUT",
        f"/api/v1/admin/endpoints/{endpoint_id}",
        route=ADMIN_ITEM,
        path_params={"endpoint_id": endpoint_id},
        body=body,
        user=user,
    )


def finished(h: Any, user: Any, task_id: str) -> dict[str, Any]:
    view: dict[str, Any] = h.get_task(user, task_id).json()
    return view


# --- declared in the parameter ----------------------------------------------------------------


def test_a_credentialed_a1111_endpoint_declared_in_the_parameter_serves_tasks(
    make_stack, image_server, stack_name, alice
):
    server = image_server(auth_token=KEY)
    secret = f"{stack_name}/gpu/sd-1"
    entry = {
        "id": "sd-1",
        "url": server.url,
        "protocol": "a1111",
        "capacity": 2,
        "weight": 3,
        "credentials": bearer(secret),
    }
    h = declared_stack(make_stack, stack_name, [entry])
    create_secret(secret, KEY)

    assert h.run_checker() == {"checked": 1, "healthy": 1}
    endpoint = row(h, "sd-1")
    assert (endpoint.protocol.value, endpoint.capacity, endpoint.weight) == ("a1111", 2, 3)
    assert endpoint.credentials is not None
    assert endpoint.credentials.secret == secret
    assert endpoint.source == "parameter"

    task_id = h.submit(alice).json()["task_id"]
    h.drain()

    assert finished(h, alice, task_id)["status"] == "DONE"
    assert (server.stats()["calls"], server.stats()["refused"]) == (1, 0)


def test_an_api_key_header_from_parameter_store_works_for_the_openai_protocol(
    make_stack, image_server, stack_name, alice
):
    server = image_server(auth_token=KEY, auth_header="X-Api-Key")
    parameter = f"/{stack_name}/gpu/images"
    credentials = {"type": "header", "header": "X-Api-Key", "parameter": parameter}
    h = declared_stack(
        make_stack, stack_name, [{"id": "img", "url": server.url, "credentials": credentials}]
    )
    boto3.client("ssm").put_parameter(Name=parameter, Value=KEY, Type="SecureString")

    assert h.run_checker()["healthy"] == 1
    task_id = h.submit(alice).json()["task_id"]
    h.drain()

    assert finished(h, alice, task_id)["status"] == "DONE"
    assert server.stats()["refused"] == 0


def test_a_wrong_key_makes_the_endpoint_unhealthy_saying_where_the_key_is(
    make_stack, image_server, stack_name
):
    server = image_server(auth_token=KEY)
    secret = f"{stack_name}/gpu/a"
    h = declared_stack(
        make_stack, stack_name, [{"id": "a", "url": server.url, "credentials": bearer(secret)}]
    )
    create_secret(secret, WRONG_KEY)

    assert h.run_checker() == {"checked": 1, "healthy": 0}
    endpoint = row(h, "a")
    assert endpoint.healthy is False
    assert endpoint.last_error is not None
    assert "refused its credentials (HTTP 401)" in endpoint.last_error
    assert f"secret {secret}" in endpoint.last_error
    assert WRONG_KEY not in endpoint.last_error
    assert server.stats()["refused"] == 1


def test_an_endpoint_that_wants_a_key_and_was_given_none_is_unhealthy(make_stack, image_server):
    server = image_server(auth_token=KEY)
    h = make_stack(endpoints=[], parameters={"ImageEndpointUrls": server.url})

    assert h.run_checker()["healthy"] == 0
    (endpoint,) = registry(h).endpoints(TaskKind.IMAGE)
    assert endpoint.last_error is not None
    assert "wants credentials (HTTP 401)" in endpoint.last_error


def test_a_key_that_stops_working_ends_the_task_failed_with_a_readable_error(
    make_stack, image_server, stack_name, alice
):
    server = image_server(auth_token=KEY)
    secret = f"{stack_name}/gpu/a"
    h = declared_stack(
        make_stack, stack_name, [{"id": "a", "url": server.url, "credentials": bearer(secret)}]
    )
    create_secret(secret, KEY)
    assert h.run_checker()["healthy"] == 1
    put_secret(secret, WRONG_KEY)  # someone stored the wrong key

    task_id = h.submit(alice).json()["task_id"]
    h.drain()

    task = finished(h, alice, task_id)
    assert task["status"] == "FAILED"
    assert task["attempt"] == 3  # MaxAttempts: another endpoint might have taken it
    assert "endpoint a refused its credentials (HTTP 401)" in task["error"]
    assert f"check that secret {secret} holds the key" in task["error"]
    assert WRONG_KEY not in task["error"]
    assert (server.stats()["calls"], server.stats()["refused"]) == (0, 3)
    # Three refusals in a row: the circuit is open, no more work goes there.
    assert row(h, "a").circuit is CircuitState.OPEN


def test_a_deleted_secret_ends_the_task_failed_saying_it_cannot_be_read(
    make_stack, image_server, stack_name, alice
):
    server = image_server(auth_token=KEY)
    secret = f"{stack_name}/gpu/a"
    h = declared_stack(
        make_stack, stack_name, [{"id": "a", "url": server.url, "credentials": bearer(secret)}]
    )
    create_secret(secret, KEY)
    assert h.run_checker()["healthy"] == 1
    boto3.client("secretsmanager").delete_secret(SecretId=secret, ForceDeleteWithoutRecovery=True)

    task_id = h.submit(alice).json()["task_id"]
    h.drain()

    task = finished(h, alice, task_id)
    assert task["status"] == "FAILED"
    assert f"secret {secret} could not be read: ResourceNotFoundException" in task["error"]
    assert server.stats()["calls"] == 0  # never called without its key


def test_a_rotated_key_is_used_from_the_first_refusal_not_after_the_cache_lapses(
    make_stack, image_server, stack_name, alice
):
    server = image_server(auth_token=KEY)
    secret = f"{stack_name}/gpu/a"
    h = declared_stack(
        make_stack, stack_name, [{"id": "a", "url": server.url, "credentials": bearer(secret)}]
    )
    create_secret(secret, KEY)
    h.run_checker()
    first = h.submit(alice).json()["task_id"]
    h.drain()  # the dispatcher now holds KEY in its cache (5 minutes)
    assert finished(h, alice, first)["status"] == "DONE"

    # Rotation: the server and the secret both move to the new key.
    server.set_knobs({"auth_token": NEW_KEY})
    put_secret(secret, NEW_KEY)
    second = h.submit(alice).json()["task_id"]
    h.drain()

    task = finished(h, alice, second)
    assert task["status"] == "DONE"
    assert task["attempt"] == 2  # the cached key was refused once, then the new one read
    assert server.stats()["refused"] == 1


def test_the_key_is_never_in_a_log_or_an_api_answer(  # noqa: PLR0917 - fixtures
    make_stack, image_server, stack_name, alice, operator, output
):
    server = image_server(auth_token=KEY)
    secret = f"{stack_name}/gpu/a"
    h = declared_stack(
        make_stack, stack_name, [{"id": "a", "url": server.url, "credentials": bearer(secret)}]
    )
    create_secret(secret, KEY)
    answers = []

    h.run_checker()
    done = h.submit(alice).json()["task_id"]
    h.drain()
    put_secret(secret, WRONG_KEY)
    server.set_knobs({"auth_token": NEW_KEY})
    failed = h.submit(alice).json()["task_id"]
    h.drain()
    h.run_checker()
    answers.append(h.call("admin_handler", "GET", "/api/v1/admin/endpoints", user=operator).body)
    for task_id in (done, failed):
        answers.append(h.get_task(alice, task_id).body)
    logs = output()

    assert finished(h, alice, done)["status"] == "DONE"
    assert finished(h, alice, failed)["status"] == "FAILED"
    assert "endpoint declaration" not in logs  # nothing refused: a quiet, valid run
    assert "refused its credentials" in logs  # the failures were logged...
    for key in (KEY, WRONG_KEY, NEW_KEY):
        assert key not in logs  # ...without any key
        assert all(key not in answer for answer in answers)
    assert secret in answers[0]  # operators see where the key is kept


# --- declarations: refused entries, capacity and weight ------------------------------------


def test_a_bad_entry_is_logged_naming_it_and_the_good_ones_still_serve(
    make_stack, image_server, stack_name, alice, caplog
):
    server = image_server()
    entries = [
        {"id": "good", "url": server.url},
        {"id": "too-big", "url": "http://10.0.0.9:8000", "capacity": 0},
        {"id": "elsewhere", "url": "http://10.0.0.8", "credentials": bearer("prod/gpu/x")},
    ]
    h = declared_stack(make_stack, stack_name, entries)

    assert h.run_checker() == {"checked": 1, "healthy": 1, "refused": 2}
    refused = [r for r in caplog.records if r.getMessage() == "endpoint declaration refused"]
    assert [
        (r.parameter, r.entry, r.endpoint_id, r.field)  # type: ignore[attr-defined]
        for r in refused
    ] == [
        ("ImageEndpoints", 1, "too-big", "capacity"),
        ("ImageEndpoints", 2, "elsewhere", "credentials.secret"),
    ]
    assert {r.levelname for r in refused} == {"ERROR"}
    assert f"name it {stack_name}/gpu/<name>" in refused[1].error  # type: ignore[attr-defined]
    task_id = h.submit(alice).json()["task_id"]
    h.drain()
    assert finished(h, alice, task_id)["status"] == "DONE"


def test_while_an_entry_is_refused_no_declared_endpoint_is_removed(
    make_stack, image_server, stack_name, monkeypatch
):
    first, second = image_server(), image_server()
    entries = [{"id": "one", "url": first.url}, {"id": "two", "url": second.url}]
    h = declared_stack(make_stack, stack_name, entries)
    h.run_checker()

    # A deploy drops "two" and breaks "one" (a typo): both stay as they were.
    broken = [{"id": "one", "url": first.url, "capacity": "four"}]
    redeploy_checker(monkeypatch, IMAGE_ENDPOINTS=json.dumps(broken))
    assert h.run_checker()["refused"] == 1
    assert {e.endpoint_id for e in registry(h).endpoints(TaskKind.IMAGE)} == {"one", "two"}

    # Fixed: "two" goes.
    redeploy_checker(monkeypatch, IMAGE_ENDPOINTS=json.dumps([{"id": "one", "url": first.url}]))
    assert h.run_checker() == {"checked": 1, "healthy": 1}
    assert [e.endpoint_id for e in registry(h).endpoints(TaskKind.IMAGE)] == ["one"]


def test_a_declared_capacity_applies_when_the_deploy_changes_it_and_a_resize_holds_until_then(
    make_stack, image_server, stack_name, operator, monkeypatch
):
    server = image_server()
    h = declared_stack(make_stack, stack_name, [{"id": "a", "url": server.url, "capacity": 2}])
    h.run_checker()
    assert row(h, "a").capacity == 2

    # An operator resizes it: the next runs (same parameter) keep the operator's figure.
    resized = admin_put(h, operator, "a", {"url": server.url, "kind": "image", "capacity": 1})
    assert resized.status == 200, resized.body
    h.run_checker()
    assert row(h, "a").capacity == 1

    # A deploy that changes the declared figure applies it.
    redeploy_checker(
        monkeypatch, IMAGE_ENDPOINTS=json.dumps([{"id": "a", "url": server.url, "capacity": 3}])
    )
    h.run_checker()
    assert row(h, "a").capacity == 3


# --- the admin API --------------------------------------------------------------------------


def test_an_operator_adds_a_credentialed_endpoint_that_the_checker_probes_with_its_key(
    make_stack, image_server, stack_name, operator, alice
):
    server = image_server(auth_token=KEY)
    h = make_stack(endpoints=[], stack_name=stack_name)
    secret = f"{stack_name}/gpu/gpu-7"
    create_secret(secret, KEY)
    body = {"url": server.url, "kind": "image", "capacity": 2, "credentials": bearer(secret)}

    outside = admin_put(h, operator, "gpu-7", {**body, "credentials": bearer("prod/gpu/k")})
    assert outside.status == 400
    assert outside.json()["field"] == "credentials.secret"
    assert f"name it {stack_name}/gpu/<name>" in outside.json()["error"]
    typo = admin_put(
        h, operator, "gpu-7", {**body, "credentials": {"type": "bearer", "secert": secret}}
    )
    assert typo.status == 400

    added = admin_put(h, operator, "gpu-7", body)
    assert added.status == 200, added.body
    assert added.json()["credentials"] == {
        "type": "bearer",
        "secret": secret,
        "parameter": None,
        "header": None,
    }
    assert h.run_checker() == {"checked": 1, "healthy": 1}
    task_id = h.submit(alice).json()["task_id"]
    h.drain()
    assert finished(h, alice, task_id)["status"] == "DONE"

    # Dropping the reference: calls go out bare again, and the server refuses them.
    assert admin_put(h, operator, "gpu-7", {**body, "credentials": None}).status == 200
    assert row(h, "gpu-7").credentials is None
    assert h.run_checker()["healthy"] == 0


def test_a_declared_endpoints_credentials_change_only_in_the_parameter(
    make_stack, image_server, stack_name, operator
):
    server = image_server(auth_token=KEY)
    secret = f"{stack_name}/gpu/a"
    h = declared_stack(
        make_stack, stack_name, [{"id": "a", "url": server.url, "credentials": bearer(secret)}]
    )
    create_secret(secret, KEY)
    h.run_checker()
    other = bearer(f"{stack_name}/gpu/b")

    changed = admin_put(
        h, operator, "a", {"url": server.url, "kind": "image", "credentials": other}
    )
    kept = admin_put(
        h,
        operator,
        "a",
        {"url": server.url, "kind": "image", "credentials": bearer(secret), "weight": 5},
    )

    assert changed.status == 409
    assert changed.json()["field"] == "credentials"
    assert kept.status == 200, kept.body
    assert row(h, "a").weight == 5


# --- speech ---------------------------------------------------------------------------------


def test_a_credentialed_speech_endpoint_transcribes_and_a_wrong_key_is_a_502_saying_why(
    make_stack, stack_name, alice
):
    server = SpeechServer(knobs=SpeechServerKnobs(auth_token=KEY))
    server.start()
    try:
        secret = f"{stack_name}/gpu/whisper"
        entry = {"id": "whisper", "url": server.url, "credentials": bearer(secret)}
        h = declared_stack(make_stack, stack_name, speech=[entry])
        create_secret(secret, KEY)
        assert h.run_checker() == {"checked": 1, "healthy": 1}

        def transcribe() -> Any:
            return h.call(
                "speech_handler",
                "POST",
                "/api/v1/speech/pcm",
                binary_body=b"\x00\x01" * 16000,
                query={"sample_rate": "16000"},
                user=alice,
                headers={"content-type": "application/octet-stream"},
            )

        heard = transcribe()
        assert heard.status == 200, heard.body
        server.set_knobs({"auth_token": NEW_KEY})  # the server moved on; the secret did not

        refused = transcribe()
        assert refused.status == 502
        assert refused.json()["code"] == "UPSTREAM_FAILED"
        assert "refused its credentials (HTTP 401)" in refused.json()["error"]
        assert NEW_KEY not in refused.body
        assert KEY not in refused.body
    finally:
        server.stop()


# --- private GPU servers --------------------------------------------------------------------


def test_half_a_vpc_configuration_refuses_the_stack_as_cloudformation_would(make_stack):
    with pytest.raises(RuleViolation, match="VpcSubnetIds and VpcSecurityGroupIds go together"):
        make_stack(endpoints=[], parameters={"VpcSubnetIds": "subnet-0abc"})

    h = make_stack(
        endpoints=[],
        parameters={"VpcSubnetIds": "subnet-0abc,subnet-0def", "VpcSecurityGroupIds": "sg-01"},
    )
    assert h.run_checker() == {"checked": 0, "healthy": 0}
