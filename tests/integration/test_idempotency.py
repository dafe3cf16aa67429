"""Idempotency-Key on submit: a retried submit never creates a second task or message."""

from __future__ import annotations


def _submit(h, user, body, key):
    return h.call(
        "submit_handler",
        "POST",
        "/api/v1/image/async",
        body=body,
        user=user,
        headers={"Idempotency-Key": key},
    )


def test_the_same_key_and_body_give_the_same_task_and_one_message(make_stack, alice):
    h = make_stack()
    body = {"prompt": "a red fox"}

    answers = [_submit(h, alice, body, "order-42") for _ in range(3)]

    assert [a.status for a in answers] == [202, 202, 202]
    assert len({a.json()["task_id"] for a in answers}) == 1
    assert len(h.receive(max_messages=10)) == 1


def test_the_same_key_with_another_body_is_a_422(make_stack, alice):
    h = make_stack()
    _submit(h, alice, {"prompt": "a red fox"}, "order-43")

    response = _submit(h, alice, {"prompt": "a blue fox"}, "order-43")

    assert response.status == 422
    assert response.json()["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert response.json()["field"] == "Idempotency-Key"
    assert response.json()["error"] == "Idempotency-Key was used with another request body"


def test_keys_are_scoped_per_user(make_stack, alice, bob):
    h = make_stack()
    body = {"prompt": "a red fox"}

    first = _submit(h, alice, body, "same-key").json()["task_id"]
    second = _submit(h, bob, body, "same-key").json()["task_id"]

    assert first != second
    assert h.get_task(bob, second).status == 200


def test_without_a_key_every_submit_is_a_new_task(make_stack, alice):
    h = make_stack()

    ids = {h.submit(alice, {"prompt": "p"}).json()["task_id"] for _ in range(2)}

    assert len(ids) == 2


def test_an_unusable_key_is_a_400(make_stack, alice):
    h = make_stack()

    response = _submit(h, alice, {"prompt": "p"}, "x" * 300)

    assert response.status == 400
    assert response.json()["field"] == "Idempotency-Key"


def test_two_keys_of_one_user_are_two_tasks_even_with_the_same_body(make_stack, alice):
    h = make_stack()
    body = {"prompt": "a red fox"}

    first = _submit(h, alice, body, "order-1").json()["task_id"]
    second = _submit(h, alice, body, "order-2").json()["task_id"]

    assert first != second
    assert len(h.receive(max_messages=10)) == 2


def test_a_key_is_1_to_255_printable_characters_around_which_spaces_do_not_count(make_stack, alice):
    h = make_stack()
    body = {"prompt": "p"}

    one = _submit(h, alice, body, "k")
    longest = _submit(h, alice, body, "y" * 255)
    padded = _submit(h, alice, body, "  k  ")

    assert (one.status, longest.status, padded.status) == (202, 202, 202)
    assert padded.json()["task_id"] == one.json()["task_id"]
    for unusable in ("y" * 256, "a\u0007b"):
        refused = _submit(h, alice, body, unusable)
        assert refused.status == 400
        assert refused.json()["error"] == "Idempotency-Key: 1-255 printable characters"
