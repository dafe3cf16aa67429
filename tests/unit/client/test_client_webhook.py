"""Webhook signatures (`gpuqueue_client.webhooks`, `gpuqueue webhook verify|sign`) and the
push helpers (`gpuqueue_client.push`): pure functions, no sockets.

The signature is `X-Gpuqueue-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]`, each v1 an
HMAC-SHA256 of `f"{t}.".encode() + raw_body` keyed with the UTF-8 bytes of a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.util
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

CLIENT_DIR = Path(__file__).resolve().parents[3] / "client"
if importlib.util.find_spec("gpuqueue_client") is None:  # no `pip install -e .` in this venv
    sys.path.insert(0, str(CLIENT_DIR))

from gpuqueue_client import WebhookVerificationError, webhooks  # noqa: E402
from gpuqueue_client.cli import app  # noqa: E402
from gpuqueue_client.push import push_connect_url, pushed_task  # noqa: E402

SECRET = "whsec_test"
OLD_SECRET = "whsec_old"
T = 1_700_000_000
BODY = b'{"event":"task.done","delivery_id":"d-1","task":{"task_id":"t-1","status":"DONE"}}'
# `printf '1700000000.<BODY>' | openssl dgst -sha256 -hmac whsec_test`, computed outside Python.
KNOWN_V1 = "c5023faee9c0a9a2621d2fb05ad196341b13890d3642df7b1cf4e69a15b1a6ac"


def hmac_hex(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def reason(secrets: str | list[str], header: str, body: bytes = BODY) -> str:
    with pytest.raises(WebhookVerificationError) as caught:
        webhooks.verify_or_raise(secrets, header, body, now=T)
    return caught.value.reason


# -- sign -------------------------------------------------------------------------------------


def test_sign_matches_an_independently_computed_hmac() -> None:
    header = webhooks.sign(SECRET, BODY, timestamp=T)

    assert header == f"t={T},v1={KNOWN_V1}"
    assert hmac_hex(SECRET, T, BODY) == KNOWN_V1


def test_sign_with_two_secrets_gives_one_v1_each_in_order() -> None:
    header = webhooks.sign([SECRET, OLD_SECRET], BODY, timestamp=T)

    assert header == f"t={T},v1={KNOWN_V1},v1={hmac_hex(OLD_SECRET, T, BODY)}"


def test_sign_keys_with_the_utf8_bytes_of_the_secret() -> None:
    header = webhooks.sign("sécret-ü", b"{}", timestamp=T)

    expected = hmac.new("sécret-ü".encode(), f"{T}.{{}}".encode(), hashlib.sha256).hexdigest()
    assert header == f"t={T},v1={expected}"


@pytest.mark.parametrize("secrets", ["", [], [SECRET, ""]])
def test_sign_refuses_an_empty_secret(secrets: str | list[str]) -> None:
    with pytest.raises(ValueError, match=r"^at least one non-empty webhook secret is needed$"):
        webhooks.sign(secrets, BODY, timestamp=T)


# -- verify -----------------------------------------------------------------------------------


def test_a_signed_body_verifies() -> None:
    header = webhooks.sign(SECRET, BODY, timestamp=T)

    assert webhooks.verify(SECRET, header, BODY, now=T)
    assert webhooks.verify_or_raise(SECRET, header, BODY, now=T) == T


def test_the_known_vector_verifies() -> None:
    assert webhooks.verify(SECRET, f"t={T},v1={KNOWN_V1}", BODY, now=T + 10)


def test_verify_uses_the_clock_when_now_is_not_given() -> None:
    now = int(time.time())
    header = webhooks.sign(SECRET, BODY, timestamp=now)

    assert webhooks.verify(SECRET, header, BODY)
    assert not webhooks.verify(SECRET, webhooks.sign(SECRET, BODY, timestamp=now - 301), BODY)


def test_a_tampered_body_is_a_signature_mismatch() -> None:
    header = webhooks.sign(SECRET, BODY, timestamp=T)
    tampered = BODY.replace(b"DONE", b"FAIL")

    assert not webhooks.verify(SECRET, header, tampered, now=T)
    assert reason(SECRET, header, tampered) == "signature mismatch"


def test_a_reformatted_body_is_a_signature_mismatch() -> None:
    header = webhooks.sign(SECRET, BODY, timestamp=T)
    reserialized = json.dumps(json.loads(BODY)).encode()  # same JSON, other bytes

    assert reason(SECRET, header, reserialized) == "signature mismatch"


def test_a_wrong_secret_is_a_signature_mismatch() -> None:
    header = webhooks.sign("someone-else", BODY, timestamp=T)

    assert reason(SECRET, header) == "signature mismatch"


def test_a_changed_timestamp_is_a_signature_mismatch() -> None:
    signature = webhooks.sign(SECRET, BODY, timestamp=T).split(",")[1]

    assert reason(SECRET, f"t={T + 1},{signature}") == "signature mismatch"


def test_during_a_rotation_either_secret_is_accepted() -> None:
    # Given a delivery signed with the new and the old secret
    header = webhooks.sign([SECRET, OLD_SECRET], BODY, timestamp=T)

    # Then a receiver that knows only one of them accepts it
    assert webhooks.verify(SECRET, header, BODY, now=T)
    assert webhooks.verify(OLD_SECRET, header, BODY, now=T)
    assert not webhooks.verify("third", header, BODY, now=T)


def test_a_receiver_with_both_secrets_accepts_a_delivery_signed_with_either() -> None:
    both = [SECRET, OLD_SECRET]

    assert webhooks.verify(both, webhooks.sign(OLD_SECRET, BODY, timestamp=T), BODY, now=T)
    assert webhooks.verify(both, webhooks.sign(SECRET, BODY, timestamp=T), BODY, now=T)


@pytest.mark.parametrize("age", [-301, 301, 86_400])
def test_a_timestamp_over_the_tolerance_is_refused(age: int) -> None:
    header = webhooks.sign(SECRET, BODY, timestamp=T - age)

    assert reason(SECRET, header) == "timestamp outside tolerance"


@pytest.mark.parametrize("age", [-300, 0, 300])
def test_a_timestamp_within_the_tolerance_is_accepted(age: int) -> None:
    header = webhooks.sign(SECRET, BODY, timestamp=T - age)

    assert webhooks.verify(SECRET, header, BODY, now=T)


def test_the_tolerance_is_configurable() -> None:
    header = webhooks.sign(SECRET, BODY, timestamp=T - 60)

    assert not webhooks.verify(SECRET, header, BODY, now=T, tolerance_seconds=30)
    assert webhooks.verify(SECRET, header, BODY, now=T, tolerance_seconds=60)


def test_a_forged_signature_is_a_mismatch_even_when_stale() -> None:
    header = webhooks.sign("forger", BODY, timestamp=T - 10_000)

    assert reason(SECRET, header) == "signature mismatch"


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"v1={KNOWN_V1}",  # no t
        f"t={T}",  # no v1
        f"t={T},t={T},v1={KNOWN_V1}",  # two t
        f"t=soon,v1={KNOWN_V1}",
        f"t=-{T},v1={KNOWN_V1}",
        f"t={T}.5,v1={KNOWN_V1}",
        f"t={chr(0x0661) * 10},v1={KNOWN_V1}",  # Arabic-Indic digits: isdigit(), not ASCII
        f"t={T},v1=abc",  # not a SHA-256 hex digest
        f"t={T},v1={KNOWN_V1[:-1]}é",  # non-ASCII: compare_digest would raise on it
        f"t={T},v1={KNOWN_V1},junk",
    ],
)
def test_a_malformed_header_is_refused(header: str) -> None:
    assert reason(SECRET, header) == "malformed header"
    assert not webhooks.verify(SECRET, header, BODY, now=T)


def test_spaces_upper_case_hex_and_other_schemes_are_tolerated() -> None:
    header = f" t={T} , v0=whatever , v1={KNOWN_V1.upper()} "

    assert webhooks.verify(SECRET, header, BODY, now=T)


def test_verify_refuses_a_missing_secret_as_a_programming_error() -> None:
    with pytest.raises(ValueError, match="secret"):
        webhooks.verify([], f"t={T},v1={KNOWN_V1}", BODY, now=T)


def test_the_error_is_a_value_error_with_its_reason() -> None:
    error = WebhookVerificationError("signature mismatch")

    assert isinstance(error, ValueError)
    assert str(error) == error.reason == "signature mismatch"


# -- gpuqueue webhook verify | sign ----------------------------------------------------------


def run(*args: str, input: bytes | None = None, env: dict[str, str] | None = None) -> Result:
    environment = {"GPUQUEUE_WEBHOOK_SECRET": None, "COLUMNS": "160", "NO_COLOR": "1"}
    return CliRunner().invoke(app, list(args), input=input, env={**environment, **(env or {})})


@pytest.fixture
def body_file(tmp_path: Path) -> Path:
    path = tmp_path / "body.json"
    path.write_bytes(BODY)
    return path


def fresh_header(*secrets: str, age: int = 0) -> str:
    return webhooks.sign(list(secrets), BODY, timestamp=int(time.time()) - age)


def test_cli_verify_prints_valid_and_exits_0(body_file: Path) -> None:
    result = run(
        "webhook",
        "verify",
        "--secret",
        SECRET,
        "--signature",
        fresh_header(SECRET),
        "--body-file",
        str(body_file),
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == "valid\n"


def test_cli_verify_reads_the_body_from_stdin() -> None:
    args = ["--secret", SECRET, "--signature", fresh_header(SECRET), "--body-file", "-"]
    result = run("webhook", "verify", *args, input=BODY)

    assert result.exit_code == 0, result.output
    assert result.stdout == "valid\n"


def test_cli_verify_takes_the_secret_from_the_environment(body_file: Path) -> None:
    args = ["--signature", fresh_header(SECRET), "--body-file", str(body_file)]
    result = run("webhook", "verify", *args, env={"GPUQUEUE_WEBHOOK_SECRET": SECRET})

    assert result.exit_code == 0, result.output


def test_cli_verify_takes_two_secrets_during_a_rotation(body_file: Path) -> None:
    signed_with_old = fresh_header(OLD_SECRET)
    args = ["--signature", signed_with_old, "--body-file", str(body_file)]

    by_option = run("webhook", "verify", "--secret", SECRET, "--secret", OLD_SECRET, *args)
    by_env = run(
        "webhook", "verify", *args, env={"GPUQUEUE_WEBHOOK_SECRET": "whsec_test whsec_old"}
    )
    only_new = run("webhook", "verify", "--secret", SECRET, *args)

    assert by_option.exit_code == 0, by_option.output
    assert by_env.exit_code == 0, by_env.output
    assert only_new.exit_code == 1


def test_cli_verify_accepts_the_whole_header_line(body_file: Path) -> None:
    line = f"X-Gpuqueue-Signature: {fresh_header(SECRET)}"
    args = ["--secret", SECRET, "--signature", line, "--body-file", str(body_file)]
    result = run("webhook", "verify", *args)

    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("secret", "header", "why"),
    [
        ("wrong-secret", None, "signature mismatch"),
        (SECRET, "t=1,v1=abc", "malformed header"),
        (SECRET, "stale", "timestamp outside tolerance"),
    ],
)
def test_cli_verify_prints_the_reason_and_exits_1(
    body_file: Path, secret: str, header: str | None, why: str
) -> None:
    if header is None:
        header = fresh_header(SECRET)
    elif header == "stale":
        header = fresh_header(SECRET, age=600)
    args = ["--secret", secret, "--signature", header, "--body-file", str(body_file)]
    result = run("webhook", "verify", *args)

    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.strip() == f"invalid: {why}"


def test_cli_verify_tolerance_option(body_file: Path) -> None:
    header = fresh_header(SECRET, age=600)
    args = ["--secret", SECRET, "--signature", header, "--body-file", str(body_file)]

    assert run("webhook", "verify", *args, "--tolerance", "900").exit_code == 0
    assert run("webhook", "verify", *args).exit_code == 1


def test_cli_verify_without_a_secret_is_a_usage_error(body_file: Path) -> None:
    header = fresh_header(SECRET)
    missing = run("webhook", "verify", "--signature", header, "--body-file", str(body_file))
    empty = run(
        "webhook", "verify", "--secret", "", "--signature", header, "--body-file", str(body_file)
    )

    assert missing.exit_code == 2
    assert "GPUQUEUE_WEBHOOK_SECRET" in missing.output
    assert empty.exit_code == 2


def test_cli_sign_prints_a_header_that_verifies(body_file: Path) -> None:
    args = ["--secret", SECRET, "--secret", OLD_SECRET, "--body-file", str(body_file)]
    result = run("webhook", "sign", *args, "--timestamp", str(T))

    assert result.exit_code == 0, result.output
    assert result.stdout == f"t={T},v1={KNOWN_V1},v1={hmac_hex(OLD_SECRET, T, BODY)}\n"


def test_cli_sign_uses_now_by_default(body_file: Path) -> None:
    before = int(time.time())
    result = run("webhook", "sign", "--secret", SECRET, "--body-file", str(body_file))
    header = result.stdout.strip()

    assert result.exit_code == 0, result.output
    assert before <= int(header.split(",")[0].removeprefix("t=")) <= int(time.time())
    assert webhooks.verify(SECRET, header, BODY)


# -- push helpers -----------------------------------------------------------------------------


def test_the_push_url_gets_the_token_url_encoded() -> None:
    url = push_connect_url("wss://push.example/prod", "a+b/c=", api_url="https://api.example")

    assert url == "wss://push.example/prod?token=a%2Bb%2Fc%3D"


def test_a_push_url_with_a_query_gets_the_token_appended() -> None:
    url = push_connect_url("wss://push.example/?v=1", "tok", api_url="https://api.example")

    assert url == "wss://push.example/?v=1&token=tok"


@pytest.mark.parametrize(
    ("push_url", "api_url", "allowed"),
    [
        ("wss://push.example", "https://api.example", True),
        ("wss://push.example", "http://127.0.0.1:3000", True),
        ("ws://127.0.0.1:3001", "http://127.0.0.1:3000", True),
        ("ws://push.example", "https://api.example", False),  # never downgrade the token
        ("https://push.example", "https://api.example", False),
        ("javascript:alert(1)", "https://api.example", False),
    ],
)
def test_the_token_never_travels_less_protected_than_to_the_api(
    push_url: str, api_url: str, allowed: bool
) -> None:
    assert (push_connect_url(push_url, "tok", api_url=api_url) is not None) is allowed


def event(kind: str, task_id: str, status: str = "DONE") -> str:
    return json.dumps({"type": kind, "task": {"task_id": task_id, "status": status}})


def test_a_frame_about_the_task_gives_its_task() -> None:
    assert pushed_task(event("task.done", "t-1"), "t-1") == {"task_id": "t-1", "status": "DONE"}
    assert pushed_task(event("task.failed", "t-1", "FAILED").encode(), "t-1") is not None


@pytest.mark.parametrize(
    "frame",
    [
        event("task.done", "t-2"),  # another task of the user's
        event("task.started", "t-1"),  # not an event the client knows
        json.dumps({"type": "task.done"}),
        json.dumps({"type": "task.done", "task": ["t-1"]}),
        json.dumps(["task.done"]),
        "not json",
        b"\xff\xfe",
    ],
)
def test_other_frames_are_ignored(frame: str | bytes) -> None:
    assert pushed_task(frame, "t-1") is None


# -- the README's receiver snippet ------------------------------------------------------------


def readme_verify() -> Callable[..., bool]:
    """The standard-library `verify` the README gives receivers to copy."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    snippet = next(block for block in blocks if "def verify(secrets" in block)
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    verify: Callable[..., bool] = namespace["verify"]
    return verify


def test_the_readme_snippet_agrees_with_the_library() -> None:
    snippet = readme_verify()
    now = int(time.time())
    cases = [
        ([SECRET], webhooks.sign(SECRET, BODY, timestamp=now), BODY),
        ([OLD_SECRET], webhooks.sign([SECRET, OLD_SECRET], BODY, timestamp=now), BODY),
        ([SECRET, OLD_SECRET], webhooks.sign(OLD_SECRET, BODY, timestamp=now - 299), BODY),
        ([SECRET], webhooks.sign(SECRET, BODY, timestamp=now), BODY + b" "),
        ([SECRET], webhooks.sign("forger", BODY, timestamp=now), BODY),
        ([SECRET], webhooks.sign(SECRET, BODY, timestamp=now - 400), BODY),
        ([SECRET], webhooks.sign(SECRET, BODY, timestamp=now + 400), BODY),
        ([SECRET], f"t={now}", BODY),
        ([SECRET], f"t=soon,v1={KNOWN_V1}", BODY),
        ([SECRET], f"t={now},v1={KNOWN_V1[:-1]}é", BODY),
        ([SECRET], "garbage", BODY),
    ]

    verdicts = [snippet(*case) for case in cases]

    assert verdicts == [webhooks.verify(*case) for case in cases]
    assert verdicts[:3] == [True, True, True]
    assert not any(verdicts[3:])


def test_a_tolerance_of_zero_accepts_only_the_very_second_and_a_negative_one_is_refused():
    header = webhooks.sign(SECRET, BODY, timestamp=T)
    assert webhooks.verify(SECRET, header, BODY, tolerance_seconds=0, now=T)
    assert not webhooks.verify(SECRET, header, BODY, tolerance_seconds=0, now=T + 1)
    with pytest.raises(ValueError, match=r"^tolerance_seconds must not be negative$"):
        webhooks.verify(SECRET, header, BODY, tolerance_seconds=-1, now=T)


def test_a_v1_value_with_a_second_equals_sign_makes_the_header_malformed():
    header = f"t={T},v1={KNOWN_V1},v1={KNOWN_V1}="
    with pytest.raises(WebhookVerificationError) as raised:
        webhooks.verify_or_raise(SECRET, header, BODY, now=T)
    assert raised.value.reason == webhooks.MALFORMED_HEADER
