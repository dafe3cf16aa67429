"""IAM for the local stack's own emulators (the WebSocket management API): SigV4 checked and
the caller's policies evaluated, as API Gateway does before it serves `@connections`.

moto enforces IAM for the services it serves (`moto_iam`); an emulator we wrote ourselves
gets the same answer from the same documents: each function's role (`FunctionIdentity`) and
the operator's key, evaluated with moto's own policy engine.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from moto.iam.access_control import IAMPolicy, PermissionResult

from gpuqueue_local.function_identities import FunctionIdentity
from gpuqueue_local.moto_iam import (
    ACCOUNT_ID,
    ADMIN_ACCESS_KEY_ID,
    ADMIN_POLICY,
    ADMIN_SECRET_ACCESS_KEY,
    ADMIN_USER,
    Decision,
)


@dataclass(frozen=True)
class Refusal:
    """An emulator's answer to a request IAM refuses: status, error type, message."""

    status: int
    error_type: str
    message: str


@dataclass(frozen=True)
class _Principal:
    user: str
    secret: str
    policies: tuple[Mapping[str, Any], ...]


def _between(text: str, start: str, end: str) -> str:
    return text.partition(start)[2].partition(end)[0]


@dataclass
class EmulatorIam:
    """Who may call an emulator: the functions' identities and the operator."""

    identities: Mapping[str, FunctionIdentity] = field(default_factory=dict)
    listeners: list[Any] = field(default_factory=list)

    def _principal(self, access_key_id: str) -> _Principal | None:
        if access_key_id == ADMIN_ACCESS_KEY_ID:
            return _Principal(ADMIN_USER, ADMIN_SECRET_ACCESS_KEY, (ADMIN_POLICY,))
        for identity in self.identities.values():
            if identity.access_key_id == access_key_id:
                return _Principal(identity.user_name, identity.secret_access_key, identity.policies)
        return None

    def check(
        self,
        *,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes,
        action: str,
        resource: str,
    ) -> Refusal | None:
        """None when the signed request may do `action` on `resource`; else AWS's refusal."""
        lowered = {k.lower(): v for k, v in headers.items()}
        authorization = lowered.get("authorization", "")
        if not authorization:
            return Refusal(
                403, "MissingAuthenticationTokenException", "Missing Authentication Token"
            )
        scope = _between(authorization, "Credential=", ",").split("/")
        principal = self._principal(scope[0]) if scope else None
        if principal is None or len(scope) < 4:
            return Refusal(
                403,
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        signed = _between(authorization, "SignedHeaders=", ",").split(";")
        request = AWSRequest(
            method=method,
            url=url,
            data=body,
            headers={k: v for k, v in lowered.items() if k in signed},
        )
        request.context["timestamp"] = lowered.get("x-amz-date", "")
        signer = SigV4Auth(Credentials(scope[0], principal.secret), scope[3], scope[2])
        expected = signer.signature(
            signer.string_to_sign(request, signer.canonical_request(request)), request
        )
        if not hmac.compare_digest(expected, _between(authorization, "Signature=", ",")):
            return Refusal(
                403,
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided.",
            )
        allowed = False
        for policy in principal.policies:
            result = IAMPolicy(json.dumps(policy)).is_action_permitted(action, resource)
            if result == PermissionResult.DENIED:
                allowed = False
                break
            allowed = allowed or result == PermissionResult.PERMITTED
        for listener in self.listeners:
            listener(Decision(principal.user, action, resource, allowed=allowed))
        if allowed:
            return None
        arn = f"arn:aws:iam::{ACCOUNT_ID}:user/{principal.user}"
        return Refusal(
            403,
            "AccessDeniedException",
            f"User: {arn} is not authorized to perform: {action} on resource: {resource}",
        )
