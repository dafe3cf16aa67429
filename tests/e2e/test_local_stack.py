"""The seed client's flow and API Gateway's behaviour, over HTTP against `make up`'s stack."""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import jwt
import pytest
import requests
from moto.utilities.utils import load_resource
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]


def test_seed_client_flow_register_login_submit_poll_download_list_stats(local_stack):
    api = local_stack.api
    username, password = f"seed{uuid.uuid4().hex[:8]}", "pass1234word"
    register = requests.post(
        f"{api}/register", json={"username": username, "password": password}, timeout=30
    )
    assert register.status_code == 201
    login = requests.post(
        f"{api}/login", json={"username": username, "password": password}, timeout=30
    )
    assert login.status_code == 200
    auth = {"Authorization": f"Bearer {login.json()['token']}"}

    submitted = requests.post(
        f"{api}/api/v1/image/async",
        headers=auth,
        json={
            "prompt": "A futuristic city with flying cars",
            "negative_prompt": "blurry",
            "width": 320,
            "height": 192,
        },
        timeout=30,
    )
    assert submitted.status_code == 202
    assert submitted.json()["status"] == "QUEUED"
    task_id = submitted.json()["task_id"]

    deadline = time.monotonic() + 30
    seen = []
    while time.monotonic() < deadline:
        task = requests.get(
            f"{api}/api/v1/tasks", params={"task_id": task_id}, headers=auth, timeout=30
        ).json()
        seen.append(task["status"])
        if task["status"] == "DONE":
            break
        time.sleep(0.1)
    assert task["status"] == "DONE", seen
    assert set(seen) <= {"QUEUED", "RUNNING", "DONE"}

    # result_url is relative to the API, like the seed's /api/images/123
    image = requests.get(
        f"{api}{task['result_url']}", headers=auth, timeout=30, allow_redirects=False
    )
    assert image.status_code == 302
    png = requests.get(image.headers["location"], timeout=30)
    assert png.status_code == 200, (png.text, image.headers["location"])  # S3 says why it refused
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    assert Image.open(io.BytesIO(png.content)).size == (320, 192)

    listed = requests.get(f"{api}/api/v1/tasks", params={"limit": 5}, headers=auth, timeout=30)
    assert [t["task_id"] for t in listed.json()] == [task_id]
    stats = requests.get(f"{api}/api/v1/system/stats", headers=auth, timeout=30).json()
    assert {"queue_length", "queue_capacity", "queue_usage"} <= set(stats)
    assert stats["queue_capacity"] == 100


def test_health_is_public_and_ready(local_stack):
    response = requests.get(f"{local_stack.api}/health", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_the_api_docs_are_public_and_serve_the_committed_document(local_stack):
    committed = Path(__file__).resolve().parents[2] / "openapi.json"

    document = requests.get(f"{local_stack.api}/openapi.json", timeout=30)
    page = requests.get(f"{local_stack.api}/docs", timeout=30)

    assert document.status_code == 200, document.text
    assert document.json() == json.loads(committed.read_text(encoding="utf-8"))
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "openapi.json" in page.text


def test_the_docs_page_sends_its_security_headers(local_stack):
    page = requests.get(f"{local_stack.api}/docs", timeout=30)

    assert page.status_code == 200, page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert "script-src 'sha256-" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/tasks"),
        ("POST", "/api/v1/image/async"),
        ("GET", "/api/v1/system/stats"),
        ("DELETE", "/api/v1/tasks/x"),
        ("GET", "/api/images/x"),
    ],
)
def test_every_api_route_needs_a_token(local_stack, method, path):
    response = requests.request(method, f"{local_stack.api}{path}", timeout=10)
    assert response.status_code == 401
    assert response.json() == {"message": "Unauthorized"}


def _token_claims(token):
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _sign(claims):
    """Sign with the local Cognito key (moto's published test key), as a forger would."""
    private = load_resource("cognitoidp/resources/jwks-private.json")
    key = jwt.PyJWK(private)
    return jwt.encode(
        claims, key.key, algorithm="RS256", headers={"kid": private.get("kid", "dummy")}
    )


def test_expired_tampered_and_foreign_tokens_are_refused(local_stack, new_user):
    api = local_stack.api
    good = _token_claims(new_user.token)
    assert requests.get(f"{api}/api/v1/tasks", headers=new_user.auth, timeout=10).status_code == 200

    expired = _sign({**good, "exp": int(time.time()) - 5, "iat": int(time.time()) - 3600})
    other_client = _sign({**good, "client_id": "someone-elses-client"})
    no_scope = _sign({k: v for k, v in good.items() if k != "scope"})
    other_issuer = _sign(
        {**good, "iss": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_other"}
    )
    header, _payload, signature = new_user.token.split(".")
    tampered_payload = (
        base64.urlsafe_b64encode(json.dumps({**good, "sub": str(uuid.uuid4())}).encode())
        .decode()
        .rstrip("=")
    )
    tampered = f"{header}.{tampered_payload}.{signature}"

    for token in (expired, other_client, no_scope, other_issuer, tampered, "not-a-jwt"):
        response = requests.get(
            f"{api}/api/v1/tasks", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert response.status_code == 401, token
    # The forged-but-valid control: same key and claims, fresh expiry, is accepted.
    control = _sign({**good, "exp": int(time.time()) + 600})
    assert (
        requests.get(
            f"{api}/api/v1/tasks", headers={"Authorization": f"Bearer {control}"}, timeout=10
        ).status_code
        == 200
    )


def test_id_tokens_are_refused(local_stack, new_user):
    # An ID token is genuine but carries no scope: the authorizer wants access tokens.
    cognito = boto3.client(
        "cognito-idp",
        endpoint_url=local_stack.state["moto_url"],
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    result = cognito.initiate_auth(
        ClientId=local_stack.state["outputs"]["UserPoolClientId"],
        AuthFlow="USER_PASSWORD_AUTH",
        AuthParameters={"USERNAME": new_user.username, "PASSWORD": new_user.password},
    )["AuthenticationResult"]
    response = requests.get(
        f"{local_stack.api}/api/v1/tasks",
        headers={"Authorization": f"Bearer {result['IdToken']}"},
        timeout=10,
    )
    assert response.status_code == 401


def test_unknown_route_is_404_and_oversized_body_is_413(local_stack, new_user):
    assert requests.get(f"{local_stack.api}/nope", timeout=10).status_code == 404
    big = b"x" * (10 * 1024 * 1024 + 1)
    response = requests.post(
        f"{local_stack.api}/api/v1/image/async", headers=new_user.auth, data=big, timeout=30
    )
    assert response.status_code == 413


def test_user_b_cannot_see_user_a_task(local_stack, new_user):
    other = requests.post(
        f"{local_stack.api}/register",
        json={"username": f"b{uuid.uuid4().hex[:8]}", "password": "pass1234word"},
        timeout=30,
    ).json()["token"]
    task_id = new_user.submit("private prompt")
    for path in (
        f"/api/v1/tasks/{task_id}",
        f"/api/v1/tasks?task_id={task_id}",
        f"/api/images/{task_id}",
    ):
        response = requests.get(
            f"{local_stack.api}{path}", headers={"Authorization": f"Bearer {other}"}, timeout=10
        )
        assert response.status_code == 404, path


def test_canceled_task_never_reaches_an_endpoint(local_stack, new_user):
    # Given both workers busy with slow tasks
    for server in (0, 1):
        local_stack.knobs(server, latency_s=3.0)
    try:
        blockers = [new_user.submit(f"blocker {i}") for i in range(2)]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sum(local_stack.endpoint_stats(s)["in_flight"] for s in (0, 1)) == 2:
                break
            time.sleep(0.05)
        # When a queued task is canceled before a worker is free
        marker = f"canceled {uuid.uuid4().hex}"
        task_id = new_user.submit(marker)
        canceled = new_user.delete(f"/api/v1/tasks/{task_id}")
        assert canceled.status_code == 200
        assert canceled.json()["status"] == "CANCELED"
    finally:
        for server in (0, 1):
            local_stack.knobs(server, latency_s=0.2)
    # Then the blockers finish, the queue drains, and no endpoint ever saw the prompt
    for blocker in blockers:
        assert new_user.wait(blocker)["status"] == "DONE"
    later = new_user.submit("after the cancel")
    assert new_user.wait(later)["status"] == "DONE"
    assert new_user.wait(task_id)["status"] == "CANCELED"
    prompts = local_stack.endpoint_stats(0)["prompts"] + local_stack.endpoint_stats(1)["prompts"]
    assert marker not in prompts
    assert "after the cancel" in prompts


def test_failing_endpoint_is_retried_on_the_healthy_one(local_stack, new_user):
    # Equal footing: otherwise a slow call measured on endpoint 0 in an earlier test makes
    # the balancer leave it alone, and the failure this test injects is never met.
    local_stack.forget_call_times()
    local_stack.knobs(0, failure_rate=1.0)
    before = local_stack.endpoint_stats(0)["calls"]
    try:
        ids = [new_user.submit(f"retry me {i} {uuid.uuid4().hex[:6]}") for i in range(4)]
        tasks = [new_user.wait(i, timeout=60) for i in ids]
    finally:
        local_stack.knobs(0, failure_rate=0.0)
    assert [t["status"] for t in tasks] == ["DONE"] * 4
    failed_calls = local_stack.endpoint_stats(0)["calls"] - before
    assert failed_calls >= 1
    assert sum(t["attempt"] - 1 for t in tasks) == failed_calls
    healthy_prompts = local_stack.endpoint_stats(1)["prompts"]
    assert all(t["prompt"] in healthy_prompts for t in tasks)


def test_the_printed_curl_line_returns_a_task_id(local_stack):
    deadline = time.monotonic() + 10
    while "Try it:" not in local_stack.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = local_stack.log_path.read_text().splitlines()
    start = lines.index("Try it:")
    export, curl = lines[start + 1].strip(), lines[start + 2].strip()
    assert export.startswith("export TOKEN=")
    assert curl.startswith("curl ")
    result = subprocess.run(
        ["bash", "-c", f"{export} && {curl}"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body = json.loads(result.stdout)
    assert re.fullmatch(r"[0-9a-f-]{36}", body["task_id"])
    assert body["status"] == "QUEUED"


def test_cli_generate_waits_and_writes_a_real_png(local_stack, tmp_path):
    env = {
        **os.environ,
        "GPUQUEUE_API_URL": local_stack.api,
        "GPUQUEUE_CONFIG_DIR": str(tmp_path / "config"),
    }
    cli = [sys.executable, "-m", "gpuqueue_client"]
    user = f"cli{uuid.uuid4().hex[:8]}"
    run = functools.partial(subprocess.run, env=env, capture_output=True, text=True, timeout=60)
    registered = run([*cli, "register", "-u", user, "-p", "pass1234word"])
    assert registered.returncode == 0, registered.stderr
    out = tmp_path / "fox.png"
    generated = run(
        [
            *cli,
            "generate",
            "a red fox",
            "--width",
            "256",
            "--height",
            "128",
            "--wait",
            "-o",
            str(out),
        ]
    )
    assert generated.returncode == 0, generated.stderr
    assert Image.open(out).size == (256, 128)
    listed = run([*cli, "tasks"])
    assert listed.returncode == 0
    assert "DONE" in listed.stdout


def test_operators_list_the_stand_ins_and_everyone_else_gets_403(local_stack, new_user):
    admin = local_stack.state["admin_user"]
    assert admin["username"] == "admin"
    auth = {"Authorization": f"Bearer {admin['token']}"}

    listed = requests.get(f"{local_stack.api}/api/v1/admin/endpoints", headers=auth, timeout=30)

    assert listed.status_code == 200, listed.text
    declared = [row for row in listed.json() if row["source"] == "parameter"]
    stand_ins = {
        **dict.fromkeys(local_stack.state["image_servers"], "image"),
        **dict.fromkeys(local_stack.state["speech_servers"], "speech"),
    }
    assert {row["url"]: row["kind"] for row in declared} == stand_ins
    assert all(row["healthy"] for row in declared)
    refused = new_user.get("/api/v1/admin/endpoints")
    assert refused.status_code == 403
    assert refused.json()["code"] == "FORBIDDEN"


def test_the_cli_lists_endpoints_with_the_admin_token(local_stack, tmp_path):
    env = {
        **os.environ,
        "GPUQUEUE_API_URL": local_stack.api,
        "GPUQUEUE_CONFIG_DIR": str(tmp_path / "config"),
        "GPUQUEUE_TOKEN": local_stack.state["admin_user"]["token"],
        "COLUMNS": "200",
    }
    listed = subprocess.run(
        [sys.executable, "-m", "gpuqueue_client", "endpoints", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert listed.returncode == 0, listed.stderr
    for url in local_stack.state["image_servers"]:
        assert url in listed.stdout
