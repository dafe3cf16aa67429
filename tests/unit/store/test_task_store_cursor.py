"""The opaque pagination cursor of GET /api/v1/tasks."""

from __future__ import annotations

import pytest

from gpuqueue.errors import InvalidInput
from gpuqueue.store.task_store import _decode_cursor, _encode_cursor

KEY = {
    "task_id": "0b5c1f9e-7a34-4a8e-9d55-2a1e3b4c5d6f",
    "user_id": "5f0c2a6e-1111-2222-3333-444455556666",
    "created_at": "2026-01-27T10:00:00.123456Z",
}


def test_a_cursor_decodes_back_to_the_key_it_was_made_from() -> None:
    assert _decode_cursor(_encode_cursor(KEY)) == KEY


def test_a_cursor_is_safe_to_put_in_a_query_string() -> None:
    cursor = _encode_cursor({**KEY, "user_id": "ünïcode+/user?"})

    assert set(cursor) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@pytest.mark.parametrize(
    "cursor",
    [
        pytest.param("", id="empty"),
        pytest.param("!!!", id="not-base64"),
        pytest.param("bm90IGpzb24", id="base64-of-text"),
        pytest.param(_encode_cursor({}), id="empty-object"),
        pytest.param("WzEsMiwzXQ", id="json-list"),
        pytest.param(_encode_cursor({"task_id": "t", "user_id": "u"}), id="missing-created_at"),
        pytest.param(_encode_cursor({**KEY, "status": "DONE"}), id="extra-key"),
        pytest.param("_-8", id="invalid-utf8"),
    ],
)
def test_a_garbage_cursor_is_invalid_input_on_the_cursor_field(cursor: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        _decode_cursor(cursor)

    assert raised.value.field == "cursor"
