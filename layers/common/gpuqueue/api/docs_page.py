"""The Swagger UI page for the API's OpenAPI document (served by DocsFunction at /docs).

The page inlines the Swagger UI script and stylesheet that ship inside Powertools (in the
layer), so it loads nothing from a CDN: it works on an offline laptop against `make up`,
and the browser runs no third-party code. Swagger UI then fetches the document itself.

The page's headers hold it to that: a Content-Security-Policy that runs only these two
scripts (by hash), connects only to its own origin, and lets no other site frame it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from functools import cache
from importlib import resources

# Where Powertools keeps the Swagger UI bundle its own `enable_swagger` inlines.
SWAGGER_UI_PACKAGE = "aws_lambda_powertools.event_handler.openapi.swagger_ui"
SWAGGER_UI_SCRIPT = "swagger-ui-bundle.min.js"
SWAGGER_UI_STYLESHEET = "swagger-ui.min.css"


@cache
def _asset(name: str) -> str:
    text = resources.files(SWAGGER_UI_PACKAGE).joinpath(name).read_text(encoding="utf-8")
    # Inlined into <script>/<style>: a closing tag inside would end the element early.
    if "</" + ("script" if name.endswith(".js") else "style") in text.lower():
        raise ValueError(f"{name} cannot be inlined: it contains a closing tag")
    return text


@cache
def _scripts(document_url: str) -> tuple[str, str]:
    """The page's two inline scripts: Swagger UI, then the call that starts it."""
    options = {
        "url": document_url,
        "dom_id": "#swagger-ui",
        "deepLinking": True,
        "docExpansion": "list",
        "filter": True,
        # The bearer token stays in the page only; a reload asks for it again.
        "persistAuthorization": False,
        # Swagger UI's default sends the document's URL to validator.swagger.io for a badge.
        "validatorUrl": None,
    }
    start = f"""
    window.ui = SwaggerUIBundle(Object.assign({json.dumps(options)}, {{
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout"
    }}));
  """
    return _asset(SWAGGER_UI_SCRIPT), start


def _sha256_source(text: str) -> str:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


@cache
def swagger_page_headers(document_url: str) -> dict[str, str]:
    """Security headers for the page `swagger_page(document_url, ...)` builds."""
    policy = {
        "default-src": "'none'",
        # Exactly the page's inline scripts: an injected one (no hash) never runs.
        "script-src": " ".join(_sha256_source(script) for script in _scripts(document_url)),
        # Swagger UI styles elements from script as well as from its stylesheet. Styles run
        # no code, and img-src/connect-src below leave them nowhere to send anything.
        "style-src": "'unsafe-inline'",
        "img-src": "'self' data:",  # the stylesheet's icons are data: URIs
        "connect-src": "'self'",  # the document, and "Try it out" calls to this API
        "base-uri": "'none'",
        "form-action": "'none'",
        "frame-ancestors": "'none'",
    }
    return {
        "Content-Security-Policy": "; ".join(f"{k} {v}" for k, v in policy.items()),
        "X-Frame-Options": "DENY",  # frame-ancestors, for browsers without CSP level 2
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


@cache
def swagger_page(document_url: str, *, title: str) -> str:
    """A Swagger UI page that loads the OpenAPI document from `document_url` (relative to
    the page, so it works under any stage or base path)."""
    bundle, start = _scripts(document_url)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>{html.escape(title)}</title>
  <style>{_asset(SWAGGER_UI_STYLESHEET)}</style>
</head>
<body>
  <div id="swagger-ui">Loading {html.escape(document_url)}...</div>
  <script>{bundle}</script>
  <script>{start}</script>
</body>
</html>
"""
