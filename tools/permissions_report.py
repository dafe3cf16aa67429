"""Least privilege from use: what each function called, against what its role grants.

`make test` runs the integration and end-to-end suites with IAM enforced by moto
(`gpuqueue_local.moto_iam`), every authorization decision recorded under
`GPUQUEUE_IAM_AUDIT_DIR`. This reads those records and the roles SAM writes from
template.yaml, and writes docs/permissions.md: per function, the calls it made (action and
resource, the stack's names replaced by logical ids) and every grant of its role with the
calls that used it — a grant nothing used is listed as such, to be narrowed away.

    python tools/permissions_report.py --audit-dir .reports/iam-audit --out docs/permissions.md
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moto.iam.access_control import IAMPolicyStatement, PermissionResult

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "local"))

from gpuqueue_local.function_identities import role_documents  # noqa: E402
from gpuqueue_local.moto_iam import ACCOUNT_ID, Decision, read_audit  # noqa: E402
from gpuqueue_local.sam_transform import function_role, transform  # noqa: E402
from gpuqueue_local.template import Resolver, load_template  # noqa: E402

REGION = "us-east-1"
STACK = "STACK"
# Calls Lambda makes for a function from its role, never from the function's code: CloudWatch
# Logs (the runtime's log agent), X-Ray (the tracing daemon), the network interfaces of a
# function in a VPC, reading its DynamoDB stream, polling its SQS queue and sending a failed
# batch to its on-failure destination. The local stack makes some of them, not all.
SERVICE_SIDE = ("logs:", "xray:", "ec2:")
STREAM_READS = {
    "dynamodb:DescribeStream",
    "dynamodb:GetRecords",
    "dynamodb:GetShardIterator",
    "dynamodb:ListStreams",
}
SQS_POLLER = {
    "sqs:ChangeMessageVisibility",
    "sqs:ChangeMessageVisibilityBatch",
    "sqs:DeleteMessage",
    "sqs:DeleteMessageBatch",
    "sqs:GetQueueAttributes",
    "sqs:ReceiveMessage",
}


def _arn(service: str, resource: str) -> str:
    return f"arn:aws:{service}:{REGION}:{ACCOUNT_ID}:{resource}"


def placeholder_resolver(template: Mapping[str, Any]) -> Resolver:
    """Resolves the roles with each resource named by its logical id (the report's names)."""
    resolver = Resolver.for_template(
        template,
        parameters={
            name: str(spec.get("Default", ""))
            for name, spec in template.get("Parameters", {}).items()
        },
        pseudo={
            "AWS::StackName": STACK,
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT_ID,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
        },
    )
    for logical_id, resource in template.get("Resources", {}).items():
        kind = resource.get("Type", "")
        props = resource.get("Properties", {})
        resolver.refs[logical_id] = logical_id
        attrs: dict[str, str] = {}
        if kind == "AWS::DynamoDB::Table":
            attrs = {
                "Arn": _arn("dynamodb", f"table/{logical_id}"),
                "StreamArn": _arn("dynamodb", f"table/{logical_id}/stream/*"),
            }
        elif kind == "AWS::SQS::Queue":
            attrs = {"Arn": _arn("sqs", logical_id), "QueueName": logical_id}
        elif kind == "AWS::S3::Bucket":
            attrs = {"Arn": f"arn:aws:s3:::{logical_id}"}
        elif kind == "AWS::Cognito::UserPool":
            attrs = {"Arn": _arn("cognito-idp", f"userpool/{logical_id}")}
        elif kind == "AWS::SecretsManager::Secret":
            resolver.refs[logical_id] = _arn("secretsmanager", f"secret:{logical_id}")
        elif kind == "AWS::ApiGatewayV2::Stage":
            resolver.refs[logical_id] = str(props.get("StageName", "$default"))
        for attribute, value in attrs.items():
            resolver.attributes[(logical_id, attribute)] = value
    return resolver


@dataclass(frozen=True)
class Grant:
    policy: str
    statement: dict[str, Any]

    def allows(self, action: str, resource: str) -> bool:
        result = IAMPolicyStatement(self.statement).is_action_permitted(action, resource)
        return result == PermissionResult.PERMITTED

    def text(self) -> str:
        actions = self.statement.get("Action", [])
        resources = self.statement.get("Resource", [])
        actions = [actions] if isinstance(actions, str) else actions
        resources = [resources] if isinstance(resources, str) else resources
        return f"{', '.join(map(str, actions))} on {', '.join(map(str, resources))}"

    @property
    def actions(self) -> list[str]:
        actions = self.statement.get("Action", [])
        return [actions] if isinstance(actions, str) else [str(a) for a in actions]

    @property
    def service_side(self) -> bool:
        """Granted for Lambda's own calls on the function's behalf (see SERVICE_SIDE)."""
        actions = set(self.actions)
        return (
            # SAM attaches these for an event source or a VPC: AWSLambdaSQSQueueExecutionRole,
            # AWSLambdaDynamoDBExecutionRole, AWSLambdaVPCAccessExecutionRole.
            (self.policy.startswith("AWSLambda") and self.policy.endswith("ExecutionRole"))
            or all(a.startswith(SERVICE_SIDE) or a in STREAM_READS for a in actions)
            or actions == SQS_POLLER
            # SAM's grant for an event's on-failure destination: <Function><Event>SQSPolicy.
            or (self.policy.endswith("SQSPolicy") and actions == {"sqs:SendMessage"})
        )

    def unused_actions(self, calls: Iterable[tuple[str, str]]) -> list[str]:
        """The statement's actions no call used through it (a wildcard counts as one)."""
        return [
            action
            for action in self.actions
            if not any(_matches(action, a) and self.allows(a, r) for a, r in calls)
        ]


def _matches(pattern: str, action: str) -> bool:
    return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), action, re.IGNORECASE) is not None


def role_grants(template: Mapping[str, Any]) -> dict[str, list[Grant]]:
    transformed = transform(template)
    resolver = placeholder_resolver(template)
    grants: dict[str, list[Grant]] = {}
    for logical_id, resource in sorted(template.get("Resources", {}).items()):
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        documents = role_documents(function_role(transformed, logical_id), resolver.resolve)
        grants[logical_id] = [
            Grant(name, statement)
            for name, document in documents
            for statement in _statements(document)
            if statement.get("Effect") == "Allow"
        ]
    return grants


def _statements(document: Mapping[str, Any]) -> list[dict[str, Any]]:
    statements = document.get("Statement", [])
    return [statements] if isinstance(statements, dict) else list(statements)


_SECRET_SUFFIX = re.compile(r"(:secret:[^:]+?)-[A-Za-z0-9]{6}$")
_USER_POOL = re.compile(r"userpool/[\w-]+_[A-Za-z0-9]+")
_API_ID = re.compile(r"(execute-api:[^:]+:\d+:)[a-z]{10}/")
_CONNECTION = re.compile(r"@connections/.+$")
_TASK_OBJECT = re.compile(r"(arn:aws:s3:::[^/]+/[^/]+)/.+$")


def normalise(resource: str, stack: str, logical_ids: Iterable[str]) -> str:
    """A recorded resource with this run's names replaced by the template's."""
    text = resource
    for logical_id in sorted(logical_ids, key=len, reverse=True):
        text = re.sub(rf"{re.escape(stack)}-{logical_id}", logical_id, text, flags=re.IGNORECASE)
    text = re.sub(re.escape(stack), STACK, text, flags=re.IGNORECASE)
    text = _SECRET_SUFFIX.sub(r"\1", text)
    text = _USER_POOL.sub("userpool/UserPool", text)
    text = _API_ID.sub(r"\1WebSocketApi/", text)
    text = _CONNECTION.sub("@connections/*", text)
    return _TASK_OBJECT.sub(r"\1/*", text)


def attribute(
    decisions: Iterable[Decision], functions: Iterable[str], logical_ids: Iterable[str]
) -> dict[str, list[Decision]]:
    """Each function's decisions, names normalised (the operator's are left out)."""
    names = list(logical_ids)
    by_suffix = sorted(functions, key=len, reverse=True)
    out: dict[str, list[Decision]] = defaultdict(list)
    for decision in decisions:
        function = next((f for f in by_suffix if decision.principal.endswith(f"-{f}")), None)
        if function is None:
            continue
        stack = decision.principal[: -len(function) - 1]
        out[function].append(
            Decision(
                function,
                decision.action,
                normalise(decision.resource, stack, names),
                decision.allowed,
            )
        )
    return out


def render(grants: Mapping[str, list[Grant]], used: Mapping[str, list[Decision]]) -> str:
    lines = [
        "# Permissions: what each function's role grants and what the tests used",
        "",
        "Generated by `make test` (`tools/permissions_report.py`) from every authorization",
        "moto made during the integration and end-to-end suites, with IAM enforced per function",
        "(each function runs as its role: `local/gpuqueue_local/moto_iam.py`). Resource names",
        "are the template's logical ids; `STACK` is the stack's name.",
        "",
    ]
    unused_total = 0
    refused_total = 0
    for function, function_grants in grants.items():
        calls = Counter((d.action, d.resource) for d in used.get(function, []) if d.allowed)
        refused = sorted({(d.action, d.resource) for d in used.get(function, []) if not d.allowed})
        lines += [f"## {function}", ""]
        if calls:
            lines += ["| call | resource | times |", "|---|---|---|"]
            lines += [f"| `{a}` | `{r}` | {n} |" for (a, r), n in sorted(calls.items())]
        else:
            lines.append("No AWS call seen in the tests.")
        lines.append("")
        for action, resource in refused:
            lines.append(f"- **refused**: `{action}` on `{resource}`")
            refused_total += 1
        service = [g for g in function_grants if g.service_side]
        for grant in function_grants:
            if grant.service_side:
                continue
            idle = grant.unused_actions(calls)
            if not idle:
                continue
            unused_total += len(idle)
            resources = grant.text().partition(" on ")[2]
            lines.append(
                f"- **granted, unused**: {', '.join(idle)} on {resources} (`{grant.policy}`)"
            )
        if service:
            names = sorted({g.policy for g in service})
            lines.append(
                "- for Lambda's own calls, not the code's (logs, X-Ray, VPC, event sources and"
                f" destinations): {', '.join(names)}"
            )
        lines.append("")
    summary = f"{unused_total} granted actions unused, {refused_total} calls refused."
    lines.insert(7, f"**{summary}**\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audit-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=REPO / "docs/permissions.md")
    args = parser.parse_args(argv)
    files = sorted(args.audit_dir.glob("*.jsonl"))
    if not files:
        print(f"no audit records in {args.audit_dir}", file=sys.stderr)
        return 1
    template = load_template()
    grants = role_grants(template)
    decisions = [d for f in files for d in read_audit(str(f))]
    used = attribute(decisions, grants, template.get("Resources", {}))
    args.out.write_text(render(grants, used) + "\n")
    unused = sum(1 for line in args.out.read_text().splitlines() if "granted, unused" in line)
    print(f"permissions: {len(decisions)} decisions from {len(files)} runs -> {args.out}")
    print(f"permissions: {unused} statements with unused actions (see {args.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
