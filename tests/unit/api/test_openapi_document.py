"""The API's OpenAPI document (tools/openapi_document.py): generated from the handlers'
resolvers, committed, served by DocsFunction, and in step with template.yaml."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate  # comes with moto[server]

import openapi_document as generator  # tools/ is on the test path (tests/conftest.py)
from gpuqueue_local.template import load_template, resources_of_type

ROOT = Path(__file__).resolve().parents[3]
COMMITTED = ROOT / "openapi.json"
SHIPPED = ROOT / "functions" / "docs" / "openapi.json"
DOCS_ROUTES = {("GET", "/openapi.json"), ("GET", "/docs")}
ERROR_BODY = {"$ref": "#/components/schemas/ErrorBody"}


TEMPLATE = load_template()


@pytest.fixture(scope="module")
def generated() -> str:
    rendered: str = generator.render(generator.build_document())
    return rendered


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(COMMITTED.read_text(encoding="utf-8"))
    return document


def _template_routes() -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path) -> the HttpApi event's properties, for every function."""
    routes = {}
    for function in resources_of_type(TEMPLATE, "AWS::Serverless::Function").values():
        for event in function["Properties"].get("Events", {}).values():
            if event["Type"] == "HttpApi":
                props = event["Properties"]
                routes[(str(props["Method"]).upper(), str(props["Path"]))] = props
    return routes


def _operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    operation: dict[str, Any] = document["paths"][path][method.lower()]
    return operation


def _function(logical_id: str, *routes: tuple[str, str], authorizer: str | None = None) -> Any:
    return generator.HttpFunction(
        logical_id=logical_id,
        code_dir=ROOT,
        module=logical_id.lower(),
        description=f"{logical_id} routes",
        routes=tuple(generator.Route(m, p, authorizer) for m, p in routes),
    )


def _schema(*routes: tuple[str, str], schemas: dict[str, Any] | None = None) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path in routes:
        paths.setdefault(path, {})[method.lower()] = {
            "operationId": f"{method.lower()}{path.replace('/', '_')}",
            "responses": {"200": {"description": "ok"}},
        }
    return {"paths": paths, "components": {"schemas": schemas or {}}}


def _with_body(schema: dict[str, Any], method: str, path: str, model: str) -> dict[str, Any]:
    operation = schema["paths"][path][method.lower()]
    operation["requestBody"] = {
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}
    }
    return schema


def _merge(*parts: tuple[Any, dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = generator.merge(
        list(parts), version="1.0.0", summary="test", schemes={}
    )
    return merged


# --- drift ----------------------------------------------------------------------------------


@pytest.mark.parametrize("copy_path", [COMMITTED, SHIPPED], ids=["root", "docs-function"])
def test_committed_document_is_what_the_handlers_generate(generated: str, copy_path: Path) -> None:
    problems = generator.drift(generated, [copy_path])

    assert problems == [], "\n".join(problems) + "\nrun `make openapi` to regenerate"


def test_check_exits_1_naming_a_stale_copy_and_write_brings_it_up_to_date(
    generated: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stale = tmp_path / "openapi.json"
    document = json.loads(generated)
    document["info"]["version"] = "0.0.0-stale"
    stale.write_text(generator.render(document), encoding="utf-8")
    monkeypatch.setattr(generator, "DOCUMENT_COPIES", (stale,))

    assert generator.main(["--check"]) == 1
    assert f"{stale}: 2 lines differ" in capsys.readouterr().err

    assert generator.main(["--write"]) == 0
    assert stale.read_text(encoding="utf-8") == generated
    assert generator.main(["--check"]) == 0


def test_check_reports_a_missing_copy(generated: str, tmp_path: Path) -> None:
    assert generator.drift(generated, [tmp_path / "openapi.json"]) == [
        f"{tmp_path / 'openapi.json'}: missing"
    ]


def test_output_is_deterministic_sorted_indented_and_ends_with_a_newline(generated: str) -> None:
    again = generator.render(generator.build_document())

    assert again == generated
    assert generated.endswith("}\n")
    assert generator.render(json.loads(generated)) == generated  # sorted keys, indent 2
    assert generated.splitlines()[1].startswith('  "')


# --- the document ---------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1(committed: dict[str, Any]) -> None:
    validate(committed)

    assert committed["openapi"].startswith("3.1.")


def test_the_document_names_the_project_and_its_version(committed: dict[str, Any]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    assert committed["info"]["title"] == "gpuqueue"
    assert committed["info"]["version"] == project["version"]


def test_every_template_route_is_documented_and_nothing_else(committed: dict[str, Any]) -> None:
    documented = {
        (method.upper(), path) for path, item in committed["paths"].items() for method in item
    }

    # The docs routes serve the document; they are not part of the API it describes.
    assert documented == set(_template_routes()) - DOCS_ROUTES
    assert set(_template_routes()) >= DOCS_ROUTES


def test_authorised_operations_need_the_bearer_token_and_public_ones_do_not(
    committed: dict[str, Any],
) -> None:
    scheme = committed["components"]["securitySchemes"]["CognitoJwt"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    assert scheme["bearerFormat"] == "JWT"
    assert "security" not in committed  # per operation, as the template says
    for (method, path), props in _template_routes().items():
        if (method, path) in DOCS_ROUTES:
            continue
        operation = _operation(committed, method, path)
        if props.get("Auth", {}).get("Authorizer") == "NONE":
            assert "security" not in operation, (method, path)
        else:
            assert operation["security"] == [{"CognitoJwt": []}], (method, path)


def test_register_and_login_are_the_only_public_operations(committed: dict[str, Any]) -> None:
    public = {
        (method.upper(), path)
        for path, item in committed["paths"].items()
        for method, operation in item.items()
        if "security" not in operation
    }
    # Besides them, only the route GPU servers call back on, which its per-attempt token in
    # the query authorises (a GPU server cannot sign in).
    callback = ("POST", "/api/v1/callbacks/cog/{task_id}")
    token = [
        parameter
        for parameter in _operation(committed, *callback)["parameters"]
        if parameter["in"] == "query"
    ]

    assert public == {
        ("POST", "/register"),
        ("POST", "/register/confirm"),
        ("POST", "/login"),
        callback,
    }
    assert [parameter["name"] for parameter in token] == ["token"]


def test_errors_are_documented_as_the_error_body_the_api_answers(
    committed: dict[str, Any],
) -> None:
    text = json.dumps(committed)
    assert "HTTPValidationError" not in text  # Powertools' 422 shape: never answered
    submit = _operation(committed, "POST", "/api/v1/image/async")
    assert submit["responses"]["400"]["content"]["application/json"]["schema"] == ERROR_BODY
    for item in committed["paths"].values():
        for operation in item.values():
            default = operation["responses"]["default"]
            assert default["content"]["application/json"]["schema"] == ERROR_BODY
    error_body = committed["components"]["schemas"]["ErrorBody"]
    assert set(error_body["required"]) == {"error", "code"}


def test_request_bodies_come_from_the_pydantic_models(committed: dict[str, Any]) -> None:
    submit = _operation(committed, "POST", "/api/v1/image/async")
    login = _operation(committed, "POST", "/login")

    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ImageRequest"}
    assert "prompt" in committed["components"]["schemas"]["ImageRequest"]["required"]
    assert login["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/TokenResponse"
    }


@pytest.mark.parametrize(
    ("method", "path", "status", "model"),
    [
        ("POST", "/api/v1/image/async", "202", "SubmitResponse"),
        ("POST", "/api/v1/image/async", "200", "TaskView"),
        ("POST", "/register", "201", "TokenResponse"),
        ("POST", "/register", "202", "SignUpPending"),
        ("POST", "/register/confirm", "200", "TokenResponse"),
        ("GET", "/api/v1/tasks/{task_id}", "200", "TaskView"),
        ("DELETE", "/api/v1/tasks/{task_id}", "200", "TaskView"),
        ("POST", "/api/v1/speech/async", "202", "SpeechUploadResponse"),
    ],
)
def test_success_answers_carry_their_status_and_model(
    committed: dict[str, Any], method: str, path: str, status: str, model: str
) -> None:
    responses = _operation(committed, method, path)["responses"]
    schema = responses[status]["content"]["application/json"]["schema"]
    assert schema == {"$ref": f"#/components/schemas/{model}"}
    assert responses[status]["description"]


@pytest.mark.parametrize(
    ("method", "path"), [("POST", "/register"), ("POST", "/api/v1/speech/async")]
)
def test_routes_that_never_answer_200_do_not_document_one(
    committed: dict[str, Any], method: str, path: str
) -> None:
    assert "200" not in _operation(committed, method, path)["responses"]


def test_the_image_route_documents_its_redirect(committed: dict[str, Any]) -> None:
    responses = _operation(committed, "GET", "/api/images/{task_id}")["responses"]
    assert "Location" in responses["302"]["description"]
    assert "200" not in responses


def test_no_response_claims_a_json_string_body(committed: dict[str, Any]) -> None:
    # Handlers returning Response[str] write JSON objects; Powertools only sees `str`.
    for item in committed["paths"].values():
        for operation in item.values():
            for response in operation["responses"].values():
                schema = response.get("content", {}).get("application/json", {}).get("schema")
                assert schema != {"title": "Return", "type": "string"}


def test_every_operation_is_tagged_with_its_function(committed: dict[str, Any]) -> None:
    tags = {tag["name"] for tag in committed["tags"]}

    assert _operation(committed, "GET", "/api/v1/tasks")["tags"] == ["Tasks"]
    assert _operation(committed, "POST", "/login")["tags"] == ["Auth"]
    assert tags == {"Admin", "Auth", "GpuCallback", "Speech", "Stats", "Submit", "Tasks"}


# --- merging --------------------------------------------------------------------------------


def test_the_same_component_from_two_functions_is_kept_once() -> None:
    shared = {"Priority": {"enum": ["normal", "high"], "type": "string"}}

    first = _with_body(_schema(("POST", "/a"), schemas=shared), "POST", "/a", "Priority")
    second = _with_body(_schema(("POST", "/b"), schemas=shared), "POST", "/b", "Priority")

    merged = _merge(
        (_function("AFunction", ("POST", "/a")), first),
        (_function("BFunction", ("POST", "/b")), second),
    )

    assert set(merged["paths"]) == {"/a", "/b"}
    assert merged["components"]["schemas"]["Priority"] == shared["Priority"]
    assert set(merged["components"]["schemas"]) == {"Priority", "ErrorBody"}


def test_a_component_clash_with_different_content_fails_loudly() -> None:
    first = {"Priority": {"enum": ["normal", "high"], "type": "string"}}
    second = {"Priority": {"enum": ["low"], "type": "string"}}

    with pytest.raises(generator.OpenApiError, match=r"Priority differs between AFunction and B"):
        _merge(
            (_function("AFunction", ("GET", "/a")), _schema(("GET", "/a"), schemas=first)),
            (_function("BFunction", ("GET", "/b")), _schema(("GET", "/b"), schemas=second)),
        )


def test_a_route_served_by_two_functions_fails_loudly() -> None:
    with pytest.raises(generator.OpenApiError, match=r"GET /a is served by both AFunction and B"):
        _merge(
            (_function("AFunction", ("GET", "/a")), _schema(("GET", "/a"))),
            (_function("BFunction", ("GET", "/a")), _schema(("GET", "/a"))),
        )


def test_a_resolver_and_its_template_routes_must_agree() -> None:
    function = _function("AFunction", ("GET", "/a"), ("POST", "/only-in-template"))

    mismatches = generator.route_mismatches(function, _schema(("GET", "/a"), ("GET", "/stray")))

    assert mismatches == [
        "POST /only-in-template: in the template for AFunction, not in its resolver",
        "GET /stray: in afunction's resolver, not routed to AFunction by the template",
    ]


def test_security_follows_the_template_authorizer_of_each_route() -> None:
    merged = _merge(
        (
            _function("AFunction", ("GET", "/private"), authorizer="CognitoJwt"),
            _schema(("GET", "/private")),
        ),
        (_function("BFunction", ("GET", "/public")), _schema(("GET", "/public"))),
    )

    assert merged["paths"]["/private"]["get"]["security"] == [{"CognitoJwt": []}]
    assert "security" not in merged["paths"]["/public"]["get"]


def test_unreferenced_schemas_are_dropped_and_referenced_ones_kept() -> None:
    schema = _schema(
        ("POST", "/a"),
        schemas={
            "Used": {"properties": {"inner": {"$ref": "#/components/schemas/Inner"}}},
            "Inner": {"type": "string"},
            "Unused": {"type": "integer"},
        },
    )

    merged = _merge(
        (_function("AFunction", ("POST", "/a")), _with_body(schema, "POST", "/a", "Used"))
    )

    assert set(merged["components"]["schemas"]) == {"Used", "Inner", "ErrorBody"}


# --- serving it -----------------------------------------------------------------------------


def test_the_docs_function_needs_no_aws_permissions() -> None:
    docs = TEMPLATE["Resources"]["DocsFunction"]["Properties"]

    assert "Policies" not in docs
    assert docs["CodeUri"] == "functions/docs/"
    assert SHIPPED.parent == ROOT / docs["CodeUri"]
