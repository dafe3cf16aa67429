"""Bad input over HTTP on the local stack, each kind the issues name: a clear 4xx JSON error
naming the field (or API Gateway's own answer where the gateway decides), never a 5xx, and
nothing queued for a refused request."""

from __future__ import annotations

import json

import pytest
import requests

from .conftest import ApiUser

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

SUBMIT = "/api/v1/image/async"


def _post_raw(user: ApiUser, body: bytes, content_type: str) -> requests.Response:
    headers = {**user.auth, "Content-Type": content_type}
    return requests.post(f"{user.api}{SUBMIT}", data=body, headers=headers, timeout=30)


def _error(response: requests.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    body: dict[str, str] = response.json()
    assert body["error"]
    assert body["code"]
    return body


def _no_tasks(user: ApiUser) -> None:
    assert user.get("/api/v1/tasks").json() == []


def test_a_body_past_the_payload_quota_is_413_from_the_gateway(new_user):
    response = _post_raw(new_user, b"{" + b" " * (10 * 1024 * 1024) + b"}", "application/json")
    assert response.status_code == 413
    assert response.json() == {"message": "Request Entity Too Large"}
    _no_tasks(new_user)


def test_a_large_prompt_within_the_quota_is_400_naming_it(new_user):
    response = new_user.post(SUBMIT, json={"prompt": "x" * 1_000_000})
    assert _error(response, 400)["field"] == "prompt"
    _no_tasks(new_user)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",  # no boundary: Powertools' parser raised a bare ValueError
        "multipart/form-data; boundary=xyz",
        "application/xml",
    ],
)
def test_a_body_that_is_not_json_by_its_content_type_is_415(new_user, content_type):
    response = _post_raw(new_user, b"prompt=a+fox", content_type)
    body = _error(response, 415)
    assert body["code"] == "UNSUPPORTED_CONTENT_TYPE"
    assert body["field"] == "content-type"
    _no_tasks(new_user)


@pytest.mark.parametrize(
    "raw", [b'{"prompt": "fox"', b"prompt=fox", b"\xff\xfe\x00", b"[]", b"null", b'"fox"']
)
def test_malformed_or_non_object_json_is_400(new_user, raw):
    response = _post_raw(new_user, raw, "application/json")
    _error(response, 400)
    _no_tasks(new_user)


@pytest.mark.parametrize(
    "prompt",
    ["一只雪中的红狐狸", "ثعلب أحمر", "🦊❄️ in the snow", "Ǆ\u200b\u202efox", "fox\ttab\nnewline"],
)
def test_unicode_prompts_are_kept_exactly(new_user, prompt):
    task_id = new_user.submit(prompt)
    assert new_user.get(f"/api/v1/tasks/{task_id}").json()["prompt"] == prompt


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("width", -512),
        ("width", 10**30),
        ("height", 0),
        ("steps", -1),
        ("steps", 2**63),
        ("seed", -1),
        ("seed", 2**64),
        ("width", 512.5),
        ("queue_ttl_seconds", -5),
        ("queue_ttl_seconds", 10**12),
    ],
)
def test_negative_and_huge_numbers_are_400_naming_the_field(new_user, field, value):
    response = new_user.post(SUBMIT, json={"prompt": "a fox", field: value})
    assert _error(response, 400)["field"] == field
    _no_tasks(new_user)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/tasks/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/tasks/%2e%2e",
        "/api/v1/tasks/x'%20OR%20'1'='1",
        "/api/images/..%2Fresults%2Fsomeone-elses.png",
        "/api/v1/tasks/" + "a" * 300,
    ],
)
def test_path_traversal_and_odd_ids_never_reach_another_object(new_user, path):
    response = new_user.get(path)
    assert response.status_code in (400, 404), response.text
    body = response.json()
    # Ours names the field; the gateway's own 404 (no route) is API Gateway's shape.
    assert body == {"message": "Not Found"} or body["code"] in ("VALIDATION_ERROR", "NOT_FOUND")


def test_an_unknown_field_is_refused_not_ignored(new_user):
    response = new_user.post(SUBMIT, json={"prompt": "a fox", "promt": "typo"})
    assert _error(response, 400)["field"] == "promt"
    _no_tasks(new_user)


def test_json_with_a_duplicate_key_is_judged_by_the_last_value(new_user):
    raw = json.dumps({"prompt": "first"})[:-1] + ', "prompt": ""}'
    response = _post_raw(new_user, raw.encode(), "application/json")
    assert _error(response, 400)["field"] == "prompt"
