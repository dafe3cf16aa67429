"""Validation errors name the field a client sent, not pydantic's location tuple."""

from __future__ import annotations

from typing import Any

import pytest

from gpuqueue.api.resolver import _field_name


@pytest.mark.parametrize(
    ("loc", "field"),
    [
        (("body", "prompt"), "prompt"),
        (("query", "limit"), "limit"),
        (("path", "task_id"), "task_id"),
        (("header", "authorization"), "authorization"),
        (("body", "params", "width"), "params.width"),
        (("body", "items", 0), "items.0"),
        (("body",), "body"),
        (("query",), "query"),
        ((), "body"),
    ],
)
def test_field_name_drops_the_request_part_and_joins_the_rest(
    loc: tuple[Any, ...], field: str
) -> None:
    assert _field_name(loc) == field
