"""Callback mode's small rules: the token (only its hash kept, compared in constant time),
the webhook URL, which endpoints and image sizes may use it, and Cog's webhook bodies."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import ValidationError

from gpuqueue.dispatch.cog_callbacks import callback_url, new_token, token_hash, token_matches
from gpuqueue.fleet.endpoint_declarations import read_declarations
from gpuqueue.fleet.fleet_admin import EndpointSpec
from gpuqueue.gpu.cog_webhooks import CogStatus, CogWebhook, fits_callback
from gpuqueue.gpu.credentials import CredentialScope
from gpuqueue.models import ImageParams, TaskKind


def test_a_token_matches_its_hash_and_nothing_else() -> None:
    token = new_token()
    stored = token_hash(token)

    assert token not in stored
    assert token_matches(token, stored)
    assert not token_matches(new_token(), stored)
    assert not token_matches(None, stored)
    assert not token_matches("", stored)


def test_tokens_are_fresh_and_unguessable() -> None:
    tokens = {new_token() for _ in range(100)}

    assert len(tokens) == 100
    assert all(len(t) >= 43 for t in tokens)  # 32 random bytes, URL-safe base64


def test_the_webhook_url_names_the_task_and_carries_the_token() -> None:
    url = callback_url("https://abc.execute-api.us-east-1.amazonaws.com/", "task-1", "t0k_-")

    parts = urlsplit(url)
    assert parts.path == "/api/v1/callbacks/cog/task-1"
    assert parse_qs(parts.query) == {"token": ["t0k_-"]}


@pytest.mark.parametrize(("side", "fits"), [(512, True), (768, True), (1024, False), (2048, False)])
def test_only_images_whose_answer_fits_lambdas_6_mb_request_go_by_callback(
    side: int, fits: bool
) -> None:
    assert fits_callback(ImageParams(width=side, height=side)) is fits


def test_callback_mode_is_for_cog_endpoints_only() -> None:
    EndpointSpec(url="http://gpu:5000", kind=TaskKind.IMAGE, protocol="cog", callback=True)
    with pytest.raises(ValidationError, match="cog endpoints only"):
        EndpointSpec(url="http://gpu:7860", kind=TaskKind.IMAGE, protocol="a1111", callback=True)


def test_a_declared_callback_on_another_protocol_is_refused_naming_the_field() -> None:
    declared = read_declarations(
        {},
        {
            TaskKind.IMAGE: '[{"url": "http://a:1", "protocol": "openai", "callback": true},'
            ' {"url": "http://c:5000", "protocol": "cog", "callback": true}]'
        },
        CredentialScope(),
    )[TaskKind.IMAGE]

    assert [e.url for e in declared.endpoints] == ["http://c:5000"]
    assert declared.endpoints[0].callback is True
    (error,) = declared.errors
    assert error.field == "callback"


def test_a_webhook_body_as_coglet_sends_it_is_read() -> None:
    body = (
        '{"id":"pred_1","logs":"step 1/4\\n","metrics":{},"output":["data:image/png;base64,AA=="],'
        '"status":"processing"}'
    )

    webhook = CogWebhook.model_validate_json(body)

    assert webhook.status is CogStatus.PROCESSING
    assert not webhook.status.is_final
    with pytest.raises(ValidationError):
        CogWebhook.model_validate_json('{"id":"pred_1","status":"exploded"}')
