"""Request bodies an attacker would send: hypothesis strategies shared by the integration
and e2e fuzzing of the JSON routes (tests/integration/test_request_bodies.py,
tests/e2e/test_fuzz_api.py).

Each is bytes: JSON whose numbers or nesting break a naive parser, tokens that are not JSON,
bytes that are not UTF-8, and well-formed JSON of the wrong shape.
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

# Past Python's int <-> str limit (4,300 digits): json.loads raised ValueError on these.
HUGE_INTEGERS = st.integers(min_value=4_301, max_value=6_000).map(lambda n: "9" * n)
# Past Python's recursion limit: json.loads raised RecursionError on these.
DEEP_NESTING = st.integers(min_value=1_000, max_value=60_000).map(
    lambda depth: "[" * depth + "]" * depth
)
NOT_JSON_TOKENS = st.sampled_from(["NaN", "-Infinity", "Infinity", "1e999", "-", "{", "'x'"])

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def _in_field(field: str) -> st.SearchStrategy[str]:
    """A payload spliced into one field of an otherwise plausible object."""
    payload = HUGE_INTEGERS | DEEP_NESTING | NOT_JSON_TOKENS | JSON_VALUES.map(json.dumps)
    return payload.map(lambda text: f'{{"{field}": {text}, "password": "pass-1234-x"}}')


def hostile_bodies(*fields: str) -> st.SearchStrategy[bytes]:
    """Bodies for a JSON route whose object has `fields`."""
    texts = st.one_of(
        HUGE_INTEGERS,
        DEEP_NESTING,
        NOT_JSON_TOKENS,
        JSON_VALUES.map(json.dumps),
        *(_in_field(field) for field in fields),
    )
    invalid_utf8 = st.binary(min_size=1, max_size=24).map(
        lambda raw: b'{"username": "' + raw + b'\xff"}'
    )
    return texts.map(str.encode) | invalid_utf8 | st.binary(max_size=32)


def is_error_shape(body: object) -> bool:
    """The API's JSON error: {"error": message, "code": CODE, "field"?: name}."""
    return (
        isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and bool(body["error"])
        and isinstance(body.get("code"), str)
        and bool(body["code"])
        and (body.get("field") is None or isinstance(body["field"], str))
    )
