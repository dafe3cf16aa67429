"""Create the template's stateful resources (tables, queues, bucket, user pool, groups) with boto3.

Pointed at moto (AWS_ENDPOINT_URL), this is the local stack's "CloudFormation": names are
derived from the stack name and logical id, as a real stack derives them.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpuqueue_local.function_identities import FunctionIdentity, provision_identities
from gpuqueue_local.operator_clients import operator_client
from gpuqueue_local.template import (
    Resolver,
    UnresolvedReference,
    function_environment,
    load_template,
    parameter_values,
    resources_of_type,
)

ACCOUNT_ID = "123456789012"

# Resource types that have no local counterpart: their Ref is a placeholder name.
NOT_PROVISIONED = frozenset(
    {
        "AWS::Logs::LogGroup",
        "AWS::S3::BucketPolicy",
        "AWS::Serverless::Function",
        "AWS::Serverless::LayerVersion",
        "AWS::Serverless::HttpApi",
    }
)


@dataclass
class LocalStack:
    """The provisioned stack: the template, its resolver, and the physical ids."""

    name: str
    region: str
    template: dict[str, Any]
    resolver: Resolver
    skipped: list[str] = field(default_factory=list)
    # Each function's role as an IAM user (its workers' credentials); empty without IAM.
    identities: dict[str, FunctionIdentity] = field(default_factory=dict)

    def ref(self, logical_id: str) -> str:
        return self.resolver.ref(logical_id)

    def function_env(self, logical_id: str) -> dict[str, str]:
        return function_environment(self.template, logical_id, self.resolver)

    def functions(self) -> list[str]:
        return sorted(resources_of_type(self.template, "AWS::Serverless::Function"))

    def outputs(self) -> dict[str, str]:
        return {
            name: str(self.resolver.resolve(spec["Value"]))
            for name, spec in self.template.get("Outputs", {}).items()
            # An output whose Condition is false is not there, as in CloudFormation.
            if self.resolver.resource_exists(spec)
        }


def physical_name(stack: str, logical_id: str) -> str:
    return f"{stack}-{logical_id}"


def _placeholder_ref(stack: str, logical_id: str, resource: Mapping[str, Any]) -> str:
    """The Ref of a resource with no local counterpart, shaped as CloudFormation's: an API's
    id (10 lowercase characters), a stage's name; else the stack-derived name."""
    if resource["Type"] == "AWS::ApiGatewayV2::Api":
        digest = hashlib.sha256(physical_name(stack, logical_id).encode()).hexdigest()
        return "".join(chr(ord("a") + int(c, 16) % 26) for c in digest[:10])
    if resource["Type"] == "AWS::ApiGatewayV2::Stage":
        return str(resource.get("Properties", {}).get("StageName", "$default"))
    return physical_name(stack, logical_id)


def _create_table(
    stack: str, logical_id: str, props: dict[str, Any], region: str
) -> dict[str, str]:
    ddb = operator_client("dynamodb", region)
    name = props.get("TableName") or physical_name(stack, logical_id)
    kwargs: dict[str, Any] = {
        "TableName": name,
        "AttributeDefinitions": props["AttributeDefinitions"],
        "KeySchema": props["KeySchema"],
        "BillingMode": props.get("BillingMode", "PAY_PER_REQUEST"),
    }
    if props.get("GlobalSecondaryIndexes"):
        kwargs["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
    if "StreamSpecification" in props:
        kwargs["StreamSpecification"] = {"StreamEnabled": True, **props["StreamSpecification"]}
    description = ddb.create_table(**kwargs)["TableDescription"]
    ttl = props.get("TimeToLiveSpecification")
    if ttl and ttl.get("Enabled"):
        ddb.update_time_to_live(TableName=name, TimeToLiveSpecification=ttl)
    attrs = {"Ref": name, "Arn": description["TableArn"]}
    if description.get("LatestStreamArn"):
        attrs["StreamArn"] = description["LatestStreamArn"]
    return attrs


_QUEUE_ATTRIBUTES = (
    "VisibilityTimeout",
    "MessageRetentionPeriod",
    "ReceiveMessageWaitTimeSeconds",
    "DelaySeconds",
    "MaximumMessageSize",
)


def _create_queue(
    stack: str, logical_id: str, props: dict[str, Any], region: str
) -> dict[str, str]:
    sqs = operator_client("sqs", region)
    fifo = bool(props.get("FifoQueue"))
    name = props.get("QueueName") or physical_name(stack, logical_id) + (".fifo" if fifo else "")
    attributes: dict[str, Any] = {k: str(props[k]) for k in _QUEUE_ATTRIBUTES if k in props}
    if fifo:
        attributes["FifoQueue"] = "true"
    if "RedrivePolicy" in props:
        redrive = props["RedrivePolicy"]
        attributes["RedrivePolicy"] = json.dumps(
            {
                "deadLetterTargetArn": redrive["deadLetterTargetArn"],
                "maxReceiveCount": int(redrive["maxReceiveCount"]),
            }
        )
    created = sqs.create_queue(QueueName=name, Attributes=attributes)
    url = created["QueueUrl"]
    arn = f"arn:aws:sqs:{region}:{ACCOUNT_ID}:{name}"
    return {"Ref": url, "Arn": arn, "QueueName": name, "QueueUrl": url}


def _lifecycle_rule(rule: dict[str, Any]) -> dict[str, Any]:
    """CloudFormation's lifecycle rule shape -> the S3 API's."""
    api: dict[str, Any] = {"ID": rule.get("Id", "rule"), "Status": rule.get("Status", "Enabled")}
    api["Filter"] = {"Prefix": rule.get("Prefix", "")}
    if "ExpirationInDays" in rule:
        api["Expiration"] = {"Days": int(rule["ExpirationInDays"])}
    if "AbortIncompleteMultipartUpload" in rule:
        days = int(rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"])
        api["AbortIncompleteMultipartUpload"] = {"DaysAfterInitiation": days}
    return api


def _create_bucket(
    stack: str, logical_id: str, props: dict[str, Any], region: str
) -> dict[str, str]:
    s3 = operator_client("s3", region)
    name = props.get("BucketName") or physical_name(stack, logical_id).lower()
    if region == "us-east-1":
        s3.create_bucket(Bucket=name)
    else:
        s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})
    if "PublicAccessBlockConfiguration" in props:
        s3.put_public_access_block(
            Bucket=name, PublicAccessBlockConfiguration=props["PublicAccessBlockConfiguration"]
        )
    if "BucketEncryption" in props:
        s3.put_bucket_encryption(
            Bucket=name,
            ServerSideEncryptionConfiguration={
                "Rules": [
                    {
                        "ApplyServerSideEncryptionByDefault": rule["ServerSideEncryptionByDefault"],
                        "BucketKeyEnabled": bool(rule.get("BucketKeyEnabled", False)),
                    }
                    for rule in props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
                ]
            },
        )
    rules = props.get("LifecycleConfiguration", {}).get("Rules", [])
    if rules:
        s3.put_bucket_lifecycle_configuration(
            Bucket=name,
            LifecycleConfiguration={"Rules": [_lifecycle_rule(r) for r in rules]},
        )
    return {"Ref": name, "Arn": f"arn:aws:s3:::{name}"}


def _create_user_pool(
    stack: str, logical_id: str, props: dict[str, Any], region: str
) -> dict[str, str]:
    cognito = operator_client("cognito-idp", region)
    kwargs: dict[str, Any] = {
        "PoolName": props.get("UserPoolName", physical_name(stack, logical_id))
    }
    for key in (
        "Policies",
        "UsernameConfiguration",
        "AdminCreateUserConfig",
        "AutoVerifiedAttributes",
    ):
        if key in props:
            kwargs[key] = props[key]
    # A Number parameter's Ref is a string; CloudFormation converts it, boto3 wants an int.
    password_policy = kwargs.get("Policies", {}).get("PasswordPolicy", {})
    if "MinimumLength" in password_policy:
        password_policy["MinimumLength"] = int(password_policy["MinimumLength"])
    pool = cognito.create_user_pool(**kwargs)["UserPool"]
    return {"Ref": pool["Id"], "Arn": pool["Arn"], "ProviderName": pool.get("Name", "")}


def _create_user_pool_client(
    stack: str, logical_id: str, props: dict[str, Any], region: str
) -> dict[str, str]:
    cognito = operator_client("cognito-idp", region)
    kwargs: dict[str, Any] = {
        "UserPoolId": props["UserPoolId"],
        "ClientName": props.get("ClientName", physical_name(stack, logical_id)),
        "GenerateSecret": bool(props.get("GenerateSecret", False)),
    }
    for key in (
        "ExplicitAuthFlows",
        "AccessTokenValidity",
        "IdTokenValidity",
        "RefreshTokenValidity",
        "TokenValidityUnits",
        "PreventUserExistenceErrors",
    ):
        if key in props:
            kwargs[key] = props[key]
    client = cognito.create_user_pool_client(**kwargs)["UserPoolClient"]
    return {"Ref": client["ClientId"]}


def _create_user_pool_group(
    stack: str, logical_id: str, props: dict[str, Any], region: str
) -> dict[str, str]:
    cognito = operator_client("cognito-idp", region)
    kwargs: dict[str, Any] = {
        "UserPoolId": props["UserPoolId"],
        "GroupName": props.get("GroupName", physical_name(stack, logical_id)),
    }
    for key in ("Description", "Precedence", "RoleArn"):
        if key in props:
            kwargs[key] = props[key]
    group = cognito.create_group(**kwargs)["Group"]
    # CloudFormation's Ref of a user pool group is its name.
    return {"Ref": group.get("GroupName", kwargs["GroupName"])}


def _create_secret(
    stack: str, logical_id: str, props: dict[str, Any], region: str
) -> dict[str, str]:
    """A Secrets Manager secret; GenerateSecretString's length and punctuation rule apply."""
    secretsmanager = operator_client("secretsmanager", region)
    generate = props.get("GenerateSecretString") or {}
    alphabet = string.ascii_letters + string.digits
    if not generate.get("ExcludePunctuation"):
        alphabet += "!#$%&()*+,-.:;<=>?@[]^_{|}~"
    value = props.get("SecretString") or "".join(
        secrets.choice(alphabet) for _ in range(int(generate.get("PasswordLength", 32)))
    )
    created = secretsmanager.create_secret(
        Name=props.get("Name", physical_name(stack, logical_id)),
        Description=props.get("Description", ""),
        SecretString=value,
    )
    # CloudFormation's Ref of a secret is its ARN.
    return {"Ref": created["ARN"]}


Creator = Callable[[str, str, dict[str, Any], str], dict[str, str]]

CREATORS: dict[str, Creator] = {
    "AWS::DynamoDB::Table": _create_table,
    "AWS::SQS::Queue": _create_queue,
    "AWS::S3::Bucket": _create_bucket,
    "AWS::Cognito::UserPool": _create_user_pool,
    "AWS::Cognito::UserPoolClient": _create_user_pool_client,
    "AWS::Cognito::UserPoolGroup": _create_user_pool_group,
    "AWS::SecretsManager::Secret": _create_secret,
}


def provision(
    *,
    stack_name: str = "gpuqueue-local",
    region: str = "us-east-1",
    parameters: Mapping[str, str] | None = None,
    template: dict[str, Any] | None = None,
    identities: bool = True,
    iam: Any = None,
) -> LocalStack:
    """Create every supported resource of the template, in dependency order, and (with
    `identities`) an IAM user per function holding its role's policies (made through `iam`,
    by default an IAM client)."""
    template = template or load_template()
    resolver = Resolver.for_template(
        template,
        parameters=parameter_values(template, parameters or {}),
        pseudo={
            "AWS::StackName": stack_name,
            "AWS::Region": region,
            "AWS::AccountId": ACCOUNT_ID,
            "AWS::Partition": "aws",
            "AWS::URLSuffix": "amazonaws.com",
        },
    )
    # As CloudFormation does before creating anything: the rules' assertions must hold.
    resolver.check_rules(template.get("Rules", {}))
    stack = LocalStack(name=stack_name, region=region, template=template, resolver=resolver)
    # A resource whose Condition is false does not exist.
    pending = {
        logical_id: resource
        for logical_id, resource in template.get("Resources", {}).items()
        if resolver.resource_exists(resource)
    }
    for logical_id, resource in list(pending.items()):
        if resource["Type"] not in CREATORS:
            resolver.refs[logical_id] = _placeholder_ref(stack_name, logical_id, resource)
            stack.skipped.append(logical_id)
            del pending[logical_id]
    # Resolve what we can each round; a resource waits until what it references exists.
    while pending:
        progressed = False
        for logical_id, resource in list(pending.items()):
            try:
                props = resolver.resolve(resource.get("Properties", {}))
            except UnresolvedReference:
                continue
            attrs = CREATORS[resource["Type"]](stack_name, logical_id, props, region)
            resolver.refs[logical_id] = attrs.pop("Ref")
            for attribute, value in attrs.items():
                resolver.attributes[(logical_id, attribute)] = value
            del pending[logical_id]
            progressed = True
        if not progressed:
            raise UnresolvedReference(f"cannot order resources: {sorted(pending)}")
    if identities:
        stack.identities = provision_identities(
            stack_name, template, resolver.parameters, resolver.resolve, region, iam=iam
        )
    return stack
