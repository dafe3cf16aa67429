"""The data-access layer's SDK errors come out as StoreError (gpuqueue.store.sdk_errors)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from gpuqueue.errors import StoreError
from gpuqueue.store.sdk_errors import raises_store_error


class Queue:
    def __init__(self, failure: Exception | None = None) -> None:
        self.failure = failure

    @raises_store_error("task queue")
    def send(self, body: str) -> str:
        if self.failure is not None:
            raise self.failure
        return f"sent {body}"


def test_a_refused_call_becomes_a_store_error_naming_the_store_and_the_aws_code() -> None:
    refused = ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow"}}, "Send")

    with pytest.raises(StoreError, match="task queue: ClientError ThrottlingException") as caught:
        Queue(refused).send("x")

    assert caught.value.__cause__ is refused
    assert (caught.value.sdk_error, caught.value.code) == ("ClientError", "ThrottlingException")


def test_an_unreachable_store_becomes_a_store_error_too() -> None:
    unreachable = EndpointConnectionError(endpoint_url="https://sqs.example")

    with pytest.raises(StoreError) as caught:
        Queue(unreachable).send("x")

    assert caught.value.sdk_error == "EndpointConnectionError"
    assert caught.value.code == ""


def test_other_errors_and_answers_pass_through_unchanged() -> None:
    assert Queue().send("x") == "sent x"
    with pytest.raises(ValueError, match="bad"):
        Queue(ValueError("bad")).send("x")
