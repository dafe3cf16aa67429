"""IAM enforced by moto as AWS enforces it: every call authorized against the caller's policies
on the resource it touches.

moto can authenticate each request by its access key and authorize it against the key
owner's policies (`INITIAL_NO_AUTH_ACTION_COUNT`). SQS and S3 name the resource (queue ARN,
`bucket/key`); every other service authorizes against Resource `*`, so a statement scoped to
a table ARN never matches and always denies (measured on moto 5.2.5). This module gives
DynamoDB, DynamoDB Streams, Cognito, Secrets Manager and SSM the resources AWS authorizes
them against — per table and index, per item of a batch or a transaction, with the action
AWS checks for each (a transaction's Put is `dynamodb:PutItem`) — so a function whose role
lacks a grant fails here as it would on AWS.

It also keeps the operator's identity: the access key `testing` (what tools, tests and the
local stack's own machinery sign with) belongs to an administrator, re-created after every
`/moto-api/reset`, and every authorization decision can be recorded (who, action, resource,
allowed) for the least-privilege report (`tools/permissions_report.py`).
"""

from __future__ import annotations

import hmac
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from moto import settings
from moto.cognitoidp.responses import CognitoIdpResponse
from moto.core.exceptions import AccessDeniedError, JsonRESTError
from moto.core.exceptions import _RESTError as RESTError
from moto.dynamodb.responses import DynamoHandler
from moto.dynamodbstreams.responses import DynamoDBStreamsHandler
from moto.iam.access_control import IAMPolicy, IAMRequest, IAMRequestBase, PermissionResult
from moto.iam.models import iam_backends
from moto.moto_api._internal.models import MotoAPIBackend
from moto.s3.exceptions import (
    S3AccessDeniedError,
    S3ClientError,
    S3InvalidAccessKeyIdError,
    S3SignatureDoesNotMatchError,
)
from moto.s3.responses import S3Response
from moto.secretsmanager.models import secretsmanager_backends
from moto.secretsmanager.responses import SecretsManagerResponse
from moto.sqs.responses import SQSResponse
from moto.ssm.responses import SimpleSystemManagerResponse

ACCOUNT_ID = "123456789012"
PARTITION = "aws"
# The operator: everything that is not a function signs with this key (boto3's env in the
# tools, the tests and the local stack's own pollers) and may do anything.
ADMIN_USER = "gpuqueue-admin"
ADMIN_ACCESS_KEY_ID = "testing"
ADMIN_SECRET_ACCESS_KEY = "testing"  # noqa: S105 - the local stack's well-known test key
ADMIN_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
# Set to a file path: every authorization decision is appended to it as a JSON line.
AUDIT_FILE_ENV = "GPUQUEUE_IAM_AUDIT_FILE"

_MARK = "_gpuqueue_iam"


@dataclass(frozen=True)
class Decision:
    """One authorization: who asked for what on which resource, and the answer."""

    principal: str
    action: str
    resource: str
    allowed: bool


_listeners: list[Callable[[Decision], None]] = []
_listeners_lock = threading.Lock()


def add_listener(listener: Callable[[Decision], None]) -> None:
    with _listeners_lock:
        _listeners.append(listener)


def remove_listener(listener: Callable[[Decision], None]) -> None:
    with _listeners_lock:
        if listener in _listeners:
            _listeners.remove(listener)


def _publish(decision: Decision) -> None:
    with _listeners_lock:
        listeners = list(_listeners)
    for listener in listeners:
        listener(decision)


class AuditFile:
    """Appends decisions to a JSON-lines file (one writer per process; lines are atomic)."""

    def __init__(self, path: str) -> None:
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives with the process

    def __call__(self, decision: Decision) -> None:
        line = json.dumps(asdict(decision), separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")


def read_audit(path: str) -> Iterator[Decision]:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield Decision(**json.loads(line))


# --- the resources AWS authorizes each call against -------------------------------------


def _arn(service: str, region: str, resource: str, *, account: str = ACCOUNT_ID) -> str:
    return f"arn:{PARTITION}:{service}:{region}:{account}:{resource}"


def _table(region: str, table: str, index: str | None = None) -> str:
    path = f"table/{table}" + (f"/index/{index}" if index else "")
    return _arn("dynamodb", region, path)


_TRANSACT_ACTIONS = {
    "Put": "PutItem",
    "Update": "UpdateItem",
    "Delete": "DeleteItem",
    "ConditionCheck": "ConditionCheckItem",
    "Get": "GetItem",
}


def dynamodb_checks(action: str, body: dict[str, Any], region: str) -> list[tuple[str, str]]:
    """(action, resource) pairs AWS authorizes a DynamoDB request against."""
    if action in ("BatchGetItem", "BatchWriteItem"):
        return [(action, _table(region, name)) for name in body.get("RequestItems", {})]
    if action in ("TransactWriteItems", "TransactGetItems"):
        checks = []
        for item in body.get("TransactItems", []):
            for kind, request in item.items():
                checks.append((_TRANSACT_ACTIONS[kind], _table(region, request["TableName"])))
        return checks
    if "TableName" in body:
        return [(action, _table(region, body["TableName"], body.get("IndexName")))]
    if "ResourceArn" in body:
        return [(action, str(body["ResourceArn"]))]
    return [(action, "*")]


def dynamodb_streams_checks(action: str, body: dict[str, Any]) -> list[tuple[str, str]]:
    # GetRecords names an opaque iterator; AWS's managed stream policy grants it on `*`.
    return [(action, str(body.get("StreamArn", "*")))]


def cognito_checks(action: str, body: dict[str, Any], region: str) -> list[tuple[str, str]]:
    pool = body.get("UserPoolId")
    return [(action, _arn("cognito-idp", region, f"userpool/{pool}") if pool else "*")]


def secretsmanager_checks(
    action: str, body: dict[str, Any], region: str, account: str
) -> list[tuple[str, str]]:
    secret_id = body.get("SecretId")
    if not secret_id:
        return [(action, "*")]
    if str(secret_id).startswith("arn:"):
        return [(action, str(secret_id))]
    # A name: the secret's ARN (with its random suffix) when it exists, as AWS resolves it.
    secret = secretsmanager_backends[account][region].secrets.get(secret_id)
    arn = getattr(secret, "arn", None) or _arn("secretsmanager", region, f"secret:{secret_id}")
    return [(action, str(arn))]


def ssm_checks(action: str, body: dict[str, Any], region: str) -> list[tuple[str, str]]:
    def parameter(name: str) -> str:
        if name.startswith("arn:"):
            return name
        return _arn("ssm", region, f"parameter/{name.lstrip('/')}")

    if "Names" in body:
        return [(action, parameter(str(name))) for name in body["Names"]]
    if "Name" in body:
        return [(action, parameter(str(body["Name"])))]
    if "Path" in body:
        return [(action, parameter(str(body["Path"])))]
    return [(action, "*")]


def _json_body(handler: Any) -> dict[str, Any]:
    raw = handler.raw_body
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    try:
        parsed = json.loads(raw or "{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _region_of(handler: Any) -> str:
    authorization = handler.headers.get("Authorization", "")
    scope = authorization.partition("Credential=")[2].partition(",")[0].split("/")
    return scope[2] if len(scope) > 2 else str(handler.region)


def _access_denied(user_arn: str, action: str, resource: str) -> JsonRESTError:
    """AWS's answer to a JSON-protocol call the caller's policies do not allow."""
    return JsonRESTError(
        "AccessDeniedException",
        f"User: {user_arn} is not authorized to perform: {action} on resource: {resource} "
        f"because no identity-based policy allows the {action} action",
    )


def _authorize(handler: Any, checks: list[tuple[str, str]]) -> None:
    """moto's own authorization, once per (action, resource) AWS checks."""
    if not enforcing():
        return  # moto's default: no authentication
    if handler.headers.get("X-Amz-Target") in handler.PUBLIC_OPERATIONS:
        return
    if "Authorization" not in handler.headers:
        raise JsonRESTError("MissingAuthenticationTokenException", "Missing Authentication Token")
    for action, resource in checks:
        request = IAMRequest(
            account_id=handler.current_account,
            method=handler.method,
            path=handler.raw_path,
            data=handler.data,
            body=handler.raw_body,
            headers=handler.headers,
            action=action,
        )
        request.check_signature()
        try:
            request.check_action_permitted(resource)
        except AccessDeniedError:
            raise _access_denied(request._access_key.arn, request._action, resource) from None


_PRESIGN_PARAMS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
)


def _presigned_signature(
    method: str,
    url: str,
    headers: Mapping[str, str],
    credentials: Credentials,
    *,
    region: str,
    date: str,
    expires: int,
) -> str:
    """The signature S3 expects on a presigned URL (botocore signs it the same way), over
    the headers the URL says were signed (`X-Amz-SignedHeaders`)."""
    parts = urlsplit(url)
    kept = [
        (k, v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
        if k not in _PRESIGN_PARAMS
    ]
    bare = urlunsplit(parts._replace(query=urlencode(kept, quote_via=quote)))
    request = AWSRequest(method=method, url=bare, headers=dict(headers))
    return _SignedAt(date, credentials, "s3", region, expires=expires).signature_of(request)


class _SignedAt(S3SigV4QueryAuth):
    """botocore's presigner at a given time: `add_auth` stamps the request with the current
    second, so a URL checked in a later second than it was signed would never match."""

    def __init__(self, date: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._date = date

    def signature_of(self, request: AWSRequest) -> str:
        request.context["timestamp"] = self._date
        self._modify_request_before_signing(request)  # type: ignore[attr-defined]
        canonical = self.canonical_request(request)
        return str(self.signature(self.string_to_sign(request, canonical), request))


def _check_presigned(handler: Any, resource: str) -> None:
    """A presigned S3 request: the signer's key, its signature, its expiry, then its policies.
    moto serves expired or tampered presigned URLs; S3 refuses them with 403."""
    query = {k: v[0] for k, v in handler.querystring.items() if isinstance(v, list) and v}
    key_id, _, scope = query["X-Amz-Credential"].partition("/")
    region = scope.split("/")[1] if "/" in scope else "us-east-1"
    owner = _user_with_key(key_id)
    if owner is None:
        raise S3InvalidAccessKeyIdError()
    user, secret = owner
    date = query.get("X-Amz-Date", "")
    expires = int(query.get("X-Amz-Expires", "0"))
    signed_at = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    if datetime.now(UTC) > signed_at + timedelta(seconds=expires):
        raise S3ClientError("AccessDenied", "Request has expired")
    received = {k.lower(): v for k, v in handler.headers.items()}
    signed_names = query.get("X-Amz-SignedHeaders", "host").split(";")
    expected = _presigned_signature(
        handler.method,
        handler.uri,
        {name: received.get(name, "") for name in signed_names},
        Credentials(key_id, secret),
        region=region,
        date=date,
        expires=expires,
    )
    if not hmac.compare_digest(expected, query.get("X-Amz-Signature", "")):
        raise S3SignatureDoesNotMatchError()
    action = f"s3:{handler._get_action()}"
    arn = f"arn:{PARTITION}:iam::{ACCOUNT_ID}:user/{user}"
    allowed = False
    for policy in _user_policies(user):
        result = IAMPolicy(policy).is_action_permitted(action, resource)
        if result == PermissionResult.DENIED:
            allowed = False
            break
        allowed = allowed or result == PermissionResult.PERMITTED
    _publish(Decision(user, action, resource, allowed=allowed))
    if not allowed:
        raise S3ClientError("AccessDenied", f"User: {arn} is not authorized to perform: {action}")


def _user_with_key(access_key_id: str) -> tuple[str, str] | None:
    backend = iam_backends[ACCOUNT_ID][PARTITION]
    for user in backend.users.values():
        for key in user.access_keys:
            if key.access_key_id == access_key_id and key.status == "Active":
                return user.name, key.secret_access_key
    return None


def _user_policies(user_name: str) -> list[Any]:
    """The user's inline documents and attached policies (what IAMPolicy reads)."""
    user = iam_backends[ACCOUNT_ID][PARTITION].get_user(user_name)
    return [*user.policies.values(), *user.managed_policies.values()]


def _patch_s3() -> None:
    original = S3Response._authenticate_and_authorize_s3_action
    if getattr(original, _MARK, False):
        return

    def authorize(self: Any, bucket_name: str | None = None, key_name: str | None = None) -> None:
        if enforcing() and "Authorization" not in self.headers:
            resource = f"arn:{PARTITION}:s3:::{bucket_name or '*'}" + (
                f"/{key_name}" if key_name else ""
            )
            if "X-Amz-Credential" in self.querystring:
                _check_presigned(self, resource)
                return
            raise S3AccessDeniedError()  # anonymous, and the bucket is private
        original(self, bucket_name=bucket_name, key_name=key_name)

    setattr(authorize, _MARK, True)
    S3Response._authenticate_and_authorize_s3_action = authorize  # type: ignore[method-assign]


def _patch_sqs() -> None:
    """moto checks SQS against the queue ARN already, but answers a refusal in XML, which a
    JSON-protocol client (boto3 today) reads as code "403"; AWS answers `AccessDenied`."""
    original = SQSResponse._authenticate_and_authorize_normal_action
    if getattr(original, _MARK, False):
        return

    def authorize(self: Any, resource: str = "*") -> None:
        try:
            original(self, resource)
        except RESTError as refused:
            if "X-Amz-Target" not in self.headers or isinstance(refused, JsonRESTError):
                raise  # query protocol: moto's XML answer is AWS's
            raise refused.to_json() from None

    setattr(authorize, _MARK, True)
    SQSResponse._authenticate_and_authorize_normal_action = authorize  # type: ignore[method-assign]


def _patch_service(
    cls: type, checks: Callable[[Any, str, dict[str, Any]], list[tuple[str, str]]]
) -> None:
    if getattr(cls, _MARK, False):
        return

    def authorize(self: Any, resource: str = "*") -> None:
        _authorize(self, checks(self, self._get_action(), _json_body(self)))

    cls._authenticate_and_authorize_normal_action = authorize  # type: ignore[attr-defined]
    setattr(cls, _MARK, True)


def _patch_audit() -> None:
    original = IAMRequestBase.check_action_permitted
    if getattr(original, _MARK, False):
        return

    def check_action_permitted(self: IAMRequestBase, resource: str) -> None:
        key = self._access_key
        principal = getattr(key, "_owner_user_name", None) or getattr(key, "_owner_role_name", "?")
        try:
            original(self, resource)
        except Exception:
            _publish(Decision(str(principal), self._action, resource, allowed=False))
            raise
        _publish(Decision(str(principal), self._action, resource, allowed=True))

    setattr(check_action_permitted, _MARK, True)
    IAMRequestBase.check_action_permitted = check_action_permitted  # type: ignore[method-assign]


def seed_admin(
    access_key_id: str = ADMIN_ACCESS_KEY_ID, secret_access_key: str = ADMIN_SECRET_ACCESS_KEY
) -> None:
    """The operator's user and its well-known key (idempotent; moto's reset forgets both).
    Another key may be given: `mock_aws` signs with its own (FOOBARKEY)."""
    backend = iam_backends[ACCOUNT_ID][PARTITION]
    user = backend.users.get(ADMIN_USER) or backend.create_user(
        region_name="us-east-1", user_name=ADMIN_USER
    )
    backend.put_user_policy(ADMIN_USER, "administrator", json.dumps(ADMIN_POLICY))
    if not any(k.access_key_id == access_key_id for k in user.access_keys):
        key = backend.create_access_key(ADMIN_USER)
        key.access_key_id = access_key_id
        key.secret_access_key = secret_access_key


class InProcessIam:
    """The three IAM calls a stack's identities need (`function_identities`), made on moto's
    IAM backend in this process: the same users, policies and keys as over HTTP, without a
    request each (a stack has ~50; tests provision hundreds of stacks on an in-process
    server). Same arguments and answers as boto3's IAM client."""

    def __init__(self, region: str = "us-east-1") -> None:
        self._region = region

    @property
    def _backend(self) -> Any:
        return iam_backends[ACCOUNT_ID][PARTITION]

    def create_user(self, *, UserName: str) -> dict[str, Any]:
        user = self._backend.create_user(region_name=self._region, user_name=UserName)
        return {"User": {"UserName": user.name, "Arn": user.arn}}

    def put_user_policy(
        self,
        *,
        UserName: str,
        PolicyName: str,
        PolicyDocument: str,
    ) -> dict[str, Any]:
        self._backend.put_user_policy(UserName, PolicyName, PolicyDocument)
        return {}

    def create_access_key(self, *, UserName: str) -> dict[str, Any]:
        key = self._backend.create_access_key(UserName)
        return {
            "AccessKey": {
                "UserName": UserName,
                "AccessKeyId": key.access_key_id,
                "SecretAccessKey": key.secret_access_key,
            }
        }


def _patch_reset() -> None:
    original = MotoAPIBackend.reset
    if getattr(original, _MARK, False):
        return

    def reset(self: MotoAPIBackend) -> None:
        original(self)
        seed_admin()

    setattr(reset, _MARK, True)
    MotoAPIBackend.reset = reset  # type: ignore[method-assign]


def install(*, enforce: bool = True) -> None:
    """Patch moto in this process (idempotent). `enforce=False` keeps moto's no-auth default
    but still resolves resources, so enforcement can be switched on later."""
    _patch_service(
        DynamoHandler, lambda h, action, body: dynamodb_checks(action, body, _region_of(h))
    )
    _patch_service(
        DynamoDBStreamsHandler, lambda h, action, body: dynamodb_streams_checks(action, body)
    )
    _patch_service(
        CognitoIdpResponse, lambda h, action, body: cognito_checks(action, body, _region_of(h))
    )
    _patch_service(
        SecretsManagerResponse,
        lambda h, action, body: secretsmanager_checks(
            action, body, _region_of(h), h.current_account
        ),
    )
    _patch_service(
        SimpleSystemManagerResponse, lambda h, action, body: ssm_checks(action, body, _region_of(h))
    )
    _patch_s3()
    _patch_sqs()
    _patch_audit()
    _patch_reset()
    seed_admin()
    audit_file = os.environ.get(AUDIT_FILE_ENV)
    if audit_file:
        add_listener(AuditFile(audit_file))
    if enforce:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = 0


def enforcing() -> bool:
    return bool(settings.INITIAL_NO_AUTH_ACTION_COUNT == 0)
