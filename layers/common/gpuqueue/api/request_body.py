"""A request's body, read one way by every JSON route: no bytes make it a 500.

`json.loads` (Powertools' default) raised ValueError on an integer past Python's 4,300-digit
limit and RecursionError on deep nesting, and decoding a base64 body that is not UTF-8 raised
UnicodeDecodeError: all three were 500s. pydantic-core's parser (jiter, in Rust) refuses those
as parse errors instead: integers past 4,300 digits, nesting deeper than 200 (counted without
any Python recursion, so a 50,000-deep body costs a scan of its first 200 brackets), invalid
UTF-8, lone UTF-16 surrogates, and `NaN`/`Infinity`, which are not JSON.
Duplicate keys keep the last value, as pydantic's own JSON parsing does for every model.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from aws_lambda_powertools.utilities.data_classes.common import BaseProxyEvent
from pydantic_core import from_json

from gpuqueue.errors import InvalidJson

NOT_JSON = "request body is not valid JSON"


def body_bytes(event: BaseProxyEvent) -> bytes:
    """The body as API Gateway received it (it base64-encodes what it took as binary)."""
    body = event.body
    if not body:
        return b""
    if event.is_base64_encoded:
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidJson(f"{NOT_JSON}: not valid base64", field="body") from None
    try:
        return body.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate the event's own JSON escaped
        raise InvalidJson(f"{NOT_JSON}: not valid UTF-8", field="body") from None


def json_body(event: BaseProxyEvent) -> Any:
    """The body parsed as JSON; None when there is none (the model then says what is missing)."""
    data = body_bytes(event)
    if not data:
        return None
    try:
        return from_json(data, allow_inf_nan=False)
    except ValueError as exc:
        # jiter's reason and position ("number out of range at line 1 column 4301"): never
        # the input itself.
        raise InvalidJson(f"{NOT_JSON}: {exc}", field="body") from None
