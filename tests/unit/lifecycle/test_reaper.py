"""The reaper's rules without AWS: re-send backoff, the index, its place in the template."""

from __future__ import annotations

from typing import Any

from gpuqueue.lifecycle.reaper import ReaperPolicy
from gpuqueue.store.task_store import REAP_INDEX, REAP_SHARDS, reap_shard
from gpuqueue.task_states import ReapState
from gpuqueue_local.template import load_template

RESOURCES: dict[str, Any] = load_template()["Resources"]


def test_resends_back_off_doubling_up_to_the_cap():
    policy = ReaperPolicy(max_attempts=3, requeue_after_seconds=900)
    waits = [policy.wait_after_resend(n) for n in range(1, 6)]
    assert waits == [1800, 3600, 3600, 3600, 3600]
    # Before any re-send: the first wait itself.
    assert policy.wait_after_resend(0) == 900


def test_a_task_stays_in_one_shard_per_state():
    shards = {reap_shard(f"task-{i}", ReapState.QUEUED) for i in range(200)}
    assert shards == {f"queued#{n}" for n in range(REAP_SHARDS)}
    assert reap_shard("abc", ReapState.RUNNING) == reap_shard("abc", ReapState.RUNNING)
    assert reap_shard("abc", ReapState.RUNNING).startswith("running#")


def test_the_tasks_table_has_the_sparse_reap_index():
    table = RESOURCES["TasksTable"]["Properties"]
    [index] = [i for i in table["GlobalSecondaryIndexes"] if i["IndexName"] == REAP_INDEX]
    assert [k["AttributeName"] for k in index["KeySchema"]] == ["reap_shard", "reap_at"]
    assert index["Projection"] == {"ProjectionType": "KEYS_ONLY"}
    types = {a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]}
    assert types["reap_shard"] == "S"
    assert types["reap_at"] == "N"


def test_the_reaper_runs_every_minute_with_only_what_it_needs():
    function = RESOURCES["ReaperFunction"]["Properties"]
    [event] = function["Events"].values()
    assert event["Type"] == "Schedule"
    assert event["Properties"]["Schedule"] == "rate(1 minute)"
    statements = function["Policies"][0]["Statement"]
    actions = sorted(
        action
        for statement in statements
        for action in (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
    )
    assert actions == ["dynamodb:GetItem", "dynamodb:Query", "dynamodb:UpdateItem"]
    [query] = [s for s in statements if s["Action"] == "dynamodb:Query"]
    assert query["Resource"] == {"Fn::Sub": "${TasksTable.Arn}/index/by-reap"}
    sends = [p for p in function["Policies"][1:] if "SQSSendMessagePolicy" in p]
    assert len(sends) == 2  # both lanes; no receive, no delete
    assert len(function["Policies"]) == 3


def test_each_resend_doubles_the_wait_below_the_cap():
    policy = ReaperPolicy(
        max_attempts=3, requeue_after_seconds=900, requeue_backoff_cap_seconds=100_000
    )
    assert [policy.wait_after_resend(n) for n in range(1, 5)] == [1800, 3600, 7200, 14400]
