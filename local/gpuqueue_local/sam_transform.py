"""template.yaml after SAM's transform: plain CloudFormation, offline.

What AWS deploys is the transformed template, so what it refuses (ScalingConfig bounds,
the roles SAM writes from policy templates) is only visible there. `samtranslator` runs
offline given a region, each local `CodeUri`/`ContentUri` swapped for an `s3://` URI (it
refuses local paths) and a managed-policy loader that answers without calling IAM.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from functools import cache
from typing import Any

from samtranslator.translator.transform import transform as sam_transform

from gpuqueue_local.template import load_template

# The translator asks IAM for the ARNs of the managed policies a function names by short
# name; the template names none (SAM adds its own by ARN), so an empty answer is exact.
_NO_SHORT_NAMED_POLICIES: dict[str, str] = {}

_ARTIFACT_PROPERTIES = {
    "AWS::Serverless::Function": "CodeUri",
    "AWS::Serverless::LayerVersion": "ContentUri",
}


class _ManagedPolicyLoader:
    def load(self) -> dict[str, str]:
        return dict(_NO_SHORT_NAMED_POLICIES)


def _with_s3_artifacts(template: Mapping[str, Any]) -> dict[str, Any]:
    """A copy with each local code folder replaced by an s3:// URI (as `sam package` does)."""
    copied: dict[str, Any] = copy.deepcopy(dict(template))
    for logical_id, resource in copied.get("Resources", {}).items():
        prop = _ARTIFACT_PROPERTIES.get(resource.get("Type", ""))
        props = resource.get("Properties", {})
        if prop and isinstance(props.get(prop), str):
            props[prop] = f"s3://gpuqueue-local-artifacts/{logical_id}.zip"
    return copied


def transform(
    template: Mapping[str, Any] | None = None,
    *,
    parameters: Mapping[str, str] | None = None,
    region: str = "us-east-1",
) -> dict[str, Any]:
    """The CloudFormation template SAM would deploy (intrinsics left for CloudFormation)."""
    source = _with_s3_artifacts(template if template is not None else load_template())
    previous = os.environ.get("AWS_DEFAULT_REGION")
    os.environ["AWS_DEFAULT_REGION"] = region  # the translator reads the region from here
    try:
        transformed: dict[str, Any] = sam_transform(
            source, dict(parameters or {}), _ManagedPolicyLoader()
        )
    finally:
        if previous is None:
            os.environ.pop("AWS_DEFAULT_REGION", None)
        else:
            os.environ["AWS_DEFAULT_REGION"] = previous
    # The translator's output holds its own node types; plain JSON values compare and copy.
    plain: dict[str, Any] = json.loads(json.dumps(transformed, default=str))
    return plain


@cache
def transformed_template() -> dict[str, Any]:
    """The repository's template.yaml, transformed (cached: ~0.3 s a run)."""
    return transform()


def function_role(transformed: Mapping[str, Any], function_logical_id: str) -> dict[str, Any]:
    """The execution role SAM wrote for a function: its `Role` resource's properties."""
    function = transformed["Resources"][function_logical_id]
    role = function["Properties"]["Role"]
    if not (isinstance(role, dict) and "Fn::GetAtt" in role):
        raise ValueError(f"{function_logical_id} names its own role; none to read")
    role_id = role["Fn::GetAtt"][0]
    properties: dict[str, Any] = transformed["Resources"][role_id]["Properties"]
    return properties
