"""The local EventBridge pattern matcher, the S3 "Object Created" event and the rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gpuqueue_local.lambda_runtime import InvocationResult
from gpuqueue_local.provision import LocalStack
from gpuqueue_local.s3_events import (
    S3Object,
    S3Rule,
    UnsupportedPattern,
    common_prefix,
    eventbridge_buckets,
    is_s3_object_created,
    listing_prefix,
    matches,
    object_created_event,
    template_rules,
)
from gpuqueue_local.template import Resolver, load_template
from gpuqueue_testing import load_event

BUCKET = "gpuqueue-local-imagesbucket"
# The pattern template.yaml's upload rule has, with !Ref ImagesBucket resolved.
UPLOAD_PATTERN: dict[str, Any] = {
    "source": ["aws.s3"],
    "detail-type": ["Object Created"],
    "detail": {"bucket": {"name": [BUCKET]}, "object": {"key": [{"prefix": "audio/"}]}},
}


def s3_event(key: str = "audio/abc", bucket: str = BUCKET, **detail: Any) -> dict[str, Any]:
    event = load_event("upload_audio_uploaded")
    event["detail"]["bucket"]["name"] = bucket
    event["detail"]["object"]["key"] = key
    event["detail"].update(detail)
    return event


class NoTarget:
    def invoke(self, event: Any, *, timeout_seconds: float | None = None) -> InvocationResult:
        raise AssertionError("not invoked in unit tests")


# --- matching --------------------------------------------------------------------------------


def test_the_upload_pattern_matches_an_upload_under_its_prefix_in_its_bucket() -> None:
    assert matches(UPLOAD_PATTERN, s3_event("audio/550e8400"))


@pytest.mark.parametrize(
    ("key", "bucket"),
    [
        ("results/550e8400.png", BUCKET),  # outside the prefix
        ("audiox/550e8400", BUCKET),  # a prefix is a prefix of characters, not a folder
        ("Audio/550e8400", BUCKET),  # case matters
        ("audio/550e8400", "another-bucket"),
        ("audio/550e8400", BUCKET + "-2"),  # exact bucket name, not a prefix of it
    ],
)
def test_the_upload_pattern_ignores_other_keys_and_buckets(key: str, bucket: str) -> None:
    assert not matches(UPLOAD_PATTERN, s3_event(key, bucket))


def test_exact_values_are_a_list_any_of_which_matches() -> None:
    pattern = {"detail-type": ["Object Deleted", "Object Created"]}

    assert matches(pattern, {"detail-type": "Object Created"})
    assert not matches(pattern, {"detail-type": "Object Restore Completed"})


def test_every_field_of_the_pattern_must_match() -> None:
    assert not matches(UPLOAD_PATTERN, {**s3_event(), "source": "aws.events"})
    assert not matches(UPLOAD_PATTERN, {**s3_event(), "detail-type": "Object Deleted"})


def test_a_field_the_event_lacks_does_not_match() -> None:
    event = s3_event()
    del event["detail"]["object"]["key"]

    assert not matches(UPLOAD_PATTERN, event)
    assert not matches({"detail": {"object": ["x"]}}, {"detail": {}})


def test_fields_the_pattern_does_not_name_are_ignored() -> None:
    assert matches({"source": ["aws.s3"]}, s3_event())
    assert matches({}, s3_event())


def test_an_object_in_the_pattern_does_not_match_a_scalar_in_the_event() -> None:
    assert not matches({"detail": {"bucket": {"name": [BUCKET]}}}, {"detail": "bucket"})


def test_an_array_in_the_event_matches_when_any_element_does() -> None:
    pattern = {"resources": [f"arn:aws:s3:::{BUCKET}"]}

    assert matches(pattern, {"resources": ["arn:aws:s3:::other", f"arn:aws:s3:::{BUCKET}"]})
    assert not matches(pattern, {"resources": ["arn:aws:s3:::other"]})


def test_exact_matching_compares_json_values_not_their_text() -> None:
    assert matches({"size": [5]}, {"size": 5})
    assert matches({"size": [5]}, {"size": 5.0})
    assert not matches({"size": [5]}, {"size": "5"})
    assert not matches({"flag": [True]}, {"flag": 1})
    assert matches({"flag": [None]}, {"flag": None})
    assert not matches({"flag": [None]}, {})


def test_prefix_matches_only_strings() -> None:
    assert matches({"key": [{"prefix": "audio/"}]}, {"key": "audio/"})
    assert not matches({"key": [{"prefix": "1"}]}, {"key": 12})


def test_exact_values_and_prefixes_mix_in_one_list() -> None:
    pattern = {"key": ["readme.txt", {"prefix": "audio/"}]}

    assert matches(pattern, {"key": "readme.txt"})
    assert matches(pattern, {"key": "audio/a"})
    assert not matches(pattern, {"key": "readme.txt.bak"})


def test_suffix_equals_ignore_case_anything_but_and_exists() -> None:
    assert matches({"key": [{"suffix": ".wav"}]}, {"key": "audio/a.wav"})
    assert not matches({"key": [{"suffix": ".wav"}]}, {"key": "audio/a.mp3"})
    assert matches({"reason": [{"equals-ignore-case": "putobject"}]}, {"reason": "PutObject"})
    assert matches({"reason": [{"anything-but": "CopyObject"}]}, {"reason": "PutObject"})
    assert not matches({"reason": [{"anything-but": ["CopyObject"]}]}, {"reason": "CopyObject"})
    assert not matches({"key": [{"anything-but": {"prefix": "tmp/"}}]}, {"key": "tmp/a"})
    assert matches({"key": [{"anything-but": {"prefix": "tmp/"}}]}, {"key": "audio/a"})
    assert matches({"version-id": [{"exists": False}]}, {"key": "a"})
    assert not matches({"version-id": [{"exists": True}]}, {"key": "a"})
    assert matches({"key": [{"exists": True}]}, {"key": "a"})


def test_a_leaf_under_an_object_the_event_lacks_is_absent() -> None:
    # Paths are matched flattened: a DynamoDB attribute not in the image ({"a": {"S": ..}}
    # missing whole) does not exist, and nothing else under it matches.
    absent = {"OldImage": {"status": {"S": "RUNNING"}}}
    assert matches({"OldImage": {"cancel_requested_at": {"S": [{"exists": False}]}}}, absent)
    assert not matches({"OldImage": {"cancel_requested_at": {"S": [{"exists": True}]}}}, absent)
    assert not matches({"OldImage": {"cancel_requested_at": {"S": ["x"]}}}, absent)
    assert not matches(
        {"OldImage": {"cancel_requested_at": {"S": [{"anything-but": ["x"]}]}}}, absent
    )
    present = {"OldImage": {"cancel_requested_at": {"S": "2026-01-01T00:00:00Z"}}}
    assert not matches({"OldImage": {"cancel_requested_at": {"S": [{"exists": False}]}}}, present)


@pytest.mark.parametrize(
    "pattern",
    [
        {"size": [{"numeric": [">", 0]}]},
        {"key": [{"wildcard": "audio/*.wav"}]},
        {"$or": [{"source": ["aws.s3"]}]},
        {"source": "aws.s3"},  # a leaf must be an array
        {"key": [{"prefix": "a", "suffix": "b"}]},
        {"key": [{"prefix": 1}]},
        {"key": [{"exists": "yes"}]},
        {"key": [{"anything-but": {"exists": True}}]},
        {"key": [{"anything-but": [{"prefix": "a"}]}]},
        {"detail": {"object": {"key": [{"numeric": ["=", 3]}]}}},  # nested
    ],
)
def test_what_the_matcher_does_not_implement_is_refused_not_guessed(
    pattern: dict[str, Any],
) -> None:
    with pytest.raises(UnsupportedPattern):
        matches(pattern, {"source": "aws.s3", "size": 3, "key": "audio/a.wav"})


# --- what a rule listens to ------------------------------------------------------------------


def test_a_rules_buckets_are_the_exact_names_it_gives() -> None:
    rule = S3Rule(name="r", function_name="F", pattern=UPLOAD_PATTERN, target=NoTarget())

    assert rule.buckets == [BUCKET]
    assert rule.key_prefix == "audio/"


def test_a_rule_without_a_bucket_name_names_no_bucket() -> None:
    rule = S3Rule(name="r", function_name="F", pattern={"source": ["aws.s3"]}, target=NoTarget())

    assert rule.buckets is None
    assert rule.key_prefix == ""


def test_a_rule_with_an_unsupported_pattern_fails_at_once() -> None:
    with pytest.raises(UnsupportedPattern):
        S3Rule(
            name="r", function_name="F", pattern={"x": [{"cidr": "10.0.0.0/8"}]}, target=NoTarget()
        )


@pytest.mark.parametrize(
    ("entries", "prefix"),
    [
        ([{"prefix": "audio/"}], "audio/"),
        ([{"prefix": "audio/a"}, {"prefix": "audio/b"}], "audio/"),
        (["audio/readme.txt", {"prefix": "audio/x/"}], "audio/"),
        ([{"prefix": "audio/"}, {"suffix": ".wav"}], ""),  # a suffix can be anywhere
        ([{"anything-but": {"prefix": "tmp/"}}], ""),
        (None, ""),
        ([], ""),
    ],
)
def test_the_listing_prefix_covers_every_key_the_filter_can_match(
    entries: Any, prefix: str
) -> None:
    assert listing_prefix(entries) == prefix


def test_common_prefix_is_character_wise() -> None:
    assert common_prefix(["audio/ab", "audio/ac"]) == "audio/a"
    assert common_prefix(["audio/", ""]) == ""
    assert common_prefix([]) == ""


def test_s3_object_created_rules_are_told_from_other_rules() -> None:
    assert is_s3_object_created(UPLOAD_PATTERN)
    assert is_s3_object_created({"source": ["aws.s3"]})
    assert not is_s3_object_created({"source": ["aws.s3"], "detail-type": ["Object Deleted"]})
    assert not is_s3_object_created({"source": ["aws.ec2"]})


# --- the event -------------------------------------------------------------------------------


def an_object(**changes: Any) -> S3Object:
    values: dict[str, Any] = {
        "bucket": BUCKET,
        "key": "audio/550e8400",
        "size": 96044,
        "etag": "9b2cf535f27731c974343645a3985328",
        "last_modified": datetime(2026, 1, 27, 10, 0, 0, tzinfo=UTC),
    }
    return S3Object(**{**values, **changes})


def shape(value: Any) -> Any:
    """Keys and value types, recursively: what a handler parsing the event relies on."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def test_the_event_has_the_shape_of_the_sample_event() -> None:
    event = object_created_event(an_object())

    assert shape(event) == shape(load_event("upload_audio_uploaded"))


def test_the_event_describes_the_object() -> None:
    event = object_created_event(an_object(), region="eu-west-1")

    assert event["source"] == "aws.s3"
    assert event["detail-type"] == "Object Created"
    assert event["account"] == "123456789012"
    assert event["region"] == "eu-west-1"
    assert event["time"] == "2026-01-27T10:00:00Z"
    assert event["resources"] == [f"arn:aws:s3:::{BUCKET}"]
    detail = event["detail"]
    assert detail["bucket"] == {"name": BUCKET}
    assert detail["object"]["key"] == "audio/550e8400"
    assert detail["object"]["size"] == 96044
    assert detail["object"]["etag"] == "9b2cf535f27731c974343645a3985328"
    assert detail["reason"] == "PutObject"
    assert detail["requester"] == "123456789012"
    assert len(detail["request-id"]) == 16


def test_a_multipart_upload_is_reported_as_one() -> None:
    event = object_created_event(an_object(etag="3858f62230ac3c915f300c664312c11f-3"))

    assert event["detail"]["reason"] == "CompleteMultipartUpload"


def test_events_have_their_own_ids_and_increasing_sequencers() -> None:
    first, second = (object_created_event(an_object()) for _ in range(2))

    assert first["id"] != second["id"]
    assert first["detail"]["object"]["sequencer"] < second["detail"]["object"]["sequencer"]


def test_the_upload_pattern_matches_the_sample_event() -> None:
    assert matches(UPLOAD_PATTERN, load_event("upload_audio_uploaded"))


# --- reading the rules from a template -------------------------------------------------------


def template_stack(*, eventbridge: bool = True, rule: dict[str, Any] | None = None) -> LocalStack:
    bucket: dict[str, Any] = {"Type": "AWS::S3::Bucket", "Properties": {}}
    if eventbridge:
        bucket["Properties"]["NotificationConfiguration"] = {
            "EventBridgeConfiguration": {"EventBridgeEnabled": True}
        }
    pattern = {
        "source": ["aws.s3"],
        "detail-type": ["Object Created"],
        "detail": {
            "bucket": {"name": [{"Ref": "ImagesBucket"}]},
            "object": {"key": [{"prefix": "audio/"}]},
        },
    }
    events = {
        "AudioUploaded": rule or {"Type": "EventBridgeRule", "Properties": {"Pattern": pattern}},
        "Api": {"Type": "HttpApi", "Properties": {"Path": "/x", "Method": "GET"}},
        "Nightly": {
            "Type": "EventBridgeRule",
            "Properties": {"Pattern": {"source": ["aws.events"]}},
        },
    }
    template = {
        "Resources": {
            "ImagesBucket": bucket,
            "UploadFunction": {
                "Type": "AWS::Serverless::Function",
                "Properties": {"Handler": "upload_handler.lambda_handler", "Events": events},
            },
        }
    }
    resolver = Resolver(parameters={}, pseudo={}, refs={"ImagesBucket": BUCKET})
    return LocalStack(name="s", region="us-east-1", template=template, resolver=resolver)


def test_the_templates_s3_rule_is_read_with_its_bucket_resolved() -> None:
    target = NoTarget()

    [rule] = template_rules(template_stack(), {"UploadFunction": target})

    assert rule.name == "UploadFunctionAudioUploaded"
    assert rule.function_name == "UploadFunction"
    assert rule.target is target
    assert rule.pattern == UPLOAD_PATTERN


def test_a_disabled_rule_or_one_on_a_custom_bus_gets_no_s3_events() -> None:
    disabled = {
        "Type": "EventBridgeRule",
        "Properties": {"Pattern": UPLOAD_PATTERN, "State": "DISABLED"},
    }
    custom_bus = {
        "Type": "EventBridgeRule",
        "Properties": {"Pattern": UPLOAD_PATTERN, "EventBusName": "mine"},
    }

    for rule in (disabled, custom_bus):
        assert template_rules(template_stack(rule=rule), {"UploadFunction": NoTarget()}) == []


def test_only_buckets_with_eventbridge_enabled_send_events() -> None:
    assert eventbridge_buckets(template_stack()) == {BUCKET: "ImagesBucket"}
    assert eventbridge_buckets(template_stack(eventbridge=False)) == {}


def test_the_templates_upload_rule_matches_the_sample_event() -> None:
    template = load_template()
    resolver = Resolver(parameters={}, pseudo={}, refs={"ImagesBucket": BUCKET})
    stack = LocalStack(name="s", region="us-east-1", template=template, resolver=resolver)
    targets = {name: NoTarget() for name in stack.functions()}

    rules = template_rules(stack, targets)

    assert [r.function_name for r in rules] == ["UploadFunction"]
    assert matches(rules[0].pattern, load_event("upload_audio_uploaded"))
    assert rules[0].key_prefix == "audio/"
    assert eventbridge_buckets(stack) == {BUCKET: "ImagesBucket"}
