"""Invariants of template.yaml: the reliability and security rules the stack must keep.

Each test reads the real template (plain dicts; intrinsics stay as {"Ref": ..} etc.) and
resolves parameter references to their defaults where a number is needed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import samtranslator
from pydantic import ValidationError

from gpuqueue import settings
from gpuqueue.gpu.image_client import IMAGE_ANSWER_IN_MEMORY, image_answer_limit
from gpuqueue.gpu.memory_budget import HEADROOM_MB, MIB
from gpuqueue.gpu.speech_client import TRANSCRIPT_ANSWER_IN_MEMORY, TRANSCRIPT_ANSWER_LIMIT
from gpuqueue.intake.submission import PRIORITY_GROUPS
from gpuqueue.models import TERMINAL_STATUSES, ImageParams
from gpuqueue_local.template import (
    Resolver,
    function_property,
    load_template,
    parameter_values,
    resources_of_type,
)
from template_functions import (
    GLOBAL_ENV,
    HANDLER_MODULE_BY_FUNCTION,
    HANDLER_MODULES,
    environment_keys,
    settings_model,
)

ROOT = Path(__file__).resolve().parents[3]
EVENTS_DIR = ROOT / "events"
# Not an event: the env vars `sam local invoke` gets (tests/integration/test_sam_local_env.py).
SAM_ENV_FILE = "env.local.json"


def _event_files() -> list[Path]:
    return sorted(f for f in EVENTS_DIR.glob("*.json") if f.name != SAM_ENV_FILE)


TEMPLATE = load_template()
RESOURCES: dict[str, dict[str, Any]] = TEMPLATE["Resources"]
PARAMETERS: dict[str, dict[str, Any]] = TEMPLATE["Parameters"]
FUNCTIONS = resources_of_type(TEMPLATE, "AWS::Serverless::Function")
SAM_POLICY_TEMPLATES: dict[str, Any] = json.loads(
    (
        Path(samtranslator.__file__).parent / "policy_templates_data" / "policy_templates.json"
    ).read_text()
)["Templates"]

# Login, and the API's documentation (its OpenAPI document and Swagger UI: no user data).
PUBLIC_ROUTES = {
    ("POST", "/register"),
    ("POST", "/register/confirm"),
    ("POST", "/login"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    # Cog's webhooks: the GPU server cannot sign in; the per-attempt token in the URL is
    # checked by the function (gpuqueue.dispatch.cog_callbacks).
    ("POST", "/api/v1/callbacks/cog/{task_id}"),
}
SEED_ROUTES = {
    ("POST", "/register"),
    ("POST", "/login"),
    ("POST", "/api/v1/image/async"),
    ("GET", "/api/v1/tasks"),
    ("GET", "/api/v1/tasks/{task_id}"),
    ("DELETE", "/api/v1/tasks/{task_id}"),
    ("GET", "/api/images/{task_id}"),
    ("GET", "/api/v1/system/stats"),
}


# --- helpers --------------------------------------------------------------------------------


def props(logical_id: str) -> dict[str, Any]:
    properties: dict[str, Any] = RESOURCES[logical_id]["Properties"]
    return properties


def number(value: Any) -> int:
    """A literal, or a {"Ref": parameter} resolved to the parameter's Default."""
    if isinstance(value, dict) and set(value) == {"Ref"}:
        return int(PARAMETERS[value["Ref"]]["Default"])
    return int(value)


def ref_name(value: Any) -> str | None:
    """The logical id a Ref / Fn::GetAtt points at, or None for anything else."""
    if isinstance(value, dict) and len(value) == 1:
        ((key, arg),) = value.items()
        if key == "Ref":
            return str(arg)
        if key == "Fn::GetAtt":
            return str(arg[0] if isinstance(arg, list) else str(arg).split(".", 1)[0])
    return None


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def dispatcher_sqs_event() -> dict[str, Any]:
    events = props("DispatcherFunction")["Events"]
    sqs_events: list[dict[str, Any]] = [
        e["Properties"] for e in events.values() if e["Type"] == "SQS"
    ]
    assert len(sqs_events) == 1, "the dispatcher has exactly one SQS event source"
    return sqs_events[0]


def http_api_events() -> Iterator[tuple[str, dict[str, Any]]]:
    for logical_id, function in FUNCTIONS.items():
        for event in function["Properties"].get("Events", {}).values():
            if event["Type"] == "HttpApi":
                yield logical_id, event["Properties"]


def route(event: dict[str, Any]) -> tuple[str, str]:
    return str(event["Method"]).upper(), str(event["Path"])


def policy_statements() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every IAM statement the template grants: function inline policies and IAM resources."""
    for logical_id, function in FUNCTIONS.items():
        for entry in function["Properties"].get("Policies", []):
            if isinstance(entry, dict) and "Statement" in entry:
                for statement in as_list(entry["Statement"]):
                    yield logical_id, statement
    for logical_id, resource in resources_of_type(
        TEMPLATE, "AWS::IAM::Policy", "AWS::IAM::ManagedPolicy"
    ).items():
        for statement in as_list(resource["Properties"]["PolicyDocument"]["Statement"]):
            yield logical_id, statement
    for logical_id, resource in resources_of_type(TEMPLATE, "AWS::IAM::Role").items():
        for policy in resource["Properties"].get("Policies", []):
            for statement in as_list(policy["PolicyDocument"]["Statement"]):
                yield logical_id, statement


# --- the queue and the worker pool ----------------------------------------------------------
# AWS's numeric limits (MaximumConcurrency, reserved concurrency, visibility timeouts) are
# checked on the transformed template for every allowed parameter value:
# tests/unit/template/test_template_limits.py.


def test_dispatcher_timeout_outlasts_the_longest_allowed_gpu_call() -> None:
    dispatcher_timeout = number(function_property(TEMPLATE, "DispatcherFunction", "Timeout"))

    assert dispatcher_timeout > int(PARAMETERS["TaskTimeoutSeconds"]["MaxValue"])


def test_dispatcher_takes_one_message_per_invocation() -> None:
    assert dispatcher_sqs_event()["BatchSize"] == 1


def test_dispatcher_reports_partial_batch_failures() -> None:
    assert "ReportBatchItemFailures" in dispatcher_sqs_event()["FunctionResponseTypes"]


def test_dispatcher_reads_from_the_task_queue() -> None:
    assert ref_name(dispatcher_sqs_event()["Queue"]) == "TaskQueue"


def test_redrive_allows_at_least_five_receives_before_dead_lettering() -> None:
    redrive = props("TaskQueue")["RedrivePolicy"]

    assert number(redrive["maxReceiveCount"]) >= 5
    assert ref_name(redrive["deadLetterTargetArn"]) == "TaskDeadLetterQueue"


def test_max_receive_count_parameter_cannot_be_set_below_five() -> None:
    redrive = props("TaskQueue")["RedrivePolicy"]
    parameter = PARAMETERS[ref_name(redrive["maxReceiveCount"]) or ""]

    assert int(parameter["MinValue"]) >= 5


def test_both_queues_declare_their_retention_explicitly() -> None:
    assert "MessageRetentionPeriod" in props("TaskQueue")
    assert "MessageRetentionPeriod" in props("TaskDeadLetterQueue")


def test_dead_letter_queue_keeps_messages_longer_than_the_task_queue() -> None:
    dlq_retention = number(props("TaskDeadLetterQueue")["MessageRetentionPeriod"])

    assert dlq_retention > number(props("TaskQueue")["MessageRetentionPeriod"])


# --- the priority lane, and what follows a task's end --------------------------------------

LANE_DIFFERENCES = {
    "Description",
    "ReservedConcurrentExecutions",
    "LoggingConfig",
    "Environment",
    "Policies",
    "Events",
}


def _sqs_event(logical_id: str) -> dict[str, Any]:
    (event,) = [e["Properties"] for e in props(logical_id)["Events"].values() if e["Type"] == "SQS"]
    return event


def test_the_priority_dispatcher_is_the_dispatcher_on_its_own_queue() -> None:
    normal, high = props("DispatcherFunction"), props("PriorityDispatcherFunction")
    same = {k: v for k, v in normal.items() if k not in LANE_DIFFERENCES}

    assert {k: v for k, v in high.items() if k not in LANE_DIFFERENCES} == same
    # Its own queue, and one call per invocation: the lane may hold only its seats, so more
    # calls would only queue as high-priority waiters that normal workers yield to.
    env = dict(
        normal["Environment"]["Variables"],
        TASK_QUEUE_URL={"Ref": "PriorityQueue"},
        CALLS_PER_WORKER="1",
    )
    assert high["Environment"]["Variables"] == env
    event = _sqs_event("PriorityDispatcherFunction")
    assert ref_name(event["Queue"]) == "PriorityQueue"
    assert {k: v for k, v in event.items() if k not in ("Queue", "ScalingConfig")} == {
        k: v for k, v in dispatcher_sqs_event().items() if k not in ("Queue", "ScalingConfig")
    }


@pytest.mark.parametrize("slots", ["1", "2", "7", "1000"])
def test_the_priority_lane_runs_at_least_two_workers_and_caps_its_slots(slots: str) -> None:
    """SQS's MaximumConcurrency is 2 at least, so a one-slot lane gets 2 workers; the slot
    broker caps the slots they hold at PriorityLaneWorkers (PRIORITY_LANE_SLOTS)."""
    resolver = Resolver(
        parameters=parameter_values(TEMPLATE, {"PriorityLaneWorkers": slots}),
        pseudo={},
        conditions=TEMPLATE["Conditions"],
    )
    event = _sqs_event("PriorityDispatcherFunction")
    maximum = resolver.resolve(event["ScalingConfig"]["MaximumConcurrency"])
    reserved = resolver.resolve(props("PriorityDispatcherFunction")["ReservedConcurrentExecutions"])

    assert int(maximum) == int(reserved) == max(2, int(slots))
    for dispatcher in ("DispatcherFunction", "PriorityDispatcherFunction"):
        env = props(dispatcher)["Environment"]["Variables"]
        assert resolver.resolve(env["PRIORITY_LANE_SLOTS"]) == slots


def test_the_priority_queue_keeps_the_task_queues_invariants() -> None:
    queue, normal = props("PriorityQueue"), props("TaskQueue")

    assert ref_name(queue["RedrivePolicy"]["deadLetterTargetArn"]) == "PriorityDeadLetterQueue"
    assert queue["RedrivePolicy"]["maxReceiveCount"] == normal["RedrivePolicy"]["maxReceiveCount"]
    assert number(props("PriorityDeadLetterQueue")["MessageRetentionPeriod"]) > number(
        queue["MessageRetentionPeriod"]
    )


def test_the_groups_allowed_the_priority_lane_exist_in_the_user_pool() -> None:
    groups = {
        props(g)["GroupName"] for g in resources_of_type(TEMPLATE, "AWS::Cognito::UserPoolGroup")
    }

    assert groups >= PRIORITY_GROUPS


def test_the_task_events_function_sees_the_ends_and_the_departures_from_the_queue() -> None:
    (event,) = props("TaskEventsFunction")["Events"].values()
    ending, leaving, progress, cancel_asked = (
        json.loads(f["Pattern"]) for f in event["Properties"]["FilterCriteria"]["Filters"]
    )
    # A running task's progress and cancel asked (pushed): RUNNING stays RUNNING.
    for running in (progress, cancel_asked):
        assert running["dynamodb"]["OldImage"]["status"] == {"S": ["RUNNING"]}
        assert running["dynamodb"]["NewImage"]["status"] == {"S": ["RUNNING"]}
    assert progress["dynamodb"]["NewImage"]["progress"] == {
        "M": {"step": {"N": [{"exists": True}]}}
    }
    assert cancel_asked["dynamodb"]["OldImage"]["cancel_requested_at"] == {"S": [{"exists": False}]}
    pattern = ending
    final = sorted(s.value for s in TERMINAL_STATUSES)
    # The other filter: a queued task that never ran stops waiting (queue positions).
    assert leaving["dynamodb"]["OldImage"] == {"status": {"S": ["QUEUED"]}, "attempt": {"N": ["0"]}}
    assert leaving["dynamodb"]["NewImage"] == {"status": {"S": [{"anything-but": ["QUEUED"]}]}}

    assert event["Type"] == "DynamoDB"
    assert ref_name(event["Properties"]["Stream"]) == "TasksTable"
    assert pattern["eventName"] == ["MODIFY"]
    assert sorted(pattern["dynamodb"]["NewImage"]["status"]["S"]) == final
    (anything_but,) = pattern["dynamodb"]["OldImage"]["status"]["S"]
    assert sorted(anything_but["anything-but"]) == final
    assert "ReportBatchItemFailures" in event["Properties"]["FunctionResponseTypes"]
    on_failure = event["Properties"]["DestinationConfig"]["OnFailure"]["Destination"]
    assert ref_name(on_failure) == "TaskEventsDeadLetterQueue"


def test_the_dead_letter_consumer_reads_both_lanes_dead_letter_queues() -> None:
    queues = {
        ref_name(e["Properties"]["Queue"])
        for e in props("DeadletterFunction")["Events"].values()
        if e["Type"] == "SQS"
    }

    assert queues == {"TaskDeadLetterQueue", "PriorityDeadLetterQueue"}


# --- least privilege ------------------------------------------------------------------------


def test_no_allow_statement_grants_a_wildcard_action() -> None:
    wildcard = [
        (owner, action)
        for owner, statement in policy_statements()
        if statement.get("Effect") == "Allow"
        for action in as_list(statement.get("Action", []))
        if "*" in str(action)
    ]

    assert wildcard == []


def test_no_function_uses_a_full_access_managed_policy() -> None:
    names = [
        (logical_id, entry)
        for logical_id, function in FUNCTIONS.items()
        for entry in function["Properties"].get("Policies", [])
        if isinstance(entry, str)
    ]
    names += [
        (logical_id, arn)
        for logical_id, role in resources_of_type(TEMPLATE, "AWS::IAM::Role").items()
        for arn in role["Properties"].get("ManagedPolicyArns", [])
    ]

    assert [(owner, name) for owner, name in names if "FullAccess" in str(name)] == []


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_function_policies_are_single_resource_templates_or_scoped_statements(
    logical_id: str,
) -> None:
    for entry in props(logical_id).get("Policies", []):
        assert isinstance(entry, dict), f"{logical_id}: managed policy {entry!r} is not scoped"
        if "Statement" in entry:
            for statement in as_list(entry["Statement"]):
                resources = as_list(statement.get("Resource", "*"))
                assert "*" not in resources, f"{logical_id}: statement on every resource"
            continue
        assert len(entry) == 1, f"{logical_id}: {entry!r} is neither a template nor a statement"
        ((name, arguments),) = entry.items()
        assert name in SAM_POLICY_TEMPLATES, f"{logical_id}: {name} is not a SAM policy template"
        assert set(arguments) == set(SAM_POLICY_TEMPLATES[name]["Parameters"])
        assert len(arguments) == 1, f"{logical_id}: {name} is not scoped to one resource"
        (target,) = arguments.values()
        assert ref_name(target) in RESOURCES, f"{logical_id}: {name} names no stack resource"


# --- logging --------------------------------------------------------------------------------


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_every_function_logs_to_its_own_log_group_with_retention(logical_id: str) -> None:
    log_group_id = ref_name(props(logical_id)["LoggingConfig"]["LogGroup"])

    assert log_group_id is not None
    log_group = RESOURCES[log_group_id]
    assert log_group["Type"] == "AWS::Logs::LogGroup"
    assert "RetentionInDays" in log_group["Properties"]


def test_no_two_functions_share_a_log_group() -> None:
    groups = [ref_name(props(f)["LoggingConfig"]["LogGroup"]) for f in FUNCTIONS]

    assert len(set(groups)) == len(groups)


# --- sample events --------------------------------------------------------------------------


def _function_for_event_file(path: Path) -> str:
    """`taskevents_stream.json` -> TaskEventsFunction (the prefix is the name, lower case)."""
    prefix = path.stem.split("_", 1)[0]
    named = [f for f in FUNCTIONS if f.lower() == f"{prefix}function"]
    return named[0] if named else f"{prefix.capitalize()}Function"


def test_every_event_file_belongs_to_a_function_in_the_template() -> None:
    files = _event_files()
    orphans = [f.name for f in files if _function_for_event_file(f) not in FUNCTIONS]

    assert files
    assert orphans == []


def test_every_event_file_is_named_function_underscore_scenario() -> None:
    names = [f.name for f in EVENTS_DIR.iterdir() if f.is_file() and f.name != SAM_ENV_FILE]

    assert [n for n in names if not re.fullmatch(r"[a-z]+_[a-z0-9_]+\.json", n)] == []


def test_every_function_has_a_sample_event() -> None:
    covered = {_function_for_event_file(f) for f in _event_files()}

    assert set(FUNCTIONS) - covered == set()


# --- authentication -------------------------------------------------------------------------


def _jwt_authorizer() -> dict[str, Any]:
    auth = props("HttpApi")["Auth"]
    authorizer: dict[str, Any] = auth["Authorizers"][auth["DefaultAuthorizer"]]
    return authorizer


def test_http_api_defaults_to_a_jwt_authorizer() -> None:
    auth = props("HttpApi")["Auth"]

    assert auth["DefaultAuthorizer"] in auth["Authorizers"]
    assert "JwtConfiguration" in _jwt_authorizer()


def test_jwt_issuer_is_the_stacks_cognito_user_pool() -> None:
    issuer = _jwt_authorizer()["JwtConfiguration"]["issuer"]

    assert issuer == {"Fn::Sub": "https://cognito-idp.${AWS::Region}.amazonaws.com/${UserPool}"}
    assert RESOURCES["UserPool"]["Type"] == "AWS::Cognito::UserPool"


def test_jwt_audience_is_exactly_the_stacks_app_client() -> None:
    audience = _jwt_authorizer()["JwtConfiguration"]["audience"]

    assert audience == [{"Ref": "UserPoolClient"}]
    assert RESOURCES["UserPoolClient"]["Type"] == "AWS::Cognito::UserPoolClient"


def test_jwt_authorizer_requires_the_access_token_scope() -> None:
    assert "aws.cognito.signin.user.admin" in _jwt_authorizer()["AuthorizationScopes"]


def test_every_route_is_served_by_the_authorised_http_api() -> None:
    # A route without ApiId lands on SAM's implicit API, which has no authorizer.
    stray = [(f, route(e)) for f, e in http_api_events() if e.get("ApiId") != {"Ref": "HttpApi"}]

    assert stray == []


def test_only_register_login_and_the_api_docs_skip_the_authorizer() -> None:
    open_routes = {
        route(event)
        for _, event in http_api_events()
        if event.get("Auth", {}).get("Authorizer") == "NONE"
    }

    assert open_routes == PUBLIC_ROUTES


def test_every_other_route_uses_a_declared_authorizer() -> None:
    declared = set(props("HttpApi")["Auth"]["Authorizers"])
    for _, event in http_api_events():
        if route(event) in PUBLIC_ROUTES:
            continue
        authorizer = event.get("Auth", {}).get("Authorizer")
        assert authorizer is None or authorizer in declared, route(event)


def test_route_table_contains_every_seed_route() -> None:
    routes = {route(event) for _, event in http_api_events()}

    assert SEED_ROUTES - routes == set()


def test_no_route_is_declared_twice() -> None:
    routes = [route(event) for _, event in http_api_events()]

    assert len(routes) == len(set(routes))


# --- state ----------------------------------------------------------------------------------


def _key(key_schema: list[dict[str, str]]) -> dict[str, str]:
    return {k["KeyType"]: k["AttributeName"] for k in key_schema}


def test_tasks_table_is_keyed_by_task_id() -> None:
    assert _key(props("TasksTable")["KeySchema"]) == {"HASH": "task_id"}


def test_tasks_table_indexes_tasks_by_user_newest_first() -> None:
    indexes = {i["IndexName"]: i for i in props("TasksTable")["GlobalSecondaryIndexes"]}

    assert _key(indexes["by-user"]["KeySchema"]) == {"HASH": "user_id", "RANGE": "created_at"}


def test_tasks_table_expires_rows_on_expires_at() -> None:
    ttl = props("TasksTable")["TimeToLiveSpecification"]

    assert ttl == {"AttributeName": "expires_at", "Enabled": True}


@pytest.mark.parametrize("table", ["TasksTable", "EndpointsTable"])
def test_table_has_point_in_time_recovery(table: str) -> None:
    pitr = props(table)["PointInTimeRecoverySpecification"]

    assert pitr["PointInTimeRecoveryEnabled"] is True


@pytest.mark.parametrize("table", ["TasksTable", "EndpointsTable"])
def test_table_is_encrypted(table: str) -> None:
    assert props(table)["SSESpecification"]["SSEEnabled"] is True


def test_endpoints_table_is_keyed_by_endpoint_id() -> None:
    assert _key(props("EndpointsTable")["KeySchema"]) == {"HASH": "endpoint_id"}


# --- the images bucket ----------------------------------------------------------------------


def test_images_bucket_blocks_all_public_access() -> None:
    block = props("ImagesBucket")["PublicAccessBlockConfiguration"]

    assert block == {
        "BlockPublicAcls": True,
        "BlockPublicPolicy": True,
        "IgnorePublicAcls": True,
        "RestrictPublicBuckets": True,
    }


def test_images_bucket_encrypts_objects_at_rest() -> None:
    rules = props("ImagesBucket")["BucketEncryption"]["ServerSideEncryptionConfiguration"]

    assert rules
    assert all(r["ServerSideEncryptionByDefault"]["SSEAlgorithm"] for r in rules)


def _expiry_by_prefix() -> dict[str, Any]:
    rules = props("ImagesBucket")["LifecycleConfiguration"]["Rules"]
    return {
        r["Prefix"]: r["ExpirationInDays"]
        for r in rules
        if r.get("Status") == "Enabled" and "Prefix" in r and "ExpirationInDays" in r
    }


def test_images_expire_after_the_image_retention_period_and_transcripts_with_the_task() -> None:
    expiry = _expiry_by_prefix()

    assert expiry["results/"] == {"Ref": "ImageRetentionDays"}
    # S3 takes a whole number of days, at least 1.
    assert PARAMETERS["ImageRetentionDays"]["MinValue"] >= 1
    assert expiry["transcripts/"] == {"Ref": "TaskRetentionDays"}
    # The image route refuses what the rule may have deleted: it is told the same number.
    tasks_env = props("TasksFunction")["Environment"]["Variables"]
    assert tasks_env["IMAGE_RETENTION_DAYS"] == {"Ref": "ImageRetentionDays"}


def test_images_bucket_refuses_requests_without_tls() -> None:
    policies = [
        p["Properties"]
        for p in resources_of_type(TEMPLATE, "AWS::S3::BucketPolicy").values()
        if ref_name(p["Properties"]["Bucket"]) == "ImagesBucket"
    ]
    denials = [
        statement
        for policy in policies
        for statement in as_list(policy["PolicyDocument"]["Statement"])
        if statement["Effect"] == "Deny"
        and str(statement.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport")).lower()
        == "false"
    ]

    assert denials
    assert {"Fn::Sub": "${ImagesBucket.Arn}/*"} in as_list(denials[0]["Resource"])


# --- runtime, parameters, outputs -----------------------------------------------------------


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_function_runs_on_python_3_12_or_newer(logical_id: str) -> None:
    runtime = str(function_property(TEMPLATE, logical_id, "Runtime"))
    match = re.fullmatch(r"python(\d+)\.(\d+)", runtime)

    assert match, runtime
    assert (int(match[1]), int(match[2])) >= (3, 12)


def test_a_gpu_call_defaults_to_at_most_120_seconds() -> None:
    assert int(PARAMETERS["TaskTimeoutSeconds"]["Default"]) == 120


def test_a_task_gets_three_gpu_attempts_by_default() -> None:
    assert int(PARAMETERS["MaxAttempts"]["Default"]) == 3


def test_outputs_give_clients_and_e2e_tests_what_they_need() -> None:
    required = {
        "ApiUrl",
        "UserPoolId",
        "UserPoolClientId",
        "TasksTableName",
        "TaskQueueUrl",
        "ImagesBucketName",
    }

    assert required - set(TEMPLATE["Outputs"]) == set()


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_every_function_declares_the_settings_it_reads(logical_id: str) -> None:
    module = HANDLER_MODULE_BY_FUNCTION[logical_id]

    assert module in settings.SETTINGS_BY_HANDLER, (
        f"{logical_id}: declare {module}'s settings model in gpuqueue.settings"
    )


def test_every_declared_settings_model_belongs_to_a_function_in_the_template() -> None:
    assert set(settings.SETTINGS_BY_HANDLER) == set(HANDLER_MODULES)


@pytest.mark.parametrize(
    "logical_id",
    [
        f
        for f in sorted(FUNCTIONS)
        if settings.SETTINGS_BY_HANDLER.get(HANDLER_MODULE_BY_FUNCTION[f])
    ],
)
def test_template_sets_every_required_setting_of_the_function(logical_id: str) -> None:
    model = settings_model(logical_id)
    assert model is not None
    required = {name.upper() for name, field in model.model_fields.items() if field.is_required()}

    assert required
    assert required - environment_keys(logical_id) == set()


@pytest.mark.parametrize("logical_id", sorted(FUNCTIONS))
def test_template_sets_no_env_var_the_function_does_not_read(logical_id: str) -> None:
    model = settings_model(logical_id)
    read = set() if model is None else {name.upper() for name in model.model_fields}

    assert environment_keys(logical_id) - set(GLOBAL_ENV) - read == set()


# A dispatcher's Max Memory Used with every call's answer given back (make bench measures
# 86 MB on the fleet bench), rounded up.
DISPATCHER_RUNTIME_MB = 90


@pytest.mark.parametrize("logical_id", ["DispatcherFunction", "PriorityDispatcherFunction"])
def test_a_dispatcher_has_room_for_its_runtime_and_any_1024_image_or_transcript_answer(
    logical_id: str,
) -> None:
    assert props(logical_id)["MemorySize"] == {"Ref": "DispatcherMemorySize"}
    parameter = TEMPLATE["Parameters"]["DispatcherMemorySize"]
    # Lambda's bounds on MemorySize.
    assert 128 <= number(parameter["MinValue"]) <= number(parameter["Default"])
    assert number(parameter["MaxValue"]) <= 10240
    # The largest answer a 1024x1024 image or a transcript may have, decoded, fits in what
    # the budget leaves (the audio is streamed: it takes no room).
    largest = max(
        IMAGE_ANSWER_IN_MEMORY * image_answer_limit(ImageParams(width=1024, height=1024)),
        TRANSCRIPT_ANSWER_IN_MEMORY * TRANSCRIPT_ANSWER_LIMIT,
    )
    room = (number(parameter["Default"]) - DISPATCHER_RUNTIME_MB - HEADROOM_MB) * MIB
    assert room >= largest


# --- webhook redelivery limits ---------------------------------------------------------------


def test_every_allowed_hourly_redelivery_limit_is_one_the_tasks_function_accepts() -> None:
    parameter = PARAMETERS["RedeliveriesPerUserPerHour"]
    env = props("TasksFunction")["Environment"]["Variables"]
    assert env["REDELIVERIES_PER_USER_PER_HOUR"] == {"Ref": "RedeliveriesPerUserPerHour"}
    low, high = int(parameter["MinValue"]), int(parameter["MaxValue"])

    def accepted(value: int) -> bool:
        try:
            settings.TasksSettings(
                tasks_table="t", task_files_bucket="b", redeliveries_per_user_per_hour=value
            )
        except ValidationError:
            return False
        return True

    # Any value the stack takes starts the function (a bucket needs a positive rate): a value
    # it would refuse is refused by CloudFormation at deploy, not by every redelivery.
    assert low >= 1
    assert accepted(low)
    assert accepted(high)
    assert accepted(int(parameter["Default"]))
