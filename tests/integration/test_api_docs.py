"""DocsFunction in-process: the committed OpenAPI document and its Swagger UI page, without
a token (the routes are public) and without any AWS service."""

from __future__ import annotations

import base64
import gzip
import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import Any

from gpuqueue_testing import FakeLambdaContext, load_event

COMMITTED = Path(__file__).resolve().parents[2] / "openapi.json"


def _invoke(event: dict[str, Any]) -> tuple[int, dict[str, str], str]:
    handler = importlib.import_module("docs_handler").lambda_handler
    result = handler(event, FakeLambdaContext(function_name="docs"))
    raw = result.get("body") or ""
    body = base64.b64decode(raw) if result.get("isBase64Encoded") else raw.encode()
    headers = {k.lower(): v for k, v in (result.get("headers") or {}).items()}
    if headers.get("content-encoding") == "gzip":
        body = gzip.decompress(body)
    return int(result["statusCode"]), headers, body.decode("utf-8")


def _docs_page_event() -> dict[str, Any]:
    event = load_event("docs_openapi")
    event["routeKey"] = event["requestContext"]["routeKey"] = "GET /docs"
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/docs"
    event["headers"]["accept"] = "text/html"
    del event["headers"]["accept-encoding"]
    return event


def test_the_sample_event_gets_the_committed_document_compressed():
    event = load_event("docs_openapi")
    assert "authorizer" not in event["requestContext"]  # a public route: no claims

    status, headers, body = _invoke(event)

    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["content-encoding"] == "gzip"  # the browser said it accepts gzip
    assert body == COMMITTED.read_text(encoding="utf-8")


def test_the_docs_page_is_swagger_ui_loading_the_document_next_to_it():
    status, headers, body = _invoke(_docs_page_event())

    assert status == 200
    assert headers["content-type"].startswith("text/html")
    assert body.startswith("<!DOCTYPE html>")
    assert '"url": "openapi.json"' in body  # relative: /docs -> /openapi.json
    assert "SwaggerUIBundle(" in body


def test_the_docs_page_loads_nothing_from_elsewhere():
    _, _, body = _invoke(_docs_page_event())

    # Swagger UI's script and stylesheet are inlined (from Powertools, in the layer).
    assert "<script src" not in body
    assert "<link" not in body


def _policy(headers: dict[str, str]) -> dict[str, list[str]]:
    directives = [d.split() for d in headers["content-security-policy"].split(";") if d.strip()]
    return {name: sources for name, *sources in directives}


def test_the_docs_page_may_not_be_framed_sniffed_or_leak_its_address():
    _, headers, _ = _invoke(_docs_page_event())

    assert headers["x-frame-options"] == "DENY"
    assert _policy(headers)["frame-ancestors"] == ["'none'"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"


def test_the_docs_pages_policy_runs_its_own_scripts_and_nothing_else():
    _, headers, body = _invoke(_docs_page_event())
    policy = _policy(headers)
    scripts = re.findall(r"<script>(.*?)</script>", body, flags=re.DOTALL)
    hashes = {
        "'sha256-" + base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() + "'"
        for s in scripts
    }

    assert len(scripts) == 2  # Swagger UI, and the call that starts it
    assert set(policy["script-src"]) == hashes  # no 'unsafe-inline', no 'unsafe-eval'
    assert policy["default-src"] == ["'none'"]
    assert policy["connect-src"] == ["'self'"]  # the document and "Try it out": this API
    assert policy["base-uri"] == ["'none'"]
    sources = [source for values in policy.values() for source in values]
    assert not [s for s in sources if "://" in s or s in ("*", "http:", "https:")]


def test_the_docs_page_sends_nothing_to_the_online_validator():
    _, _, body = _invoke(_docs_page_event())

    # Swagger UI's default would send the document's URL to validator.swagger.io
    assert '"validatorUrl": null' in body


def test_an_unknown_path_is_the_apis_json_404():
    event = load_event("docs_openapi")
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/openapi.yaml"

    status, _, body = _invoke(event)

    assert status == 404
    assert json.loads(body)["code"] == "NOT_FOUND"
