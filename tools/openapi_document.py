"""The API's OpenAPI document, generated from the HTTP functions' Powertools resolvers.

Every HTTP Lambda has its own APIGatewayHttpResolver (`app` in its handler module), and
template.yaml says which functions serve which HttpApi routes and which routes the Cognito
JWT authorizer guards. This tool imports each of those handler modules, asks its resolver
for its OpenAPI schema (`app.get_openapi_schema`) and merges them into one document:

- one path table: a route two functions claim, or a resolver route the template does not
  send to that function (or the reverse), is an error;
- one set of components: the same name with different content is an error;
- the template's JWT authorizer as a bearer security scheme, on exactly the operations
  the template authorises;
- the errors `build_resolver()` really answers: 400 with ErrorBody for a failed validation
  (not Powertools' 422 HTTPValidationError), ErrorBody for any other error; and no
  "JSON string" body claimed for handlers that return `Response[str]` (see
  document_responses).

Output is deterministic (sorted keys, indent 2, trailing newline). It is committed at the
repository root (openapi.json) and written, byte for byte, into DocsFunction's folder
(functions/docs/openapi.json), which ships it; both are generated, never edited, and
tests/unit/api/test_openapi_document.py fails when either drifts from the handlers.

Usage::

    python tools/openapi_document.py            # print the document
    python tools/openapi_document.py --write    # regenerate both copies (make openapi)
    python tools/openapi_document.py --check    # exit 1 if a copy differs from the handlers
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import os
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO / "local", REPO / "layers" / "common"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from aws_lambda_powertools.event_handler import APIGatewayHttpResolver  # noqa: E402

from gpuqueue.models import ErrorBody  # noqa: E402
from gpuqueue_local.template import load_template, resources_of_type  # noqa: E402

TITLE = "gpuqueue"
OPENAPI_VERSION = "3.1.0"
DOCUMENT_COPIES = (REPO / "openapi.json", REPO / "functions" / "docs" / "openapi.json")
# DocsFunction's routes: the documentation itself, not part of the API it documents.
UNDOCUMENTED_ROUTES = frozenset({("GET", "/openapi.json"), ("GET", "/docs")})
# Handler modules read their settings lazily (deps()); importing them needs only these.
IMPORT_ENV = {
    "AWS_DEFAULT_REGION": "us-east-1",
    "POWERTOOLS_SERVICE_NAME": "gpuqueue",
    "POWERTOOLS_TRACE_DISABLED": "true",
}
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
SCHEMA_REF = "#/components/schemas/"
POWERTOOLS_VALIDATION_ERROR = f"{SCHEMA_REF}HTTPValidationError"
# The return schema Powertools derives from a `-> Response[str]` annotation.
POWERTOOLS_RESPONSE_STR = {"title": "Return", "type": "string"}
ERROR_BODY_REF = f"{SCHEMA_REF}{ErrorBody.__name__}"
JSON = "application/json"
DESCRIPTION = (
    "{summary}.\n\n"
    "Log in with `POST /login` (or `POST /register`) and send the `token` it answers as "
    "`Authorization: Bearer <token>` on every other route. Errors are JSON "
    '`{{"error", "code", "field"?}}`; another user\'s task is a 404, like a missing one.'
)


class OpenApiError(Exception):
    """The document cannot be built; the message says why."""


@dataclass(frozen=True)
class Route:
    method: str  # upper case, as in the template
    path: str  # "/api/v1/tasks/{task_id}"
    authorizer: str | None  # the template authorizer guarding it; None: public


@dataclass(frozen=True)
class HttpFunction:
    """A template function with HttpApi events, and where its resolver lives."""

    logical_id: str
    code_dir: Path
    module: str
    description: str
    routes: tuple[Route, ...]

    @property
    def tag(self) -> str:
        return self.logical_id.removesuffix("Function")


# ---------------------------------------------------------------- the template


def http_functions(template: Mapping[str, Any]) -> list[HttpFunction]:
    apis = resources_of_type(template, "AWS::Serverless::HttpApi")
    functions = []
    for logical_id, resource in sorted(
        resources_of_type(template, "AWS::Serverless::Function").items()
    ):
        props = resource["Properties"]
        routes = []
        for name, event in props.get("Events", {}).items():
            if event.get("Type") != "HttpApi":
                continue
            event_props = event.get("Properties", {})
            if "Method" not in event_props or "Path" not in event_props:
                raise OpenApiError(f"{logical_id}.{name}: an HttpApi event needs Method and Path")
            # Without ApiId the route lands on SAM's implicit API, which has no authorizer.
            api_id = str((event_props.get("ApiId") or {}).get("Ref", ""))
            api_auth = apis.get(api_id, {}).get("Properties", {}).get("Auth", {})
            authorizer = event_props.get("Auth", {}).get(
                "Authorizer", api_auth.get("DefaultAuthorizer")
            )
            routes.append(
                Route(
                    method=str(event_props["Method"]).upper(),
                    path=str(event_props["Path"]),
                    authorizer=None if authorizer in (None, "NONE") else str(authorizer),
                )
            )
        if routes:
            functions.append(
                HttpFunction(
                    logical_id=logical_id,
                    code_dir=REPO / str(props["CodeUri"]),
                    module=str(props["Handler"]).rsplit(".", 1)[0],
                    description=str(props.get("Description", "")),
                    routes=tuple(routes),
                )
            )
    return functions


def security_schemes(template: Mapping[str, Any], names: set[str]) -> dict[str, Any]:
    """The template's authorizers `names` as OpenAPI security schemes."""
    declared: dict[str, Any] = {}
    for api in resources_of_type(template, "AWS::Serverless::HttpApi").values():
        declared.update(api.get("Properties", {}).get("Auth", {}).get("Authorizers", {}))
    schemes = {}
    for name in sorted(names):
        authorizer = declared.get(name)
        if authorizer is None or "JwtConfiguration" not in authorizer:
            raise OpenApiError(f"authorizer {name!r} is not a JWT authorizer of the HttpApi")
        scopes = ", ".join(authorizer.get("AuthorizationScopes", []))
        schemes[name] = {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": (
                "A Cognito user pool access token: the `token` that `POST /login` and "
                "`POST /register` answer. ID tokens are refused"
                + (f" (the authorizer requires the scope {scopes})." if scopes else ".")
            ),
        }
    return schemes


# ---------------------------------------------------------------- the resolvers


def resolver_schema(function: HttpFunction, version: str) -> dict[str, Any]:
    """The OpenAPI schema of the function's own resolver, as plain JSON data."""
    for name, value in IMPORT_ENV.items():
        os.environ.setdefault(name, value)
    if str(function.code_dir) not in sys.path:
        sys.path.insert(0, str(function.code_dir))
    module = importlib.import_module(function.module)
    app = getattr(module, "app", None)
    if not isinstance(app, APIGatewayHttpResolver):
        raise OpenApiError(
            f"{function.logical_id}: {function.module}.app is not an APIGatewayHttpResolver"
        )
    schema = app.get_openapi_schema(title=TITLE, version=version, openapi_version=OPENAPI_VERSION)
    data: dict[str, Any] = json.loads(schema.model_dump_json(by_alias=True, exclude_none=True))
    return data


def operations(document: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) for every operation of a document."""
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                raise OpenApiError(f"{path}: unexpected path item key {method!r}")
            yield method.upper(), path, operation


def documented_routes(document: Mapping[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for method, path, _ in operations(document)}


def route_mismatches(function: HttpFunction, schema: Mapping[str, Any]) -> list[str]:
    """Where the function's resolver and its template routes disagree."""
    declared = {(r.method, r.path) for r in function.routes} - UNDOCUMENTED_ROUTES
    served = documented_routes(schema)
    return [
        f"{method} {path}: in the template for {function.logical_id}, not in its resolver"
        for method, path in sorted(declared - served)
    ] + [
        f"{method} {path}: in {function.module}'s resolver, not routed to "
        f"{function.logical_id} by the template"
        for method, path in sorted(served - declared)
    ]


# ---------------------------------------------------------------- merging


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": {"$ref": ERROR_BODY_REF}}}}


def document_responses(operation: dict[str, Any]) -> None:
    """What build_resolver() really answers. A failed validation is a 400 with ErrorBody
    (Powertools would document 422 HTTPValidationError), any other error an ErrorBody too.
    A handler returning `Response[str]` builds its JSON body itself: Powertools sees only
    `str`, which would tell clients the body is a JSON string, so no schema is claimed."""
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for status, response in list(responses.items()):
        content = response.get("content", {}).get(JSON, {})
        schema = content.get("schema", {})
        if schema == POWERTOOLS_RESPONSE_STR:
            del content["schema"]
        if schema.get("$ref") == POWERTOOLS_VALIDATION_ERROR:
            del responses[status]
            responses.setdefault(
                "400", _error_response("The request is invalid; `field` names what is wrong.")
            )
    responses.setdefault(
        "default",
        _error_response(
            "An error, as JSON `{error, code, field?}`. API Gateway's own answers "
            '(401 without a valid token, 404 for no route, 413, 503) are `{"message"}`.'
        ),
    )


@dataclass
class Components:
    """The merged components, and which function each came from (for clash messages)."""

    named: dict[str, dict[str, Any]] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, kind: str, name: str, value: Any, owner: str) -> None:
        """Add one component; the same name twice must mean the same thing."""
        existing = self.named.setdefault(kind, {})
        if name in existing and existing[name] != value:
            raise OpenApiError(
                f"components.{kind}.{name} differs between {self.owners[(kind, name)]} and "
                f"{owner}: rename one of the models"
            )
        existing.setdefault(name, value)
        self.owners.setdefault((kind, name), owner)


def _refs(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                yield item
            else:
                yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def prune_schemas(document: dict[str, Any]) -> None:
    """Drop the component schemas no operation reaches (Powertools' validation-error
    models, once document_responses has replaced them)."""
    schemas: dict[str, Any] = document.get("components", {}).get("schemas", {})
    reached: set[str] = set()
    pending = [ref for ref in _refs(document["paths"]) if ref.startswith(SCHEMA_REF)]
    while pending:
        name = pending.pop().removeprefix(SCHEMA_REF)
        if name in reached:
            continue
        if name not in schemas:
            raise OpenApiError(f"{SCHEMA_REF}{name} is referenced but not defined")
        reached.add(name)
        pending.extend(ref for ref in _refs(schemas[name]) if ref.startswith(SCHEMA_REF))
    for name in set(schemas) - reached:
        del schemas[name]


def merge(
    parts: Sequence[tuple[HttpFunction, dict[str, Any]]],
    *,
    version: str,
    summary: str,
    schemes: Mapping[str, Any],
) -> dict[str, Any]:
    """One document from each function's resolver schema (see the module docstring)."""
    paths: dict[str, dict[str, Any]] = {}
    owner_of_route: dict[tuple[str, str], str] = {}
    owner_of_operation_id: dict[str, str] = {}
    components = Components()
    tags = []
    for function, schema in parts:
        routes = {(r.method, r.path): r for r in function.routes}
        for method, path, operation in operations(schema):
            if (method, path) in owner_of_route:
                raise OpenApiError(
                    f"{method} {path} is served by both {owner_of_route[(method, path)]} "
                    f"and {function.logical_id}"
                )
            owner_of_route[(method, path)] = function.logical_id
            operation_id = operation.get("operationId")
            if operation_id in owner_of_operation_id:
                raise OpenApiError(
                    f"operationId {operation_id!r} is used by both "
                    f"{owner_of_operation_id[operation_id]} and {function.logical_id}"
                )
            if operation_id is not None:
                owner_of_operation_id[operation_id] = function.logical_id
            route = routes.get((method, path))
            if route is not None and route.authorizer is not None:
                operation["security"] = [{route.authorizer: []}]
            operation.setdefault("tags", [function.tag])
            document_responses(operation)
            paths.setdefault(path, {})[method.lower()] = operation
        for kind, named in schema.get("components", {}).items():
            for name, value in named.items():
                components.add(kind, name, value, function.logical_id)
        if documented_routes(schema):
            tags.append({"name": function.tag, "description": function.description})
    error_body = ErrorBody.model_json_schema(ref_template=SCHEMA_REF + "{model}")
    components.add("schemas", ErrorBody.__name__, error_body, "gpuqueue.api.resolver")
    for name, scheme in schemes.items():
        components.add("securitySchemes", name, scheme, "template.yaml")
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": TITLE,
            "version": version,
            "description": DESCRIPTION.format(summary=summary.rstrip(".")),
        },
        # Relative: the document is served by the API it describes.
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": components.named,
        "tags": sorted(tags, key=lambda tag: tag["name"]),
    }
    prune_schemas(document)
    return document


# ---------------------------------------------------------------- the document


def project() -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(data["project"])


def build_document(template: Mapping[str, Any] | None = None) -> dict[str, Any]:
    template = load_template() if template is None else template
    meta = project()
    functions = http_functions(template)
    parts = [(f, resolver_schema(f, meta["version"])) for f in functions]
    mismatches = [line for f, schema in parts for line in route_mismatches(f, schema)]
    if mismatches:
        raise OpenApiError(
            "the resolvers and template.yaml disagree:\n  " + "\n  ".join(mismatches)
        )
    authorizers = {r.authorizer for f in functions for r in f.routes if r.authorizer is not None}
    return merge(
        parts,
        version=str(meta["version"]),
        summary=str(meta.get("description", TITLE)),
        schemes=security_schemes(template, authorizers),
    )


def render(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def drift(rendered: str, copies: Sequence[Path] = DOCUMENT_COPIES) -> list[str]:
    """What differs between the generated document and each copy: a summary, with the
    first lines of the diff; empty when every copy is current."""
    problems = []
    for path in copies:
        shown = _shown(path)
        if not path.is_file():
            problems.append(f"{shown}: missing")
            continue
        diff = list(
            difflib.unified_diff(
                path.read_text(encoding="utf-8").splitlines(),
                rendered.splitlines(),
                f"{shown} (committed)",
                f"{shown} (generated)",
                lineterm="",
                n=1,
            )
        )
        if diff:
            changed = sum(
                1 for line in diff[2:] if line[:1] in "+-" and not line.startswith(("+++", "---"))
            )
            problems.append(
                f"{shown}: {changed} lines differ from the handlers\n" + "\n".join(diff[:40])
            )
    return problems


def write(rendered: str, copies: Sequence[Path] = DOCUMENT_COPIES) -> list[Path]:
    """Write every copy that differs; the paths written."""
    written = []
    for path in copies:
        if not path.is_file() or path.read_text(encoding="utf-8") != rendered:
            path.write_text(rendered, encoding="utf-8")
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="The API's OpenAPI document, from the HTTP functions' Powertools resolvers."
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--write", action="store_true", help="write openapi.json and its copy")
    action.add_argument(
        "--check", action="store_true", help="exit 1 if a committed copy is out of date"
    )
    args = parser.parse_args(argv)
    try:
        rendered = render(build_document())
    except OpenApiError as error:
        print(f"openapi: {error}", file=sys.stderr)
        return 2
    if args.check:
        problems = drift(rendered, DOCUMENT_COPIES)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `make openapi` to regenerate", file=sys.stderr)
            return 1
        print(f"up to date: {', '.join(_shown(path) for path in DOCUMENT_COPIES)}")
        return 0
    if args.write:
        written = write(rendered, DOCUMENT_COPIES)
        for path in written:
            print(f"wrote {_shown(path)}")
        if not written:
            print("unchanged")
        return 0
    sys.stdout.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
