"""No request body makes a JSON route answer 500: whatever the bytes, the answer is a 4xx
in the API's error shape (issue 17: a 4,400-digit integer or arrays nested 50,000 deep in
the body of /register, /login or submit were 500s)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from hostile_bodies import hostile_bodies, is_error_shape

# route -> (handler module, path, whether it needs a signed-in caller)
JSON_ROUTES = {
    "register": ("auth_handler", "/register", False),
    "login": ("auth_handler", "/login", False),
    "submit": ("submit_handler", "/api/v1/image/async", True),
}
BROKEN_BODIES = {
    "4400-digit-integer": b'{"username": ' + b"9" * 4400 + b', "password": "pass-1234-x"}',
    "nested-50000-deep": b'{"username": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "top-level-nested-50000-deep": b"[" * 50_000 + b"]" * 50_000,
    "invalid-utf-8": b'{"username": "\xff\xfe", "password": "pass-1234-x"}',
    "nan-literal": b'{"prompt": "a fox", "width": NaN, "username": "u1", "password": NaN}',
    "infinity-literal": b'{"prompt": "a fox", "steps": Infinity, "password": Infinity}',
    "lone-surrogate-escape": b'{"prompt": "\\ud800", "username": "user1", "password": "\\ud800"}',
}


def _post(h, route, body: bytes, alice):
    module, path, signed_in = JSON_ROUTES[route]
    user = alice if signed_in else None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        # Not text: API Gateway hands such a body to Lambda base64-encoded.
        return h.call(module, "POST", path, binary_body=body, user=user)
    return h.call(module, "POST", path, raw_body=text, user=user)


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize("kind", BROKEN_BODIES)
def test_a_body_json_cannot_parse_is_400_naming_the_body(make_stack, alice, route, kind):
    h = make_stack(endpoints=[])

    response = _post(h, route, BROKEN_BODIES[kind], alice)

    assert response.status == 400, response.body
    error = response.json()
    assert is_error_shape(error), error
    assert (error["code"], error["field"]) == ("INVALID_JSON", "body")
    assert error["error"].startswith("request body is not valid JSON")


def test_a_submit_with_a_4400_digit_seed_is_refused_and_queues_nothing(make_stack, alice):
    h = make_stack(endpoints=[])
    body = b'{"prompt": "a red fox", "seed": ' + b"9" * 4400 + b"}"

    response = _post(h, "submit", body, alice)

    assert (response.status, response.json()["field"]) == (400, "body")
    assert h.call("tasks_handler", "GET", "/api/v1/tasks", user=alice).json() == []


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_no_body_an_attacker_sends_is_a_5xx(make_stack, alice, route):
    h = make_stack(endpoints=[])

    @settings(
        max_examples=40,
        deadline=None,
        derandomize=True,  # the same bodies every run: a failure here is reproducible
        suppress_health_check=list(HealthCheck),
    )
    @given(body=hostile_bodies("username", "prompt", "width"))
    def no_5xx(body: bytes) -> None:
        response = _post(h, route, body, alice)
        assert response.status < 500, (body[:200], response.body)
        if response.status >= 400:
            assert is_error_shape(response.json()), (body[:200], response.body)

    no_5xx()


def test_every_api_answer_tells_browsers_not_to_sniff_its_type(make_stack, alice):
    h = make_stack(endpoints=[])

    answers = [
        h.call("auth_handler", "POST", "/register", raw_body="{not json"),
        h.call("auth_handler", "POST", "/login", body={"username": "nobody", "password": "x"}),
        h.submit(alice),
        h.call("tasks_handler", "GET", "/api/v1/no-such-route", user=alice),
    ]

    assert [a.status for a in answers] == [400, 401, 202, 404]
    assert {a.headers.get("x-content-type-options") for a in answers} == {"nosniff"}
