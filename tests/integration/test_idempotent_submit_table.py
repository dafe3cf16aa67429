"""IdempotentSubmitter on one limits table (from template.yaml), no stack: what a key replays,
what it refuses, what it is scoped to, and how long its record lives.

The HTTP answers (201 replayed, 422, 400) are in test_idempotency.py over the whole stack;
these drive the class directly, fast enough for `make mutate` to run against every mutant.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from gpuqueue.errors import IdempotencyConflict, InvalidInput, TaskStateConflict
from gpuqueue.intake.idempotent_submit import MAX_KEY_LENGTH, IdempotentSubmitter, validate_key
from gpuqueue_testing import FakeLambdaContext

TTL = 600


class Recorder:
    """The submit behind the key: one new task id per call, and what each call was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any], frozenset[str]]] = []

    def __call__(self, user: str, body: dict[str, Any], groups: frozenset[str]) -> dict[str, Any]:
        self.calls.append((user, body, groups))
        return {"task_id": f"task-{len(self.calls)}", "user": user}


@pytest.fixture
def table(template_table: Callable[[str], Any]) -> Any:
    return template_table("LimitsTable")


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def client(operator_dynamodb_client: Any) -> Any:
    # A plain client: a resource's own client would re-serialise Powertools' typed values.
    return operator_dynamodb_client


@pytest.fixture
def submitter(table: Any, client: Any, recorder: Recorder) -> IdempotentSubmitter:
    submitter = IdempotentSubmitter(
        table_name=table.name, expires_after_seconds=TTL, submit=recorder, client=client
    )
    submitter.register_lambda_context(FakeLambdaContext(timeout_seconds=30))
    return submitter


def test_the_same_key_and_body_replay_the_first_answer_without_a_second_submit(
    submitter: IdempotentSubmitter, recorder: Recorder
) -> None:
    first = submitter.submit("alice", "k1", {"prompt": "a cat"}, groups=["vip"])
    again = submitter.submit("alice", "k1", {"prompt": "a cat"}, groups=["vip"])

    assert first == again == {"task_id": "task-1", "user": "alice"}
    assert recorder.calls == [("alice", {"prompt": "a cat"}, frozenset({"vip"}))]


def test_the_same_key_with_another_body_is_refused_naming_the_header(
    submitter: IdempotentSubmitter, recorder: Recorder
) -> None:
    submitter.submit("alice", "k1", {"prompt": "a cat"})

    with pytest.raises(IdempotencyConflict) as refused:
        submitter.submit("alice", "k1", {"prompt": "a dog"})

    assert refused.value.field == "Idempotency-Key"
    assert refused.value.message == "Idempotency-Key was used with another request body"
    assert len(recorder.calls) == 1


def test_keys_are_scoped_per_user(submitter: IdempotentSubmitter, recorder: Recorder) -> None:
    alice = submitter.submit("alice", "k1", {"prompt": "a cat"})
    bob = submitter.submit("bob", "k1", {"prompt": "a cat"})

    assert alice["user"] == "alice"
    assert bob["user"] == "bob"
    assert len(recorder.calls) == 2


def test_two_keys_of_one_user_are_two_submits_even_with_one_body(
    submitter: IdempotentSubmitter, recorder: Recorder
) -> None:
    first = submitter.submit("alice", "k1", {"prompt": "a cat"})
    second = submitter.submit("alice", "k2", {"prompt": "a cat"})

    assert first["task_id"] != second["task_id"]
    assert len(recorder.calls) == 2


def test_the_groups_authorise_but_are_not_part_of_the_key(
    submitter: IdempotentSubmitter, recorder: Recorder
) -> None:
    first = submitter.submit("alice", "k1", {"prompt": "a cat"}, groups=["vip"])
    again = submitter.submit("alice", "k1", {"prompt": "a cat"}, groups=[])

    assert again == first
    assert len(recorder.calls) == 1


def test_spaces_around_a_key_do_not_count(
    submitter: IdempotentSubmitter, recorder: Recorder
) -> None:
    first = submitter.submit("alice", "k1", {"prompt": "a cat"})
    again = submitter.submit("alice", "  k1 ", {"prompt": "a cat"})

    assert again == first
    assert len(recorder.calls) == 1


def test_a_replay_while_the_first_still_runs_is_a_conflict_to_retry(
    table: Any, client: Any
) -> None:
    seen: list[TaskStateConflict] = []
    in_progress: list[dict[str, Any]] = []
    submitter: IdempotentSubmitter

    def submit(user: str, body: dict[str, Any], groups: frozenset[str]) -> dict[str, Any]:
        in_progress.extend(table.scan(ConsistentRead=True)["Items"])
        try:  # the same request again while this one holds the key
            submitter.submit(user, "k1", body)
        except TaskStateConflict as error:
            seen.append(error)
        return {"task_id": "task-1"}

    submitter = IdempotentSubmitter(
        table_name=table.name, expires_after_seconds=TTL, submit=submit, client=client
    )
    submitter.register_lambda_context(FakeLambdaContext(timeout_seconds=30))
    started_ms = time.time() * 1000
    assert submitter.submit("alice", "k1", {"prompt": "a cat"}) == {"task_id": "task-1"}

    # The in-progress record lapses with the invocation holding it (30 s here), so a crashed
    # invocation does not block its key for the whole TTL.
    [record] = in_progress
    assert record["status"] == "INPROGRESS"
    assert started_ms < int(record["in_progress_expiration"]) <= started_ms + 30_000 + 1000
    [conflict] = seen
    assert conflict.field == "Idempotency-Key"
    assert conflict.message == (
        "a request with this Idempotency-Key is still being processed; retry shortly"
    )


def test_the_record_lives_for_the_configured_time(
    submitter: IdempotentSubmitter, table: Any
) -> None:
    before = time.time()
    submitter.submit("alice", "k1", {"prompt": "a cat"})

    [record] = table.scan(ConsistentRead=True)["Items"]

    assert record["status"] == "COMPLETED"
    assert before + TTL - 1 <= int(record["expires_at"]) <= time.time() + TTL + 1


@pytest.mark.parametrize("key", ["k", "x" * MAX_KEY_LENGTH, "  padded  ", "a key with spaces"])
def test_a_key_is_1_to_255_printable_characters(key: str) -> None:
    assert validate_key(key) == key.strip()


@pytest.mark.parametrize("key", ["", "   ", "x" * (MAX_KEY_LENGTH + 1), "bad\x00key", "tab\tin"])
def test_an_unusable_key_is_refused_naming_the_header(key: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        validate_key(key)
    assert refused.value.field == "Idempotency-Key"
    assert refused.value.message == f"Idempotency-Key: 1-{MAX_KEY_LENGTH} printable characters"


def test_an_unusable_key_is_refused_before_anything_is_submitted(
    submitter: IdempotentSubmitter, recorder: Recorder
) -> None:
    with pytest.raises(InvalidInput):
        submitter.submit("alice", "", {"prompt": "a cat"})
    assert recorder.calls == []
