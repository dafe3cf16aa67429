"""Schemathesis against the committed OpenAPI document, over HTTP on the local stack, as a
signed-in user: whatever it sends, no answer is a 5xx, and every 4xx our functions give has
the JSON error shape {"error", "code", "field"?}. Then hostile bodies (huge integers, deep
nesting, bytes that are not JSON) at the routes anyone can reach without a token."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings

from hostile_bodies import hostile_bodies, is_error_shape

from .conftest import ApiUser, LocalStackProcess, register_user

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("local_stack")]

REPO = Path(__file__).resolve().parents[2]
schema = schemathesis.openapi.from_path(REPO / "openapi.json")
# Answers the gateway gives before any function runs, in API Gateway's own shape as on AWS:
# no route for the method and path, no valid token, past the 10 MB payload quota.
GATEWAY_ANSWERS = {
    404: {"message": "Not Found"},
    401: {"message": "Unauthorized"},
    413: {"message": "Request Entity Too Large"},
}


@pytest.fixture(scope="module")
def fuzz_user(local_stack: LocalStackProcess) -> ApiUser:
    return register_user(local_stack, "fuzz")


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,  # the same cases every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_every_4xx_is_a_json_error(case, local_stack, fuzz_user):
    response = case.call(base_url=local_stack.api, headers=fuzz_user.auth, timeout=30)
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where
    if 400 <= response.status_code < 500:
        body = response.json()
        if body == GATEWAY_ANSWERS.get(response.status_code):
            return
        assert isinstance(body.get("error"), str), where
        assert body["error"], where
        assert isinstance(body.get("code"), str), where
        assert body["code"], where
        assert body.get("field") is None or isinstance(body["field"], str), where


@pytest.mark.parametrize("path", ["/register", "/login"])
def test_no_body_sent_without_a_token_is_a_5xx(local_stack, path):
    @settings(
        max_examples=30,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(body=hostile_bodies("username", "password"))
    def no_5xx(body: bytes) -> None:
        response = requests.post(
            f"{local_stack.api}{path}",
            data=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        where = f"POST {path} {body[:120]!r} -> {response.status_code}: {response.text[:300]}"
        assert response.status_code < 500, where
        if response.status_code >= 400:
            assert is_error_shape(response.json()), where

    no_5xx()
