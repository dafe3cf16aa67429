"""Each function's execution role, as an IAM user on moto with exactly the role's permissions.

On AWS a function runs with the role SAM writes for it: its policy templates expanded, the
managed policies SAM attaches (basic execution, X-Ray, the event sources' pollers) and its
inline statements. Locally the same documents — read from the template after SAM's
transform, so nothing is listed twice — go to an IAM user per function whose access key the
function's workers sign with. moto, patched by `moto_iam`, then refuses what AWS would.
(STS AssumeRole answers 500 on moto with enforcement on, so a user stands in for the role.)
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from functools import cache
from typing import Any

from moto.iam.aws_managed_policies import aws_managed_policies_data

from gpuqueue_local.operator_clients import operator_client
from gpuqueue_local.sam_transform import function_role, transform

# IAM user names are at most 64 characters.
_USER_NAME_LIMIT = 64


@dataclass(frozen=True)
class FunctionIdentity:
    """The credentials a function's workers sign with, and the documents that bind them."""

    logical_id: str
    user_name: str
    access_key_id: str
    secret_access_key: str
    policies: tuple[dict[str, Any], ...]

    def environment(self) -> dict[str, str]:
        """What Lambda puts in a function's environment for its role's session."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }


@cache
def _managed_policies() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(aws_managed_policies_data)  # ~1 MB: parse once
    return loaded


def _managed_policy_document(arn: str) -> dict[str, Any]:
    """An AWS-managed policy's document, from the copy moto ships (no call to IAM)."""
    name = arn.rsplit("/", 1)[-1]
    if name not in _managed_policies():
        raise KeyError(f"moto has no copy of the managed policy {arn}")
    document: dict[str, Any] = copy.deepcopy(_managed_policies()[name]["Document"])
    return document


@cache
def _transformed(template_json: str, parameters_json: str, region: str) -> dict[str, Any]:
    # A test run provisions hundreds of stacks from one template: transform it once.
    return transform(
        json.loads(template_json), parameters=json.loads(parameters_json), region=region
    )


# Where a parameter can only end up in a function's environment, never in its role.
_ENVIRONMENT_ONLY = ("Environment",)


def _parameter_names(node: Any, names: frozenset[str], found: set[str]) -> None:
    """Collect the parameters `node` references (Ref, or ${Name} in a Sub), skipping
    function environments."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _ENVIRONMENT_ONLY:
                continue
            if key == "Ref" and value in names:
                found.add(value)
            elif key == "Fn::Sub":
                text = value[0] if isinstance(value, list) else value
                found.update(n for n in names if isinstance(text, str) and f"${{{n}}}" in text)
            _parameter_names(value, names, found)
    elif isinstance(node, list):
        for item in node:
            _parameter_names(item, names, found)


def parameters_roles_can_use(template: dict[str, Any]) -> frozenset[str]:
    """The parameters that may change what SAM's transform writes into a role: every one
    referenced outside a function's environment (in a condition, a policy, an event...)."""
    names = frozenset(template.get("Parameters", {}))
    found: set[str] = set()
    _parameter_names({k: v for k, v in template.items() if k != "Parameters"}, names, found)
    return frozenset(found)


def role_documents(role: dict[str, Any], resolve: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, document) for every policy of a transformed role, intrinsics resolved."""
    documents: list[tuple[str, dict[str, Any]]] = []
    for arn in resolve(role.get("ManagedPolicyArns", [])):
        documents.append((str(arn).rsplit("/", 1)[-1], _managed_policy_document(str(arn))))
    for policy in role.get("Policies", []):
        document = dict(resolve(policy["PolicyDocument"]))
        # SAM's policy templates carry no Version (IAM then reads them as 2008-10-17, which
        # only differs in policy variables, none used here); moto wants one.
        document.setdefault("Version", "2012-10-17")
        documents.append((str(policy["PolicyName"]), document))
    return documents


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def user_name(stack_name: str, logical_id: str) -> str:
    return f"{stack_name}-{logical_id}"[:_USER_NAME_LIMIT]


def provision_identities(
    stack_name: str,
    template: dict[str, Any],
    parameters: dict[str, str],
    resolve: Any,
    region: str,
    *,
    iam: Any = None,
) -> dict[str, FunctionIdentity]:
    """An IAM user per function carrying its role's policies, and its access key. `iam`:
    what makes the three calls (default: an IAM client on AWS_ENDPOINT_URL)."""
    # Tests provision hundreds of stacks that differ only in values no role reads (the GPU
    # servers' URLs, limits): those left out, the transform runs once per distinct role set.
    used = parameters_roles_can_use(template)
    relevant = {name: value for name, value in parameters.items() if name in used}
    transformed = _transformed(
        json.dumps(template, sort_keys=True), json.dumps(relevant, sort_keys=True), region
    )
    iam = iam or operator_client("iam", region)
    identities = {}
    for logical_id, resource in sorted(template.get("Resources", {}).items()):
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        if logical_id not in transformed["Resources"]:
            continue  # its Condition is false: not deployed
        name = user_name(stack_name, logical_id)
        iam.create_user(UserName=name)
        documents = role_documents(function_role(transformed, logical_id), resolve)
        # One inline document holding every statement of the role's policies: the same
        # permissions as the role's several policies, in one call instead of one each.
        statements = [
            statement
            for _, document in documents
            for statement in _as_list(document.get("Statement", []))
        ]
        iam.put_user_policy(
            UserName=name,
            PolicyName="execution-role",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": statements}),
        )
        key = iam.create_access_key(UserName=name)["AccessKey"]
        identities[logical_id] = FunctionIdentity(
            logical_id=logical_id,
            user_name=name,
            access_key_id=key["AccessKeyId"],
            secret_access_key=key["SecretAccessKey"],
            policies=tuple(document for _, document in documents),
        )
    return identities
