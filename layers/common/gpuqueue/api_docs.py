"""The Swagger UI page for the API's OpenAPI document (served by DocsFunction at /docs).

The page inlines the Swagger UI script and stylesheet that ship inside Powertools (in the
layer), so it loads nothing from a CDN: it works on an offline laptop against `make up`,
and the browser runs no third-party code. Swagger UI then fetches the document itself.
"""

from __future__ import annotations

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
def swagger_page(document_url: str, *, title: str) -> str:
    """A Swagger UI page that loads the OpenAPI document from `document_url` (relative to
    the page, so it works under any stage or base path)."""
    options = {
        "url": document_url,
        "dom_id": "#swagger-ui",
        "deepLinking": True,
        "docExpansion": "list",
        "filter": True,
        # The bearer token stays in the page only; a reload asks for it again.
        "persistAuthorization": False,
    }
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
  <script>{_asset(SWAGGER_UI_SCRIPT)}</script>
  <script>
    window.ui = SwaggerUIBundle(Object.assign({json.dumps(options)}, {{
      presets: [SwaggerUIBundle.presets.apis],
      layout: "BaseLayout"
    }}));
  </script>
</body>
</html>
"""
