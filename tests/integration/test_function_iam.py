"""Each function runs with its role's permissions only, refused as AWS refuses (moto_iam).

Given a stack provisioned from template.yaml, each function's keys may do what its role
grants and nothing else: a call outside the role answers AccessDeniedException naming the
action and the resource, as DynamoDB, SQS and S3 answer on AWS.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.exceptions import ClientError

from gpuqueue_local.sam_transform import transformed_template
from gpuqueue_local.template import load_template

FUNCTIONS = sorted(
    logical_id
    for logical_id, resource in load_template()["Resources"].items()
    if resource["Type"] == "AWS::Serverless::Function"
)


def _client(h: Any, function: str, service: str) -> Any:
    identity = h.stack.identities[function]
    return boto3.client(
        service,
        region_name="us-east-1",
        aws_access_key_id=identity.access_key_id,
        aws_secret_access_key=identity.secret_access_key,
        config=Config(retries={"max_attempts": 1}, signature_version="s3v4")
        if service == "s3"
        else Config(retries={"max_attempts": 1}),
    )


def test_no_function_may_scan_delete_or_purge_what_its_role_does_not_grant(
    make_stack, refused_calls
):
    h = make_stack()
    table, queue = h.stack.ref("TasksTable"), h.stack.ref("TaskQueue")

    for function in FUNCTIONS:
        dynamodb, sqs = _client(h, function, "dynamodb"), _client(h, function, "sqs")
        for client, operation, arguments in (
            (dynamodb, "scan", {"TableName": table}),
            (dynamodb, "delete_table", {"TableName": table}),
            (sqs, "purge_queue", {"QueueUrl": queue}),
        ):
            with pytest.raises(ClientError) as refused:
                getattr(client, operation)(**arguments)
            error = refused.value.response["Error"]
            assert "AccessDenied" in error["Code"], (function, error)
            assert function in error["Message"], (function, error)
    assert len(refused_calls) == 3 * len(FUNCTIONS)
    assert {d.action for d in refused_calls} == {
        "dynamodb:Scan",
        "dynamodb:DeleteTable",
        "sqs:PurgeQueue",
    }
    refused_calls.clear()  # refused on purpose


def test_the_dispatcher_may_do_what_its_role_grants_and_no_more(make_stack, refused_calls):
    h = make_stack()
    dynamodb = _client(h, "DispatcherFunction", "dynamodb")
    tasks, limits = h.stack.ref("TasksTable"), h.stack.ref("LimitsTable")

    # Granted: reading a task (absent here) answers normally; so does the consistent read
    # of the fleet (a scan of the endpoints table, the only table it may scan).
    assert "Item" not in dynamodb.get_item(TableName=tasks, Key={"task_id": {"S": "none"}})
    endpoints = h.stack.ref("EndpointsTable")
    assert dynamodb.scan(TableName=endpoints, ConsistentRead=True)["Count"] >= 0
    # Not granted: the limits table (rate limits, shares) is not the dispatcher's business.
    with pytest.raises(ClientError) as refused:
        dynamodb.get_item(TableName=limits, Key={"pk": {"S": "x"}})
    assert refused.value.response["Error"]["Code"] == "AccessDeniedException"
    assert [(d.principal.endswith("DispatcherFunction"), d.action) for d in refused_calls] == [
        (True, "dynamodb:GetItem")
    ]
    refused_calls.clear()


def test_a_transaction_is_authorized_item_by_item(make_stack, refused_calls):
    # The reaper may update the tasks table, not the limits table: a transaction that
    # touches both is refused as a whole, naming the action of the refused item.
    h = make_stack()
    dynamodb = _client(h, "ReaperFunction", "dynamodb")
    update = {
        "Key": {"task_id": {"S": "t"}},
        "UpdateExpression": "SET n = :n",
        "ExpressionAttributeValues": {":n": {"N": "1"}},
    }
    with pytest.raises(ClientError) as refused:
        dynamodb.transact_write_items(
            TransactItems=[
                {"Update": {"TableName": h.stack.ref("TasksTable"), **update}},
                {
                    "Update": {
                        "TableName": h.stack.ref("LimitsTable"),
                        **update,
                        "Key": {"pk": {"S": "t"}},
                    }
                },
            ]
        )
    assert refused.value.response["Error"]["Code"] == "AccessDeniedException"
    assert "LimitsTable" in refused.value.response["Error"]["Message"]
    refused_calls.clear()


def test_presigned_urls_are_checked_for_signature_expiry_and_the_signers_role(
    make_stack, refused_calls
):
    h = make_stack()
    bucket = h.stack.ref("ImagesBucket")
    boto3.client("s3").put_object(Bucket=bucket, Key="results/t.png", Body=b"png")
    tasks_s3 = _client(h, "TasksFunction", "s3")
    auth_s3 = _client(h, "AuthFunction", "s3")

    good = tasks_s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "results/t.png"}, ExpiresIn=60
    )
    assert requests.get(good, timeout=10).content == b"png"

    # Signed earlier than it is used (a client fetches it later): still good until it expires.
    signed_earlier = datetime.now(UTC) - timedelta(seconds=30)
    with mock.patch("botocore.auth.get_current_datetime", return_value=signed_earlier):
        earlier = tasks_s3.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": "results/t.png"}, ExpiresIn=60
        )
    assert "X-Amz-Date=" + signed_earlier.strftime("%Y%m%dT%H%M%SZ") in earlier
    used = requests.get(earlier, timeout=10)
    assert (used.status_code, used.content) == (200, b"png"), used.text

    tampered = good.replace("results/t.png", "results/u.png")
    assert requests.get(tampered, timeout=10).status_code == 403

    expired = tasks_s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "results/t.png"}, ExpiresIn=1
    )
    deadline = time.monotonic() + 5
    while requests.get(expired, timeout=10).status_code == 200:
        assert time.monotonic() < deadline, "an expired presigned URL is still served"
        time.sleep(0.2)
    answer = requests.get(expired, timeout=10)
    assert answer.status_code == 403
    assert b"Request has expired" in answer.content

    # Signed by a function whose role may not read the bucket.
    foreign = auth_s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "results/t.png"}, ExpiresIn=60
    )
    assert requests.get(foreign, timeout=10).status_code == 403
    assert [d.action for d in refused_calls] == ["s3:GetObject"]
    refused_calls.clear()


def test_every_function_has_an_identity_from_its_transformed_role(make_stack):
    h = make_stack()
    transformed = transformed_template()

    assert set(h.stack.identities) == set(FUNCTIONS)
    for function in FUNCTIONS:
        role = transformed["Resources"][function]["Properties"]["Role"]["Fn::GetAtt"][0]
        inline = transformed["Resources"][role]["Properties"].get("Policies", [])
        managed = transformed["Resources"][role]["Properties"].get("ManagedPolicyArns", [])
        assert len(h.stack.identities[function].policies) == len(inline) + len(managed)
