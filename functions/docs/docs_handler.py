"""GET /openapi.json and GET /docs: the API's OpenAPI document and a Swagger UI page on it.

Both routes are public (no authorizer in template.yaml): they describe the API and carry
no user data. The document is generated from the HTTP functions' resolvers by
tools/openapi_document.py (`make openapi`), which writes it next to this module so that it
ships with the function's code; nothing is generated or downloaded at run time.
"""

from __future__ import annotations

from functools import cache
from http import HTTPStatus
from pathlib import Path
from typing import Any

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from gpuqueue.api.docs_page import swagger_page, swagger_page_headers
from gpuqueue.api.resolver import build_resolver
from gpuqueue.observability import Observability

observed = Observability(correlation_id_path=correlation_paths.API_GATEWAY_HTTP, traced=False)
app = build_resolver()

OPENAPI_DOCUMENT = Path(__file__).with_name("openapi.json")
# Relative to /docs, so the page works under any stage or base path.
DOCUMENT_URL = "openapi.json"
# The document changes only with a deploy; browsers may keep it a few minutes.
CACHE_CONTROL = "public, max-age=300"


@cache
def openapi_document() -> str:
    return OPENAPI_DOCUMENT.read_text(encoding="utf-8")


# Not in the document they serve: they are the documentation, not the API.
@app.get("/openapi.json", include_in_schema=False, compress=True)
def get_openapi_document() -> Response[str]:
    return Response(
        status_code=HTTPStatus.OK.value,
        content_type=content_types.APPLICATION_JSON,
        body=openapi_document(),
        headers={"Cache-Control": CACHE_CONTROL},
    )


@app.get("/docs", include_in_schema=False, compress=True)
def get_docs() -> Response[str]:
    page = swagger_page(DOCUMENT_URL, title="gpuqueue API")
    return Response(
        status_code=HTTPStatus.OK.value,
        content_type="text/html; charset=utf-8",
        body=page,
        headers={"Cache-Control": CACHE_CONTROL, **swagger_page_headers(DOCUMENT_URL)},
    )


@observed.entry
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    return app.resolve(event, context)
