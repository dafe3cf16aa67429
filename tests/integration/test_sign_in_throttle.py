"""Failed logins limited per username and per source, registrations per source (issue 17):
over AuthFunction's handler on moto, with the template's default limits and a stopped clock
the tests move by hand (no sleeps)."""

from __future__ import annotations

import pytest

from fakes import FakeClock, stop_rate_limiter_clocks

PASSWORD = "correct-horse-battery-9"
WRONG = "wrong-horse-battery-9"
ATTACKER = "198.51.100.66"
ELSEWHERE = "192.0.2.10"
# The template's defaults.
USERNAME_BURST, USERNAME_REFILL = 5, 300
SOURCE_BURST, SOURCE_REFILL = 30, 60
REGISTER_BURST, REGISTER_REFILL = 5, 720


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Every rate limiter reads this clock: it stands still unless a test moves it."""
    return stop_rate_limiter_clocks(monkeypatch)


def _register(h, username, *, source=ELSEWHERE, password=PASSWORD):
    return h.call(
        "auth_handler",
        "POST",
        "/register",
        body={"username": username, "password": password},
        source_ip=source,
    )


def _login(h, username, password, *, source=ATTACKER, headers=None):
    return h.call(
        "auth_handler",
        "POST",
        "/login",
        body={"username": username, "password": password},
        source_ip=source,
        headers=headers,
    )


def test_forty_wrong_passwords_then_the_right_one_gets_429_not_a_token(make_stack):
    h = make_stack(endpoints=[])
    assert _register(h, "victim1").status == 201

    wrong = [_login(h, "victim1", f"{WRONG}{i}") for i in range(40)]
    right = _login(h, "victim1", PASSWORD)

    assert [r.status for r in wrong[:USERNAME_BURST]] == [401] * USERNAME_BURST
    assert {r.status for r in wrong[USERNAME_BURST:]} == {429}
    assert right.status == 429
    assert "token" not in right.json()
    assert right.json() == {
        "error": "too many failed logins: try again later",
        "code": "RATE_LIMITED",
    }
    # One more failure is allowed once a token has come back: 300 s at the default.
    assert right.headers["retry-after"] == str(USERNAME_REFILL)


def test_an_unknown_username_gets_the_same_answers_as_a_real_one(make_stack):
    h = make_stack(endpoints=[])
    assert _register(h, "realuser1").status == 201

    real = [_login(h, "realuser1", WRONG) for _ in range(USERNAME_BURST + 2)]
    ghost = [_login(h, "ghostuser1", WRONG) for _ in range(USERNAME_BURST + 2)]

    assert [(r.status, r.body, r.headers.get("retry-after")) for r in real] == [
        (g.status, g.body, g.headers.get("retry-after")) for g in ghost
    ]
    assert real[-1].status == 429


def test_the_username_limit_ignores_case(make_stack):
    h = make_stack(endpoints=[])
    for i, spelling in enumerate(["victim2", "VICTIM2", "Victim2", "viCTim2", "vIcTiM2"]):
        assert _login(h, spelling, WRONG, source=f"203.0.113.{i}").status == 401

    assert _login(h, "victim2", WRONG, source="203.0.113.99").status == 429


def test_one_source_failing_across_many_usernames_is_limited_for_that_source_only(make_stack):
    h = make_stack(endpoints=[])
    assert _register(h, "bystander1").status == 201

    spray = [_login(h, f"target{i}", WRONG) for i in range(SOURCE_BURST)]
    refused = _login(h, "bystander1", PASSWORD)  # the right password, from the same source

    assert {r.status for r in spray} == {401}
    assert refused.status == 429
    assert refused.headers["retry-after"] == str(SOURCE_REFILL)
    # The same user from another address is not affected.
    assert _login(h, "bystander1", PASSWORD, source=ELSEWHERE).status == 200


def test_an_ipv6_source_counts_as_its_64(make_stack):
    h = make_stack(endpoints=[])
    for i in range(SOURCE_BURST):
        assert _login(h, f"target{i}", WRONG, source=f"2001:db8:1:2::{i + 1:x}").status == 401

    assert _login(h, "another1", WRONG, source="2001:db8:1:2:ffff::1").status == 429
    assert _login(h, "another1", WRONG, source="2001:db8:1:3::1").status == 401


def test_successful_logins_do_not_spend_the_failure_budget(make_stack):
    h = make_stack(endpoints=[])
    assert _register(h, "regular1").status == 201
    for _ in range(USERNAME_BURST - 1):
        assert _login(h, "regular1", WRONG).status == 401

    for _ in range(10):
        assert _login(h, "regular1", PASSWORD).status == 200

    assert _login(h, "regular1", WRONG).status == 401  # the budget's last failure
    assert _login(h, "regular1", PASSWORD).status == 429


def test_thirty_registrations_from_one_source_stop_at_the_limit_while_another_registers(
    make_stack,
):
    h = make_stack(endpoints=[])

    answers = [_register(h, f"farm{i}", source=ATTACKER) for i in range(30)]

    assert [a.status for a in answers[:REGISTER_BURST]] == [201] * REGISTER_BURST
    assert {a.status for a in answers[REGISTER_BURST:]} == {429}
    refused = answers[-1]
    assert refused.json()["code"] == "RATE_LIMITED"
    assert refused.headers["retry-after"] == str(REGISTER_REFILL)
    assert "token" not in refused.json()
    # The refused ones created no account: their names are still free.
    assert _register(h, f"farm{REGISTER_BURST}", source=ELSEWHERE).status == 201


def test_the_limits_come_back_after_their_refill_period(make_stack, clock):
    h = make_stack(endpoints=[])
    assert _register(h, "patient1").status == 201
    for _ in range(USERNAME_BURST):
        _login(h, "patient1", WRONG)
    for i in range(REGISTER_BURST):
        _register(h, f"later{i}", source=ATTACKER)
    assert _login(h, "patient1", PASSWORD).status == 429
    assert _register(h, "later9", source=ATTACKER).status == 429

    clock.advance(USERNAME_REFILL - 1)
    assert _login(h, "patient1", PASSWORD).status == 429
    clock.advance(1)
    assert _login(h, "patient1", PASSWORD).status == 200

    clock.advance(REGISTER_REFILL - USERNAME_REFILL)
    assert _register(h, "later9", source=ATTACKER).status == 201
    assert _register(h, "later10", source=ATTACKER).status == 429


def test_behind_cloudfront_the_viewer_address_counts_and_a_bypass_is_refused(make_stack):
    secret = "s" * 48
    h = make_stack(endpoints=[], env={"ORIGIN_VERIFY_SECRET": secret})
    via_cloudfront = {"x-origin-verify": secret, "x-gpuqueue-viewer-ip": ATTACKER}

    # Straight to the execute-api URL (no secret, or a wrong one): refused, nothing counted.
    direct = _login(h, "someone1", WRONG, headers={"x-gpuqueue-viewer-ip": ELSEWHERE})
    forged = _login(h, "someone1", WRONG, headers={**via_cloudfront, "x-origin-verify": "guess"})
    assert (direct.status, forged.status) == (403, 403)
    assert direct.json()["code"] == "FORBIDDEN"

    # Through CloudFront every request arrives from an edge address; the viewer's counts.
    edge = "130.176.0.1"
    for i in range(SOURCE_BURST):
        assert _login(h, f"target{i}", WRONG, source=edge, headers=via_cloudfront).status == 401
    assert _login(h, "other1", WRONG, source=edge, headers=via_cloudfront).status == 429
    other_viewer = {**via_cloudfront, "x-gpuqueue-viewer-ip": ELSEWHERE}
    assert _login(h, "other1", WRONG, source=edge, headers=other_viewer).status == 401
