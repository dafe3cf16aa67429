"""The operators' admin API: list, add or change, drain and delete GPU endpoints (group admin)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any
from urllib.parse import quote

import boto3
import pytest

from gpuqueue.fleet.endpoint_registry import EndpointRegistry, endpoint_id_for
from gpuqueue.models import TaskKind
from gpuqueue_local.standins.image_server import ImageServerKnobs

MODULE = "admin_handler"
COLLECTION = "/api/v1/admin/endpoints"
ITEM = "/api/v1/admin/endpoints/{endpoint_id}"
DRAIN = "/api/v1/admin/endpoints/{endpoint_id}/drain"
SPEC = {"url": "http://10.0.0.5:8000", "kind": "image"}


def list_endpoints(h: Any, user: Any, kind: str | None = None) -> Any:
    query = {"kind": kind} if kind is not None else None
    return h.call(MODULE, "GET", COLLECTION, query=query, user=user)


def put(h: Any, user: Any, endpoint_id: str, body: Any = None, **kwargs: Any) -> Any:
    return h.call(
        MODULE,
        "PUT",
        f"{COLLECTION}/{quote(endpoint_id, safe='')}",
        route=ITEM,
        path_params={"endpoint_id": endpoint_id},
        body=body,
        user=user,
        **kwargs,
    )


def drain(h: Any, user: Any, endpoint_id: str) -> Any:
    return h.call(
        MODULE,
        "POST",
        f"{COLLECTION}/{quote(endpoint_id, safe='')}/drain",
        route=DRAIN,
        path_params={"endpoint_id": endpoint_id},
        user=user,
    )


def delete(h: Any, user: Any, endpoint_id: str) -> Any:
    return h.call(
        MODULE,
        "DELETE",
        f"{COLLECTION}/{quote(endpoint_id, safe='')}",
        route=ITEM,
        path_params={"endpoint_id": endpoint_id},
        user=user,
    )


def by_id(response: Any) -> dict[str, dict[str, Any]]:
    assert response.status == 200, response.body
    return {row["endpoint_id"]: row for row in response.json()}


def registry(h: Any) -> EndpointRegistry:
    return EndpointRegistry(boto3.resource("dynamodb").Table(h.stack.ref("EndpointsTable")))


def declared_ids(h: Any) -> list[str]:
    return [endpoint_id_for(TaskKind.IMAGE, s.url) for s in h.image_servers]


# --- who may call it --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "groups", [pytest.param((), id="no-group"), pytest.param(("users", "admins"), id="other")]
)
def test_anyone_outside_the_admin_group_gets_403_on_every_route(make_stack, alice, groups):
    h = make_stack()
    h.run_checker()
    user = dataclasses.replace(alice, groups=groups)
    [declared] = declared_ids(h)

    answers = [
        list_endpoints(h, user),
        put(h, user, "gpu-new", SPEC),
        put(h, user, declared, {**SPEC, "capacity": 64}),
        drain(h, user, declared),
        delete(h, user, "gpu-new"),
    ]

    assert [a.status for a in answers] == [403] * 5
    assert all(a.json()["code"] == "FORBIDDEN" and a.json()["error"] for a in answers)
    # Nothing changed.
    [row] = registry(h).endpoints(TaskKind.IMAGE)
    assert (row.endpoint_id, row.capacity, row.state.value) == (declared, 1, "ACTIVE")


def test_the_group_is_checked_before_the_body(make_stack, alice):
    h = make_stack(endpoints=[])

    response = put(h, alice, "bad id!", raw_body="{not json")

    assert response.status == 403
    assert response.json()["code"] == "FORBIDDEN"


# --- list -------------------------------------------------------------------------------------


def test_declared_endpoints_are_listed_once_the_checker_has_run(make_stack, operator):
    h = make_stack(endpoints=[ImageServerKnobs(), ImageServerKnobs()])
    assert list_endpoints(h, operator).json() == []

    h.run_checker()
    rows = by_id(list_endpoints(h, operator))

    assert set(rows) == set(declared_ids(h))
    for server in h.image_servers:
        row = rows[endpoint_id_for(TaskKind.IMAGE, server.url)]
        assert row["url"] == server.url
        assert row["source"] == "parameter"
        assert (row["kind"], row["protocol"], row["state"]) == ("image", "openai", "ACTIVE")
        assert (row["healthy"], row["routable"], row["circuit"]) == (True, True, "CLOSED")
        assert row["in_flight"] == 0
        assert row["last_checked_at"] is not None
        assert row["latency_ewma_ms"] is not None


def test_list_counts_live_slot_leases_as_in_flight(make_stack, operator):
    h = make_stack()
    h.run_checker()
    [endpoint] = registry(h).endpoints(TaskKind.IMAGE)
    registry(h).take_slot(endpoint, 0, task_id="t-1", lease_seconds=60, now=time.time())

    [row] = list_endpoints(h, operator).json()

    assert row["in_flight"] == 1


def test_list_filters_by_kind_and_refuses_an_unknown_kind(make_stack, operator):
    h = make_stack(endpoints=[])
    put(h, operator, "img-1", SPEC)
    put(h, operator, "tts-1", {"url": "http://10.0.0.9", "kind": "speech"})

    assert set(by_id(list_endpoints(h, operator))) == {"img-1", "tts-1"}
    assert set(by_id(list_endpoints(h, operator, "speech"))) == {"tts-1"}
    refused = list_endpoints(h, operator, "video")
    assert refused.status == 400
    assert refused.json()["field"] == "kind"


# --- put --------------------------------------------------------------------------------------


def test_put_adds_an_admin_endpoint_with_defaults(make_stack, operator):
    h = make_stack(endpoints=[])

    response = put(
        h, operator, "gpu-a100_1.eu", {"url": "https://gpu.example.com:8443/", "kind": "image"}
    )

    assert response.status == 200, response.body
    body = response.json()
    assert body["endpoint_id"] == "gpu-a100_1.eu"
    assert body["url"] == "https://gpu.example.com:8443"
    assert body["source"] == "admin"
    assert (body["protocol"], body["capacity"], body["weight"], body["state"]) == (
        "openai",
        1,
        1,
        "ACTIVE",
    )
    # Not probed yet: listed, but not routable.
    assert (body["healthy"], body["routable"], body["in_flight"]) == (False, False, 0)
    assert by_id(list_endpoints(h, operator))["gpu-a100_1.eu"]["source"] == "admin"


def test_an_added_endpoint_is_probed_by_the_checker(make_stack, operator):
    h = make_stack()
    [server] = h.image_servers
    put(h, operator, "extra", {"url": server.url, "kind": "image", "capacity": 2})

    h.run_checker()

    row = by_id(list_endpoints(h, operator))["extra"]
    assert (row["healthy"], row["routable"], row["capacity"]) == (True, True, 2)


@pytest.mark.parametrize(
    ("endpoint_id", "body", "field"),
    [
        pytest.param("gpu-1", {**SPEC, "url": "ftp://10.0.0.5"}, "url", id="scheme"),
        pytest.param("gpu-1", {**SPEC, "url": "http://u:p@10.0.0.5"}, "url", id="userinfo"),
        pytest.param("gpu-1", {**SPEC, "url": "http://"}, "url", id="no-host"),
        pytest.param("gpu-1", {**SPEC, "url": "http://h/" + "a" * 2048}, "url", id="too-long"),
        pytest.param("gpu-1", {**SPEC, "url": "http://h/?q=1"}, "url", id="query"),
        pytest.param("gpu-1", {"kind": "image"}, "url", id="no-url"),
        pytest.param("gpu-1", {**SPEC, "kind": "video"}, "kind", id="kind"),
        pytest.param("gpu-1", {**SPEC, "protocol": "grpc"}, "protocol", id="protocol"),
        pytest.param(
            "gpu-1",
            {**SPEC, "kind": "speech", "protocol": "a1111"},
            "protocol",
            id="speech-a1111",
        ),
        pytest.param("gpu-1", {**SPEC, "capacity": 0}, "capacity", id="capacity-0"),
        pytest.param("gpu-1", {**SPEC, "capacity": 65}, "capacity", id="capacity-65"),
        pytest.param("gpu-1", {**SPEC, "weight": 0}, "weight", id="weight-0"),
        pytest.param("gpu-1", {**SPEC, "weight": 101}, "weight", id="weight-101"),
        pytest.param("gpu-1", {**SPEC, "state": "GONE"}, "state", id="state"),
        pytest.param("gpu-1", {**SPEC, "owner": "x"}, "owner", id="unknown-field"),
        pytest.param("bad id!", SPEC, "endpoint_id", id="id-chars"),
        pytest.param("a#slot#0", SPEC, "endpoint_id", id="id-slot-key"),
        pytest.param("x" * 65, SPEC, "endpoint_id", id="id-too-long"),
    ],
)
def test_put_refuses_bad_input_naming_the_field(make_stack, operator, endpoint_id, body, field):
    h = make_stack(endpoints=[])

    response = put(h, operator, endpoint_id, body)

    assert response.status == 400, response.body
    assert response.json()["field"] == field
    assert response.json()["error"].startswith(f"{field}:")
    assert list_endpoints(h, operator).json() == []


def test_put_refuses_a_body_that_is_not_json(make_stack, operator):
    h = make_stack(endpoints=[])

    response = put(h, operator, "gpu-1", raw_body="{not json")

    assert response.status == 400
    assert (response.json()["code"], response.json()["field"]) == ("INVALID_JSON", "body")


def test_put_refuses_a_binary_body_that_is_not_utf8(make_stack, operator):
    h = make_stack(endpoints=[])

    # API Gateway hands it to Lambda base64-encoded (was: UnicodeDecodeError, a 500)
    response = put(h, operator, "gpu-1", binary_body=b'{"url": "\xff\xfe", "kind": "image"}')

    assert response.status == 400
    assert (response.json()["code"], response.json()["field"]) == ("INVALID_JSON", "body")
    assert list_endpoints(h, operator).json() == []


def test_put_changes_an_admin_endpoint_and_keeps_its_health(make_stack, operator):
    h = make_stack()
    [server] = h.image_servers
    put(h, operator, "extra", {"url": server.url, "kind": "image"})
    h.run_checker()

    changed = put(
        h,
        operator,
        "extra",
        {"url": server.url, "kind": "image", "protocol": "a1111", "capacity": 8, "weight": 5},
    )

    assert changed.status == 200, changed.body
    body = changed.json()
    assert (body["protocol"], body["capacity"], body["weight"]) == ("a1111", 8, 5)
    assert (body["source"], body["healthy"]) == ("admin", True)


def test_put_changes_the_capacity_of_a_declared_endpoint_which_stays_declared(make_stack, operator):
    h = make_stack()
    h.run_checker()
    [declared] = declared_ids(h)
    url = h.image_servers[0].url

    changed = put(h, operator, declared, {"url": url, "kind": "image", "capacity": 4, "weight": 3})

    assert changed.status == 200, changed.body
    assert (changed.json()["capacity"], changed.json()["weight"]) == (4, 3)
    assert (changed.json()["source"], changed.json()["healthy"]) == ("parameter", True)
    # The next sync of the declared URLs keeps the operator's change.
    h.run_checker()
    row = by_id(list_endpoints(h, operator))[declared]
    assert (row["capacity"], row["weight"], row["source"]) == (4, 3, "parameter")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        pytest.param({"url": "http://10.9.9.9"}, "url", id="url"),
        pytest.param({"kind": "speech"}, "kind", id="kind"),
        pytest.param({"protocol": "a1111"}, "protocol", id="protocol"),
    ],
)
def test_a_declared_endpoint_keeps_what_the_stack_parameter_sets(
    make_stack, operator, change, field
):
    h = make_stack()
    h.run_checker()
    [declared] = declared_ids(h)

    response = put(
        h, operator, declared, {"url": h.image_servers[0].url, "kind": "image", **change}
    )

    assert response.status == 409, response.body
    assert (response.json()["code"], response.json()["field"]) == ("CONFLICT", field)
    assert by_id(list_endpoints(h, operator))[declared]["url"] == h.image_servers[0].url


# --- drain ------------------------------------------------------------------------------------


def test_drain_stops_new_work_on_that_endpoint_only(make_stack, operator):
    h = make_stack(endpoints=[])
    put(h, operator, "gpu-a", {**SPEC, "url": "http://10.0.0.1"})
    put(h, operator, "gpu-b", {**SPEC, "url": "http://10.0.0.2"})

    drained = drain(h, operator, "gpu-a")

    assert drained.status == 200, drained.body
    assert (drained.json()["state"], drained.json()["routable"]) == ("DRAINING", False)
    rows = by_id(list_endpoints(h, operator))
    assert (rows["gpu-a"]["state"], rows["gpu-b"]["state"]) == ("DRAINING", "ACTIVE")
    assert registry(h).get("gpu-a").state.value == "DRAINING"  # type: ignore[union-attr]


def test_draining_keeps_in_flight_calls_and_survives_the_checker(make_stack, operator):
    h = make_stack()
    h.run_checker()
    [declared] = declared_ids(h)
    [endpoint] = registry(h).endpoints(TaskKind.IMAGE)
    registry(h).take_slot(endpoint, 0, task_id="t-1", lease_seconds=60, now=time.time())

    drained = drain(h, operator, declared)
    h.run_checker()

    assert drained.json()["in_flight"] == 1
    row = by_id(list_endpoints(h, operator))[declared]
    assert (row["state"], row["in_flight"], row["routable"]) == ("DRAINING", 1, False)


def test_put_with_state_active_undrains(make_stack, operator):
    h = make_stack(endpoints=[])
    put(h, operator, "gpu-a", SPEC)
    drain(h, operator, "gpu-a")

    assert put(h, operator, "gpu-a", {**SPEC, "state": "ACTIVE"}).json()["state"] == "ACTIVE"


# --- delete -----------------------------------------------------------------------------------


def test_delete_removes_an_admin_endpoint(make_stack, operator):
    h = make_stack(endpoints=[])
    put(h, operator, "gpu-a", SPEC)

    deleted = delete(h, operator, "gpu-a")

    assert deleted.status == 200, deleted.body
    assert deleted.json() == {"endpoint_id": "gpu-a", "deleted": True}
    assert list_endpoints(h, operator).json() == []
    assert delete(h, operator, "gpu-a").status == 404
    assert drain(h, operator, "gpu-a").status == 404


@pytest.mark.parametrize("action", [drain, delete], ids=["drain", "delete"])
def test_an_unknown_endpoint_is_404(make_stack, operator, action):
    h = make_stack(endpoints=[])

    response = action(h, operator, "no-such-gpu")

    assert response.status == 404
    assert response.json()["code"] == "NOT_FOUND"
    assert list_endpoints(h, operator).json() == []


def test_a_declared_endpoint_cannot_be_deleted(make_stack, operator):
    h = make_stack()
    h.run_checker()
    [declared] = declared_ids(h)

    response = delete(h, operator, declared)

    assert response.status == 409
    assert "DISABLED" in response.json()["error"]
    assert set(by_id(list_endpoints(h, operator))) == {declared}
